"""One settings object, filled from environment variables (FR_*) and CLI flags."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

_PROJECT_ROOT = Path(__file__).resolve().parent.parent

@dataclass(frozen=True)
class Settings:
    # where things live
    data_dir: Path = Path("data")
    model_dir: Path = _PROJECT_ROOT / "model_repository"
    # serving
    host: str = "0.0.0.0"
    port: int = 8000
    admin_token: str = ""
    # inference
    backend: str = "onnxruntime"
    inference_threads: int = 0  # 0: onnxruntime's default (one per core)
    # detection (CompreFace's facenet build: det_prob_threshold 0.85, images <= 640 px)
    det_prob_threshold: float = 0.85
    min_face_size: int = 20
    max_detect_side: int = 640
    # storage / API (CompreFace limits: 5 MB per file, 10 MB per request body)
    database_url: str = ""  # empty: SQLite at <data_dir>/faces.db
    max_file_size: int = 5 * 1024 * 1024
    max_body_size: int = 10 * 1024 * 1024
    seed_demo_keys: bool = False
    # similarity = (tanh((c0 - d) * c1) + 1) / 2, calibrated for our embedder (see README)
    similarity_c0: float = 0.6
    similarity_c1: float = 10.0
    # index
    index_exact_below: int = 2000
    index_m: int = 16
    index_ef_construction: int = 200
    index_ef_search: int = 64
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        """Defaults, then FR_<FIELD> environment variables, then explicit overrides (non-None)."""
        values = {}
        for f in fields(cls):
            if f.name == "extra":
                continue
            raw = os.environ.get(f"FR_{f.name.upper()}")
            if raw is not None:
                values[f.name] = _coerce(f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        for k in ("data_dir", "model_dir"):
            if k in values:
                values[k] = Path(values[k])
        return cls(**values)

    def with_(self, **changes) -> "Settings":
        return replace(self, **changes)

def _coerce(type_name, raw: str):
    t = str(type_name)
    if "int" in t and "Path" not in t:
        return int(raw)
    if "float" in t:
        return float(raw)
    if "bool" in t:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    return raw
