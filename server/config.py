"""One settings object, filled from environment variables (FR_*) and CLI flags."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

_PROJECT_ROOT = Path(__file__).resolve().parent.parent
MTCNN_DET_PROB_THRESHOLD = 0.85  # CompreFace's default
# YuNet's default by measurement on the dev detection ground truth: at 0.95 two more photos without a
# face get a box and precision falls (0.90 against 0.95) for 3 points of recall; above it recall falls
# (docs/benchmarks.md, YuNet threshold)
YUNET_DET_PROB_THRESHOLD = 0.955
# similarity = (tanh((c0 - d) * c1) + 1) / 2, fitted per detector on the dev pairs (python -m benchmarks.pipeline
# pipeline --detector D): the descriptors depend on the alignment, which starts from the detector's output
SIMILARITY_COEFFICIENTS = {"mtcnn": (0.415011, 24.676692), "yunet": (0.408071, 36.083569)}

@dataclass(frozen=True)
class Settings:
    # where things live
    data_dir: Path = Path("data")
    model_dir: Path = _PROJECT_ROOT / "model_repository"
    # serving
    host: str = "0.0.0.0"
    port: int = 8000
    # the admin API's token; empty: `serve` uses <data_dir>/admin-token, made on a first run (server/http/admin_token.py)
    admin_token: str = ""
    # inference
    # onnxruntime (in-process) | triton (a tritonserver holding model_repository/) | torch (in-process
    # PyTorch on a GPU when there is one: server/inference/torch.py; needs `pip install torch`)
    backend: str = "onnxruntime"
    # threads of one ONNX Runtime session; 0: auto (see intra_op_threads()): one with the micro-batcher,
    # whose model instances then run side by side, onnxruntime's default (one per core) without it
    inference_threads: int = 0
    inference_spin: bool = False  # let ONNX Runtime's idle threads spin (only for a dedicated, idle machine)
    # triton backend: server address (host:port; gRPC 8001 / HTTP 8000 by Triton's defaults), protocol,
    # and how tensors travel when both run on one node: none (socket) | system (/dev/shm) | cuda (CUDA IPC)
    triton_url: str = "localhost:8001"
    triton_protocol: str = "grpc"
    triton_shared_memory: str = "none"
    triton_timeout_s: float = 60.0  # per request
    triton_wait_s: float = 120.0  # at start, how long to wait for Triton and its models to become ready
    triton_cuda_device: int = 0  # GPU of the CUDA shared-memory regions
    # torch backend: auto (a CUDA GPU when torch sees one, else the CPU) | cpu | cuda | cuda:N; float16 weights on a GPU
    torch_device: str = "auto"
    torch_half: bool = False
    # detection: yunet (one fixed-shape network, batched across requests: server/vision/yunet.py) |
    # mtcnn (CompreFace's facenet build's detector, exactly as before: server/vision/mtcnn.py).
    # Images <= 640 px a side (CompreFace's rule). det_prob_threshold when a request gives none: unset
    # (None), the detector's own default: CompreFace's 0.85 for MTCNN; for YuNet, whose probability is
    # the precision measured on the dev set at that score, YUNET_DET_PROB_THRESHOLD (see below)
    detector: str = "yunet"
    # YuNet: images smaller than max_detect_side are enlarged up to this factor (tiny faces become
    # detectable: docs/benchmarks.md, YuNet upscale); 1 keeps them at their size
    detect_max_upscale: float = 2.0
    # YuNet: a box that MTCNN's O-Net gives a face probability under this is dropped (a dog's face: YuNet
    # 0.994, O-Net 0.0025; the dev set's faces >= 0.019: docs/benchmarks.md, YuNet O-Net veto); 0: off
    yunet_onet_veto: float = 0.005
    det_prob_threshold: float | None = None
    min_face_size: int = 20
    max_detect_side: int = 640
    # no face found: detect once more with this much black border (x the longest side) around the
    # image, for faces that fill a tight crop (FacePipeline.detect); 0: off
    detect_pad_retry: float = 0.25
    # still no face: none | mmod (dlib's CNN MMOD detector, which finds profile faces MTCNN misses; slow
    # (docs/benchmarks.md, MMOD fallback), paid only by photos where MTCNN found nothing). Images above
    # detect_fallback_max_pixels are scaled down to it for the fallback (its pyramid is ~3.6x the image)
    detect_fallback: str = "none"
    detect_fallback_max_pixels: int = 1_000_000
    # storage / API (CompreFace limits: 5 MB per file, 10 MB per request body)
    database_url: str = ""  # empty: SQLite at <data_dir>/faces.db; postgresql://user:pw@host:5432/db: shared
    # PostgreSQL only: connections per replica, how long start-up waits for the database, and how long
    # change-log rows are kept after a snapshot covers them (other replicas may still replay them)
    database_pool_size: int = 10
    database_connect_timeout_s: float = 60.0
    database_changes_retention_s: float = 600.0
    # PostgreSQL only: how long a request waits for a pooled connection before it is answered 503 with
    # Retry-After (the database down or restarting: requests fail fast instead of hanging)
    database_wait_s: float = 2.0
    # SQLite only: bytes kept in <data_dir>/faces.db.reserve, given back to the file system when the disk
    # is full so that deletes (which need room for SQLite's WAL) can still free space; 0: no reserve
    storage_reserve_bytes: int = 4 * 1024 * 1024
    max_file_size: int = 5 * 1024 * 1024
    max_body_size: int = 10 * 1024 * 1024
    # a request body must keep arriving: at most this long between two of its chunks (0: no limit),
    # else 408; a stalled client no longer holds a connection and a half-read body for ever
    body_read_timeout_s: float = 30.0
    # and all of it within this long (0: no limit), else 408: a body trickled a byte at a time (each
    # within body_read_timeout_s) is cut too. 10 MB in 120 s is ~85 KB/s, slower than any real uplink
    body_total_timeout_s: float = 120.0
    # connections (server/http/connections.py): a request's line and headers must be complete within
    # header_read_timeout_s of the connection opening (or of the next request's first byte), else 408 and
    # close, so idle and slow-header sockets are freed; at most max_header_bytes of them (431); idle
    # keep-alive connections close after keep_alive_timeout_s. With max_connections open, a new one
    # closes the connection waiting longest for its request, or is answered 503 (code 60) when all are busy
    header_read_timeout_s: float = 10.0
    max_header_bytes: int = 64 * 1024
    keep_alive_timeout_s: float = 30.0
    max_connections: int = 1000
    # glibc malloc arenas of the serving process (server/http/app.py, limit_malloc_arenas): glibc's default
    # (8 per core) gives each new worker thread its own arena, and a burst of requests that grows the
    # worker pool leaves every arena holding its share of image buffers: RSS rose ~17 MB per slow-client
    # attack, without end (docs/deployment.md, Memory). 0 keeps glibc's default; MALLOC_ARENA_MAX wins
    malloc_arenas: int = 2
    # pixels of images held decoded at once, over all requests (~3 bytes each plus working copies;
    # server/vision/decode.py, PixelBudget); one image may have up to 100 MP. 0: no limit
    decode_pixel_budget: int = 200_000_000
    seed_demo_keys: bool = False
    # similarity = (tanh((c0 - d) * c1) + 1) / 2 on L2-normalised descriptors, calibrated for our
    # embedder on ../shared/facedata/dev pairs by `python -m benchmarks.pipeline pipeline`: c0 is the
    # equal-error distance (similarity 0.5 there), c1 the slope of a logistic fit (README, Similarity).
    # Unset (None): the coefficients fitted for the detector's alignment (SIMILARITY_COEFFICIENTS)
    similarity_c0: float | None = None
    similarity_c1: float | None = None
    # index
    # By measurement (docs/benchmarks.md, Index): exact numpy search is fast enough for collections
    # below index_exact_below; M=20 keeps hnswlib under 800 B/face with more recall than M=16;
    # ef_construction 400 bought little recall for twice the build time. Search: ef 64 first; a query
    # whose nearest face is farther than index_escalate_distance (L2 between normalised descriptors,
    # similarity ~0.9995; same-person photos lie 0.24 +- 0.07 apart) is searched again with ef
    # index_escalate_ef. HNSW's misses on face data are mostly queries whose own person's photos it
    # never reached, whose top-1 then lies among the far crowd of other people.
    index_exact_below: int = 10_000
    index_m: int = 20
    index_ef_construction: int = 200
    index_ef_search: int = 64
    # the second search; 0 turns it off (see index/vector_index.py, VectorIndex)
    index_escalate_distance: float = 0.25
    index_escalate_ef: int = 4096
    # snapshots (a background thread): after this many changes, or when changes are this old
    index_snapshot_every: int = 1000
    index_snapshot_interval_s: float = 60.0
    index_build_threads: int = -1  # background graph builds: -1 = every core
    # micro-batching across requests (server/inference/batcher.py). On CPU batching gains little per
    # row (R-Net/O-Net per-call overhead), so no queue delay (batches still form while a batch runs) and
    # the smallest size at the throughput plateau (docs/benchmarks.md, Batch sizes and Queue delay).
    # On a GPU raise the sizes and allow a few ms of delay. Capacities: rows waiting, about 1-2 s of
    # work each at the measured CPU throughput.
    batching: bool = True
    request_timeout_s: float = 30.0  # per-request deadline for queued inference; 0: none
    # request-level admission (server/http/state.py): requests running inference at once (0: auto,
    # see server.inference.inflight_limit) and requests allowed to wait for a slot (a few seconds of
    # work on 2 cores); beyond that a request is refused at once with 503 + Retry-After (code 60),
    # before any work.
    max_inflight_inference: int = 0
    max_waiting_inference: int = 64
    batch_instances: int = 0  # batches of one model running at once; 0: auto, see server.inference.model_instances
    # the age and gender plugins' models (chips of 64 / 32 px): batches of 16, where their throughput
    # levels off (docs/benchmarks.md, Batch sizes), and ~1 s of work queued
    batch_age_size: int = 16
    batch_age_delay_ms: float = 0.0
    batch_age_capacity: int = 1024  # 64x64 chips
    batch_gender_size: int = 16
    batch_gender_delay_ms: float = 0.0
    batch_gender_capacity: int = 4096  # 32x32 chips
    batch_pnet_size: int = 4
    batch_pnet_delay_ms: float = 0.0
    batch_pnet_capacity: int = 512  # pyramid levels
    batch_rnet_size: int = 64
    batch_rnet_delay_ms: float = 0.0
    batch_rnet_capacity: int = 16384  # 24x24 crops
    batch_onet_size: int = 16
    batch_onet_delay_ms: float = 0.0
    batch_onet_capacity: int = 4096  # 48x48 crops
    batch_yunet_size: int = 8  # letterboxed images of one canvas size
    batch_yunet_delay_ms: float = 0.0
    batch_yunet_capacity: int = 256
    batch_embedder_size: int = 8
    batch_embedder_delay_ms: float = 0.0
    batch_embedder_capacity: int = 256  # face chips

    def similarity_coefficients(self) -> tuple[float, float]:
        """(c0, c1): the configured ones, else those fitted on the dev pairs with this detector."""
        c0, c1 = SIMILARITY_COEFFICIENTS["mtcnn" if self.detector == "mtcnn" else "yunet"]
        return (c0 if self.similarity_c0 is None else self.similarity_c0,
                c1 if self.similarity_c1 is None else self.similarity_c1)

    def face_threshold(self) -> float:
        """det_prob_threshold, or the detector's default when it is unset."""
        if self.det_prob_threshold is not None:
            return self.det_prob_threshold
        return MTCNN_DET_PROB_THRESHOLD if self.detector == "mtcnn" else YUNET_DET_PROB_THRESHOLD

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        """Defaults, then FR_<FIELD> environment variables, then explicit overrides (non-None)."""
        values = {}
        for f in fields(cls):
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

    # ---- how inference uses the machine: the auto values of the settings above, intra_op_threads
    # here, model_instances and inflight_limit in server/inference/__init__.py (they depend on
    # whether inference runs on this machine's cores, which only the backends can tell: runs_on_cpu).
    # One stream per core on 1-thread sessions does more images/s than one stream on a session with
    # a thread per core: ONNX Runtime's intra-op threads split MTCNN's small convolutions poorly
    # (docs/benchmarks.md, Threads and instances). So with the micro-batcher, each model runs as one
    # single-threaded instance per core (as Triton's instance groups do), and one request per
    # instance (plus one) runs inference: more requests in flight cost more CPU each (GIL and cache
    # contention), and throughput ranked the same way (docs/benchmarks.md, Requests in flight).
    # Remote backends (Triton on GPUs) need many requests in flight to form large batches.
    def intra_op_threads(self) -> int:
        if self.inference_threads:
            return self.inference_threads
        return 1 if self.batching else 0  # 0: onnxruntime's default, one per core


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's cpuset), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _coerce(type_name, raw: str):
    t = str(type_name)
    if "int" in t and "Path" not in t:
        return int(raw)
    if "float" in t:
        return float(raw)
    if "bool" in t:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    return raw
