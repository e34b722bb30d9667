"""Inference backends: one interface (base.Backend), chosen by configuration."""
from __future__ import annotations

from server.backends.base import Backend, BackendError
from server.config import Settings

__all__ = ["Backend", "BackendError", "create_backend"]


def create_backend(settings: Settings) -> Backend:
    if settings.backend == "onnxruntime":
        from server.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(settings.model_dir, threads=settings.inference_threads)
    raise ValueError(f"unknown backend {settings.backend!r} (expected: onnxruntime)")
