"""Inference backends: one interface (base.Backend), chosen by configuration.

Also the settings' auto values that depend on where inference runs (Settings.intra_op_threads
explains the measurements behind them): `runs_on_cpu`, `model_instances`, `inflight_limit`.
"""
from __future__ import annotations

from server.inference.base import Backend, BackendError
from server.config import Settings, usable_cores

__all__ = ["Backend", "BackendError", "create_backend", "inflight_limit", "model_instances", "runs_on_cpu"]


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


def runs_on_cpu(settings: Settings) -> bool:
    """True when inference runs on this machine's cores (ONNX Runtime, or torch without a GPU)."""
    if settings.backend == "onnxruntime":
        return True
    if settings.backend == "torch":
        from server.inference.torch import resolve_device

        return resolve_device(settings.torch_device) == "cpu"
    return False


def model_instances(settings: Settings) -> int:
    """Batches of one model running at once: settings.batch_instances, else one single-threaded
    instance per core on the CPU, 2 for a remote or GPU backend."""
    return settings.batch_instances or (usable_cores() if runs_on_cpu(settings) else 2)


def inflight_limit(settings: Settings) -> int:
    """Requests running inference at once: settings.max_inflight_inference, else one per model
    instance plus one on the CPU, many for a remote or GPU backend (large batches need them)."""
    if settings.max_inflight_inference:
        return settings.max_inflight_inference
    cores = usable_cores()
    if not settings.batching:
        return max(2, cores)
    return model_instances(settings) + 1 if runs_on_cpu(settings) else max(32, 8 * cores)
