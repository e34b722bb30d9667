"""Inference backends: one interface (base.Backend), chosen by configuration."""
from __future__ import annotations

from server.inference.base import Backend, BackendError
from server.config import Settings

__all__ = ["Backend", "BackendError", "create_backend"]


def create_backend(settings: Settings) -> Backend:
    if settings.backend == "onnxruntime":
        from server.inference.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(settings.model_dir, threads=settings.intra_op_threads(),
                                  spin=settings.inference_spin)
    if settings.backend == "triton":
        from server.inference.triton import TritonBackend

        return TritonBackend(
            settings.triton_url, protocol=settings.triton_protocol, shared_memory=settings.triton_shared_memory,
            timeout_s=settings.triton_timeout_s, wait_s=settings.triton_wait_s,
            cuda_device=settings.triton_cuda_device,
        )
    if settings.backend == "torch":
        from server.inference.torch import TorchBackend

        return TorchBackend(settings.model_dir, device=settings.torch_device, half=settings.torch_half,
                            threads=settings.intra_op_threads())
    raise ValueError(f"unknown backend {settings.backend!r} (expected: onnxruntime, triton, torch)")
