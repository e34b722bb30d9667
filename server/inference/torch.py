"""In-process PyTorch backend: the repository's ONNX models executed with torch, on a GPU when present.

For GPU machines that have CUDA and PyTorch but neither TensorRT nor onnxruntime-gpu (Triton
remains the production GPU path; see deploy/). The same ONNX files and weights as the other
backends, interpreted node by node (server/inference/onnx_torch.py), so its results equal
onnxruntime's to float rounding (tests/integration/test_torch_backend.py). torch is imported only when
this backend is chosen (`FR_BACKEND=torch`); it is not a dependency of the server.

Device: `auto` (the first CUDA GPU when torch sees one, else the CPU), `cpu`, `cuda` or `cuda:N`.
`half` runs the weights in float16 on a GPU (outputs come back as float32).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from server.inference.base import BackendError, ModelCache


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda:0' when torch sees a GPU, else 'cpu'; other names are checked, not changed."""
    import torch

    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BackendError(f"torch device {device!r} asked for, but torch sees no CUDA GPU")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise BackendError(f"torch device {device!r} asked for, but torch sees {torch.cuda.device_count()} GPU(s)")
        return f"cuda:{index}"
    if device != "cpu":
        raise BackendError(f"unknown torch device {device!r} (expected auto, cpu, cuda or cuda:N)")
    return device


class TorchBackend:
    """Loads `<repository>/<model>/1/model.onnx` on first use and runs it with torch."""

    name = "torch"

    def __init__(self, repository: Path | str, device: str = "auto", half: bool = False, threads: int = 0) -> None:
        try:
            import torch
        except ImportError as exc:  # the backend is optional: say what to install
            raise BackendError("the torch backend needs PyTorch (pip install torch)") from exc
        self.torch = torch
        self.repository = Path(repository)
        self.device = torch.device(resolve_device(device))
        if half and self.device.type != "cuda":
            raise BackendError("half precision needs a CUDA device (torch runs float16 convolutions on GPUs)")
        self.dtype = torch.float16 if half else torch.float32
        self.threads = threads  # CPU threads; torch has one process-wide pool, set again by run() if changed
        # cudnn.benchmark stays off: it tunes kernels anew for every input shape, and P-Net's pyramid
        # levels take a new shape for every image aspect ratio (and every model one per batch size)
        self._graphs = ModelCache(self.repository, self._load)

    def _load(self, model: str, path: Path):
        import onnx

        from server.inference.onnx_torch import TorchGraph, UnsupportedModel

        try:
            return TorchGraph(onnx.load(str(path)), self.device, self.dtype)
        except UnsupportedModel as exc:
            raise BackendError(f"{model}: {exc}") from exc

    def run(self, model: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        graph = self._graphs.get(model)
        torch = self.torch
        if self.threads and self.device.type == "cpu" and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        missing = set(graph.inputs) - set(inputs)
        unknown = set(inputs) - set(graph.inputs)
        if missing or unknown:
            raise BackendError(f"{model}: inputs {sorted(inputs)} do not match the model's {sorted(graph.inputs)}")
        feeds = {}
        for name, array in inputs.items():
            a = np.ascontiguousarray(array, dtype=graph.inputs[name])
            t = torch.from_numpy(a if a.flags.writeable else a.copy())
            t = t.to(self.device, non_blocking=True)
            feeds[name] = t.to(self.dtype) if t.is_floating_point() else t
        try:
            with torch.inference_mode():
                outputs = graph(feeds)
                return {name: t.float().cpu().numpy() for name, t in outputs.items()}
        except RuntimeError as exc:  # shape errors, out of GPU memory, ...
            raise BackendError(f"{model}: {exc}") from exc

    def close(self) -> None:
        self._graphs.clear()
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()
