"""Settings -> the running inference parts, written once.

    inference = build_inference(settings, metrics)   # as the server runs it
    faces = inference.pipeline.faces(rgb)
    inference.close()

The order: the model repository (built on first use, server.modelbuild.repository.ensure_built)
-> the backend (server.inference.create_backend) -> the micro-batcher over it
(server.inference.batcher.create_batcher; none when settings.batching is off or the caller asks
for none) -> the pipeline (FacePipeline.from_settings) -> the plugins (PluginRegistry, with the
pipeline's shape predictor). Used by the HTTP app (server/http/app.py), the bulk importer
(server/core/importer.py) and the benchmarks (benchmarks/), which pass their own options.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from server.config import Settings

if TYPE_CHECKING:
    from server.inference.base import Backend
    from server.metrics import Metrics
    from server.vision.pipeline import FacePipeline
    from server.vision.plugins import PluginRegistry


@dataclass
class Inference:
    """The parts that run the models; `close()` releases the backend (the batcher first)."""

    backend: "Backend"  # what the pipeline and the plugins call: the micro-batcher, or the backend itself
    pipeline: "FacePipeline"
    plugins: "PluginRegistry | None" = None

    def close(self) -> None:
        self.backend.close()


def open_backend(settings: Settings, metrics: "Metrics | None" = None, *, batching: bool = True) -> "Backend":
    """The model repository made current, then its backend, behind the micro-batcher when `batching`
    (and settings.batching) is on; `metrics` gets the batcher's per-model figures."""
    from server.inference import create_backend
    from server.inference.batcher import create_batcher
    from server.modelbuild.repository import ensure_built

    ensure_built(settings.model_dir)
    backend = create_backend(settings)
    return create_batcher(backend, settings, metrics) if batching else backend


def build_inference(settings: Settings, metrics: "Metrics | None" = None, *, batching: bool = True,
                    plugins: bool = True) -> Inference:
    """Backend, micro-batcher (see open_backend), pipeline and, when `plugins`, the plugin registry.
    On a failure the backend opened so far is closed before the error propagates."""
    from server.vision.pipeline import FacePipeline
    from server.vision.plugins import PluginRegistry

    backend = open_backend(settings, metrics, batching=batching)
    try:
        pipeline = FacePipeline.from_settings(settings, backend=backend)
        if metrics is not None:
            metrics.set_detector(pipeline.detector_name)
        registry = PluginRegistry(settings, backend, shape_predictor=pipeline.shape_predictor) if plugins else None
    except BaseException:
        backend.close()
        raise
    return Inference(backend, pipeline, registry)
