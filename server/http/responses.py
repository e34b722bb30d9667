"""orjson responses and CompreFace's response shapes for faces.

Null fields are left out (Jackson's NON_NULL). Key order follows CompreFace's documented
examples; JSON clients do not depend on it.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from starlette.responses import Response

from server.core.service import execution_time, round5
from server.vision.plugins import VERSION_KEYS

# the plugin fields of a face, in the order CompreFace writes them (landmarks come after the box)
PLUGIN_FIELDS = ("age", "gender", "pose", "mask")


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def box(face, *, rounded: bool) -> dict[str, Any]:
    """{"probability", "x_max", "y_max", "x_min", "y_min"}; probability 5 dp HALF_UP where CompreFace rounds."""
    x_min, y_min, x_max, y_max = (int(v) for v in face.box)
    p = float(face.probability)
    return {"probability": round5(p) if rounded else p, "x_max": x_max, "y_max": y_max, "x_min": x_min, "y_min": y_min}


def embedding_list(vector) -> list[float]:
    return np.asarray(vector, dtype=np.float32).astype(np.float64).tolist()


def face_fields(face, extra: dict, *, rounded: bool, embedding: bool, status: bool) -> dict[str, Any]:
    """The plugin fields, embedding and box of one face (no subjects / similarity)."""
    out: dict[str, Any] = {}
    for name in PLUGIN_FIELDS:
        if extra.get(name) is not None:
            out[name] = extra[name]
    if embedding and face.embedding is not None:
        out["embedding"] = embedding_list(face.embedding)
    out["box"] = box(face, rounded=rounded)
    if extra.get("landmarks") is not None:
        out["landmarks"] = extra["landmarks"]
    return out


def add_execution_time(out: dict[str, Any], face, extra: dict, status: bool) -> dict[str, Any]:
    if status:
        out["execution_time"] = execution_time(face, extra)
    return out


def plugins_versions(versions: dict[str, str]) -> dict[str, str]:
    return {k: versions[k] for k in VERSION_KEYS if k in versions}


def wants_embedding(face_plugins: str) -> bool:
    """CompreFace keeps `embedding` only if the raw face_plugins string contains "calculator"."""
    return "calculator" in (face_plugins or "")
