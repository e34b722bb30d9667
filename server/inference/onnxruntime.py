"""In-process ONNX Runtime backend (the embedded default)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import onnxruntime as ort

from server.inference.base import BackendError, ModelCache


class OnnxRuntimeBackend:
    """Loads `<repository>/<model>/1/model.onnx` on first use and runs it.

    CUDA / TensorRT execution providers are used when the installed onnxruntime offers them.
    """

    name = "onnxruntime"

    def __init__(self, repository: Path | str, threads: int = 0, providers: list[str] | None = None,
                 spin: bool = False) -> None:
        self.repository = Path(repository)
        self.threads = threads
        self.spin = spin
        available = ort.get_available_providers()
        preferred = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
        self.providers = providers or [p for p in preferred if p in available]
        # model -> (session, its input names -> numpy dtype)
        self._sessions: ModelCache[tuple[ort.InferenceSession, dict[str, np.dtype]]] = ModelCache(
            self.repository, self._open)

    def _open(self, model: str, path: Path) -> tuple[ort.InferenceSession, dict[str, np.dtype]]:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        # Spinning worker threads steal the cores that concurrent requests and the batcher need:
        # detection under load is much slower with spinning on (docs/benchmarks.md, ONNX Runtime
        # spinning).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=self.providers)
        return sess, {i.name: np.dtype(_ORT_TYPES.get(i.type, np.float32)) for i in sess.get_inputs()}

    def run(self, model: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        sess, types = self._sessions.get(model)
        feed = {k: np.ascontiguousarray(v, dtype=types.get(k, v.dtype)) for k, v in inputs.items()}
        names = [o.name for o in sess.get_outputs()]
        try:
            outs = sess.run(names, feed)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise BackendError(f"{model}: {exc}") from exc
        return dict(zip(names, outs))

    def close(self) -> None:
        self._sessions.clear()


_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(uint8)": np.uint8,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(float16)": np.float16,
}
