"""Triton Inference Server backend: the models run in a `tritonserver` holding our model repository.

    backend = TritonBackend("triton:8001")                                  # gRPC (default)
    backend = TritonBackend("triton:8000", protocol="http")
    backend = TritonBackend("localhost:8001", shared_memory="system")       # same node: tensors via /dev/shm
    out = backend.run("face_embedder", {"chips": chips})                    # same contract as onnxruntime

At start the server must be live and ready and the core models (detectors, embedder) ready,
else BackendError says which and why (waiting up to `wait_s` for a server that is still loading).
Inputs are cast to the datatype the server declares for them (the same rule as the in-process
backend), batches larger than a model's max_batch_size are split, and every thread gets its own
HTTP client (tritonclient's HTTP client is single-threaded; its gRPC client is shared) and its own
shared-memory regions.

Shared memory (front end and Triton on one node): "system" puts inputs and outputs in POSIX shared
memory regions registered with the server, "cuda" in CUDA IPC regions on `cuda_device` (needs
cuda-python, i.e. tritonclient[cuda]). Regions grow by doubling and are reused; an output whose size
is not known from the model's dims (P-Net's maps) travels in-band the first time a given input shape
is seen, and through shared memory once its shape is known.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from server.inference.base import BackendError
from server.inference.names import CORE_MODELS

log = logging.getLogger(__name__)

PROTOCOLS = ("grpc", "http")
SHARED_MEMORY = ("none", "system", "cuda")
# checked at start: CORE_MODELS (names.py: MTCNN's stages, YuNet, the default detector, and the embedder;
# every build has them)
_MIN_REGION = 1 << 16
_SHAPE_CACHE_MAX = 4096


@dataclass(frozen=True)
class ModelInfo:
    """What the server declares for one model."""

    name: str
    max_batch_size: int  # 0: the model does not batch (no splitting)
    inputs: dict[str, str]  # name -> Triton datatype ("FP32", "UINT8", ...)
    outputs: dict[str, tuple[str, tuple[int, ...]]]  # name -> (datatype, dims without the batch axis; -1 dynamic)


class TritonBackend:
    """Backend over tritonclient (gRPC or HTTP), optionally passing tensors through shared memory."""

    name = "triton"

    def __init__(
        self,
        url: str = "localhost:8001",
        *,
        protocol: str = "grpc",
        shared_memory: str = "none",
        models: Iterable[str] = CORE_MODELS,
        timeout_s: float = 60.0,
        wait_s: float = 0.0,
        cuda_device: int = 0,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"triton protocol must be one of {PROTOCOLS}, not {protocol!r}")
        if shared_memory not in SHARED_MEMORY:
            raise ValueError(f"triton shared memory must be one of {SHARED_MEMORY}, not {shared_memory!r}")
        try:
            if protocol == "grpc":
                import tritonclient.grpc as client_module
            else:
                import tritonclient.http as client_module
        except ImportError as exc:
            raise BackendError(f"the triton backend needs tritonclient: pip install 'tritonclient[grpc,http]' "
                               f"(or this project's [triton] extra): {exc}") from exc
        from tritonclient.utils import InferenceServerException

        self.url = url.removeprefix("http://").removeprefix("grpc://")
        self.protocol = protocol
        self.shared_memory = shared_memory
        self.timeout_s = timeout_s
        self.cuda_device = cuda_device
        self._tc = client_module
        self._server_error = InferenceServerException
        self._local = threading.local()
        self._lock = threading.Lock()  # client and region bookkeeping
        self._models: dict[str, ModelInfo] = {}
        self._out_shapes: dict[tuple, dict[str, tuple[int, ...]]] = {}
        self._pools: list[_RegionPool] = []
        self._clients: list[Any] = []  # HTTP: one per thread (gevent-based, bound to its thread)
        self._names = (f"fr{os.getpid()}-{uuid.uuid4().hex[:8]}-{i}" for i in itertools.count())
        self._closed = False
        self._shm = _load_shm_module(shared_memory) if shared_memory != "none" else None
        # gRPC: one client for every thread (its infer / control calls are thread-safe)
        self._grpc = self._new_client() if protocol == "grpc" else None
        try:
            self._wait_ready(list(models), wait_s)
            if self._shm is not None:
                self._probe_shared_memory()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ public API
    def run(self, model: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._closed:
            raise BackendError("the triton backend is closed")
        info = self.model_info(model)
        missing = set(info.inputs) - set(inputs)
        if missing:
            raise BackendError(f"{model}: missing inputs {sorted(missing)}")
        arrays = {
            name: np.ascontiguousarray(inputs[name], dtype=_np_dtype(dtype)) for name, dtype in info.inputs.items()
        }
        sizes = {a.shape[0] if a.ndim else -1 for a in arrays.values()}
        if len(sizes) != 1:
            raise BackendError(f"{model}: inputs disagree on the batch size ({sorted(sizes)})")
        n = sizes.pop()
        if n == 0:  # Triton rejects empty tensors; answer like onnxruntime does (dynamic dims unknown: 0)
            return {name: np.zeros((0, *(max(d, 0) for d in dims)), _np_dtype(dtype))
                    for name, (dtype, dims) in info.outputs.items()}
        step = info.max_batch_size
        if step <= 0 or n <= step:
            return self._infer(info, arrays)
        # Triton rejects batches above max_batch_size: send consecutive slices and join the outputs.
        parts = [self._infer(info, {k: v[i:i + step] for k, v in arrays.items()}) for i in range(0, n, step)]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def model_info(self, model: str) -> ModelInfo:
        info = self._models.get(model)
        if info is None:
            # fetched outside the lock (the HTTP client of a new thread takes it); a duplicate fetch is harmless
            info = self._models.setdefault(model, self._fetch_model_info(model))
        return info

    def close(self) -> None:
        self._closed = True
        with self._lock:
            pools, self._pools = self._pools, []
        if pools:
            control = self._client()  # unregistering by name works from any connection
            with self._lock:
                for pool in pools:
                    pool.release(control)
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients + ([self._grpc] if self._grpc is not None else []):
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing a dead connection must not mask the real error
                pass

    # ------------------------------------------------------------------ start-up checks
    def _new_client(self):
        if self.protocol == "grpc":
            return self._tc.InferenceServerClient(self.url)
        timeout = max(self.timeout_s, 1.0)
        return self._tc.InferenceServerClient(self.url, connection_timeout=timeout, network_timeout=timeout)

    def _call(self, fn, *args, **kwargs):
        """A control-plane call with the client timeout (gRPC) and errors as BackendError."""
        if self.protocol == "grpc":
            kwargs.setdefault("client_timeout", self.timeout_s)
        try:
            return fn(*args, **kwargs)
        except self._server_error as exc:
            raise BackendError(f"Triton at {self.url} ({self.protocol}): {_message(exc)}") from exc
        except OSError as exc:  # HTTP client: connection refused / reset
            raise BackendError(f"Triton at {self.url} ({self.protocol}): {exc}") from exc

    def _wait_ready(self, models: list[str], wait_s: float) -> None:
        deadline = time.monotonic() + max(wait_s, 0.0)
        while True:
            problem = self._readiness_problem(models)
            if problem is None:
                for m in models:
                    self.model_info(m)
                log.info("Triton at %s (%s) ready with %s", self.url, self.protocol, ", ".join(models))
                return
            if time.monotonic() >= deadline:
                raise BackendError(problem)
            time.sleep(0.5)

    def _readiness_problem(self, models: list[str]) -> str | None:
        where = f"Triton at {self.url} ({self.protocol})"
        client = self._client()
        try:
            if not self._call(client.is_server_live):
                return f"{where} is not live"
            if not self._call(client.is_server_ready):
                return f"{where} is live but not ready (still loading models?)"
            not_ready = [m for m in models if not self._call(client.is_model_ready, m)]
            if not not_ready:
                return None
            index = self._call(client.get_model_repository_index, **self._as_json())
        except BackendError as exc:
            return f"cannot reach {exc}"
        entries = index.get("models", []) if isinstance(index, dict) else index
        state = {e.get("name"): e.get("state", "UNKNOWN") for e in entries}
        details = ", ".join(f"{m} ({state.get(m, 'not in the repository')})" for m in not_ready)
        return f"{where}: models not ready: {details}; build the repository with `python -m server models build`"

    def _as_json(self) -> dict:
        return {"as_json": True} if self.protocol == "grpc" else {}

    def _fetch_model_info(self, model: str) -> ModelInfo:
        client = self._client()
        meta = self._call(client.get_model_metadata, model, **self._as_json())
        config = self._call(client.get_model_config, model, **self._as_json())
        config = config.get("config", config)  # gRPC wraps the config in a response message
        max_batch = int(config.get("max_batch_size", 0))
        inputs = {t["name"]: t["datatype"] for t in meta.get("inputs", [])}
        outputs = {}
        for t in meta.get("outputs", []):
            dims = tuple(int(d) for d in t.get("shape", []))
            outputs[t["name"]] = (t["datatype"], dims[1:] if max_batch > 0 else dims)
        if not inputs or not outputs:
            raise BackendError(f"{model}: Triton at {self.url} declares no inputs or outputs")
        return ModelInfo(model, max_batch, inputs, outputs)

    def _probe_shared_memory(self) -> None:
        """Register one small region: fails early when the server cannot map this process's memory."""
        pool = self._pool()
        try:
            pool.region(("probe",), 1)
        except BackendError as exc:
            raise BackendError(f"{self.shared_memory} shared memory with Triton at {self.url} failed (the front "
                               f"end and Triton must share a node, /dev/shm or the GPU): {exc}") from exc

    # ------------------------------------------------------------------ inference
    def _client(self):
        if self._grpc is not None:
            return self._grpc
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._new_client()
            with self._lock:
                self._clients.append(client)
        return client

    def _pool(self) -> "_RegionPool":
        pool = getattr(self._local, "pool", None)
        if pool is None:
            pool = _RegionPool(self)
            self._local.pool = pool
            with self._lock:
                self._pools.append(pool)
        return pool

    def _infer(self, info: ModelInfo, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tc = self._tc
        client = self._client()
        pool = self._pool() if self._shm is not None else None
        shape_key = (info.name, tuple(a.shape[1:] for a in arrays.values()))
        n = next(iter(arrays.values())).shape[0]
        infer_inputs = []
        for name, arr in arrays.items():
            inp = tc.InferInput(name, list(arr.shape), info.inputs[name])
            if pool is not None:
                region = pool.region((info.name, "in", name), arr.nbytes)
                region.write(arr)
                inp.set_shared_memory(region.name, arr.nbytes)
            elif self.protocol == "http":
                inp.set_data_from_numpy(arr, binary_data=True)
            else:
                inp.set_data_from_numpy(arr)
            infer_inputs.append(inp)
        known = self._out_shapes.get(shape_key, {})
        requested, in_shm = [], {}
        for name, (dtype, dims) in info.outputs.items():
            out = tc.InferRequestedOutput(name, binary_data=True) if self.protocol == "http" else \
                tc.InferRequestedOutput(name)
            dims = dims if all(d >= 0 for d in dims) else known.get(name)
            if pool is not None and dims is not None:
                nbytes = n * int(np.prod(dims, dtype=np.int64)) * _np_dtype(dtype).itemsize
                region = pool.region((info.name, "out", name), nbytes)
                out.set_shared_memory(region.name, region.capacity)
                in_shm[name] = region
            requested.append(out)
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        try:
            result = client.infer(info.name, infer_inputs, outputs=requested, **kwargs)
        except self._server_error as exc:
            raise BackendError(f"{info.name}: Triton at {self.url}: {_message(exc)}") from exc
        except OSError as exc:
            raise BackendError(f"{info.name}: Triton at {self.url}: {exc}") from exc
        outputs, shapes = {}, {}
        for name, (dtype, _) in info.outputs.items():
            if name in in_shm:
                shape = _output_shape(result, name)
                outputs[name] = in_shm[name].read(_np_dtype(dtype), shape)
            else:
                arr = result.as_numpy(name)
                if arr is None:
                    raise BackendError(f"{info.name}: Triton returned no {name!r} output")
                # a view of the response bytes is read-only; callers may normalise in place, as with onnxruntime
                outputs[name] = arr if arr.flags.writeable else arr.copy()
            shapes[name] = tuple(outputs[name].shape[1:])
        if pool is not None and shape_key not in self._out_shapes:
            if len(self._out_shapes) >= _SHAPE_CACHE_MAX:
                self._out_shapes.clear()  # P-Net sees one shape per pyramid level and image size: rarely full
            self._out_shapes[shape_key] = shapes
        return outputs


# ---------------------------------------------------------------------- shared memory
@dataclass
class _Region:
    """One registered shared-memory region (system or CUDA), reused while it is large enough."""

    name: str
    capacity: int
    handle: Any
    kind: str
    shm: Any

    def write(self, arr: np.ndarray) -> None:
        self.shm.set_shared_memory_region(self.handle, [arr])

    def read(self, dtype: np.dtype, shape: list[int]) -> np.ndarray:
        # system: a view of the region, which the next call overwrites -> copy; cuda: already a host copy
        arr = self.shm.get_contents_as_numpy(self.handle, dtype, shape)
        return arr.copy() if self.kind == "system" else arr


@dataclass
class _RegionPool:
    """The regions of one thread, keyed by (model, in/out, tensor)."""

    backend: TritonBackend
    regions: dict[tuple, _Region] = field(default_factory=dict)

    def region(self, key: tuple, nbytes: int) -> _Region:
        region = self.regions.get(key)
        if region is not None and region.capacity >= nbytes:
            return region
        b = self.backend
        client = b._client()  # this thread's: the pool belongs to one thread
        capacity = max(_MIN_REGION, 1 << max(0, int(nbytes) - 1).bit_length())
        with b._lock:  # tritonclient's region bookkeeping is module-global and not thread-safe
            if region is not None:
                self._drop(region, client)
                del self.regions[key]
            name = next(b._names)
            handle = None
            try:
                if b.shared_memory == "system":
                    handle = b._shm.create_shared_memory_region(name, "/" + name, capacity, create_only=True)
                    b._call(client.register_system_shared_memory, name, "/" + name, capacity)
                else:
                    handle = b._shm.create_shared_memory_region(name, capacity, b.cuda_device)
                    b._call(client.register_cuda_shared_memory, name, b._shm.get_raw_handle(handle),
                            b.cuda_device, capacity)
            except BackendError:
                self._destroy(handle)
                raise
            except Exception as exc:  # noqa: BLE001 - tritonclient's shm errors have no common base
                self._destroy(handle)
                raise BackendError(f"cannot create a {b.shared_memory} shared memory region of {capacity} "
                                   f"bytes: {exc}") from exc
        region = _Region(name, capacity, handle, b.shared_memory, b._shm)
        self.regions[key] = region
        return region

    def release(self, control) -> None:
        for region in self.regions.values():
            self._drop(region, control)
        self.regions.clear()

    def _drop(self, region: _Region, control) -> None:
        try:
            if region.kind == "system":
                control.unregister_system_shared_memory(region.name)
            else:
                control.unregister_cuda_shared_memory(region.name)
        except Exception as exc:  # noqa: BLE001 - the server may be gone; the local memory is freed anyway
            log.debug("unregistering %s failed: %s", region.name, exc)
        self._destroy(region.handle)

    def _destroy(self, handle) -> None:
        if handle is None:
            return
        try:
            self.backend._shm.destroy_shared_memory_region(handle)
        except Exception as exc:  # noqa: BLE001
            log.debug("destroying a shared memory region failed: %s", exc)


def _load_shm_module(kind: str):
    try:
        if kind == "system":
            import tritonclient.utils.shared_memory as shm
        else:
            import tritonclient.utils.cuda_shared_memory as shm
    except (ImportError, RuntimeError, OSError) as exc:  # cuda: RuntimeError without cuda-python
        extra = "tritonclient[cuda] (cuda-python) and an NVIDIA GPU" if kind == "cuda" else "tritonclient"
        raise BackendError(f"{kind} shared memory needs {extra}: {exc}") from exc
    return shm


# ---------------------------------------------------------------------- helpers
def _np_dtype(datatype: str) -> np.dtype:
    from tritonclient.utils import triton_to_np_dtype

    dtype = triton_to_np_dtype(datatype)
    if dtype is None or dtype == np.object_:
        raise BackendError(f"unsupported Triton datatype {datatype!r}")
    return np.dtype(dtype)


def _output_shape(result, name: str) -> list[int]:
    out = result.get_output(name)
    if out is None:
        raise BackendError(f"Triton returned no {name!r} output")
    shape = out["shape"] if isinstance(out, dict) else out.shape
    return [int(d) for d in shape]


def _message(exc: Exception) -> str:
    msg = exc.message() if hasattr(exc, "message") and callable(exc.message) else str(exc)
    return msg or type(exc).__name__
