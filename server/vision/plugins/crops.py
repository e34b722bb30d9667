"""The "box_crop" picture of a face that a slot model may ask for (server/vision/plugins/slots.py).

A square centred on the detector's box with side CROP_SCALE x max(box width, box height), pixels
outside the image black (0), resized to the model's W x H (INTER_AREA when shrinking,
INTER_LINEAR when enlarging). The other kind, "dlib_chip", is the embedder's chip geometry
(server/vision/alignment.py, face_chips).
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

CROP_SCALE = 1.5  # crop side / max(box side): room for hair, chin and a mask's edges


def face_crops(image: np.ndarray, boxes: Sequence[Sequence[int]], size_hw: tuple[int, int],
               scale: float = CROP_SCALE) -> np.ndarray:
    """float32 [N, H, W, 3] RGB 0..255: the slot-model input (see the module docstring)."""
    rgb = as_rgb(image)
    h_img, w_img = rgb.shape[:2]
    out_h, out_w = size_hw
    crops = np.zeros((len(boxes), out_h, out_w, 3), np.float32)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        side = max(1, int(round(scale * max(x1 - x0, y1 - y0))))
        left = int(round((x0 + x1) / 2.0 - side / 2.0))
        top = int(round((y0 + y1) / 2.0 - side / 2.0))
        square = np.zeros((side, side, 3), np.uint8)  # black outside the image
        sx0, sy0 = max(0, left), max(0, top)
        sx1, sy1 = min(w_img, left + side), min(h_img, top + side)
        if sx1 > sx0 and sy1 > sy0:
            square[sy0 - top:sy1 - top, sx0 - left:sx1 - left] = rgb[sy0:sy1, sx0:sx1]
        shrinking = out_h < side or out_w < side
        interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        crops[i] = cv2.resize(square, (out_w, out_h), interpolation=interp)
    return crops


def as_rgb(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8: gray replicated, alpha dropped, other dtypes clipped to 0..255."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    return img
