"""What the benchmarks share: where the dev photos are, test images, markdown tables."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

# the dev photos beside the repository (../shared/facedata/dev)
DEFAULT_FACEDATA = Path(__file__).resolve().parents[1].parent / "shared" / "facedata" / "dev"


def fit_image(img: np.ndarray, w: int, h: int) -> np.ndarray:
    """Centre-crop to the w:h aspect, then resize to w x h."""
    ih, iw = img.shape[:2]
    target = w / h
    if iw / ih > target:
        cw = int(ih * target)
        img = img[:, (iw - cw) // 2:(iw - cw) // 2 + cw]
    else:
        ch = int(iw / target)
        img = img[(ih - ch) // 2:(ih - ch) // 2 + ch]
    interp = cv2.INTER_AREA if img.shape[1] > w else cv2.INTER_LINEAR
    return np.ascontiguousarray(cv2.resize(img, (w, h), interpolation=interp))


def markdown_table(rows: list[dict], fmt: dict[str, str] | None = None) -> str:
    """Rows of one shape as a markdown table; `fmt` gives a column's format spec (floats: .4g)."""
    if not rows:
        return ""
    fmt = fmt or {}
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        out.append("| " + " | ".join(format(r[k], fmt.get(k, ".4g" if isinstance(r[k], float) else ""))
                                     for k in keys) + " |")
    return "\n".join(out)
