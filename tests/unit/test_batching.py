"""MicroBatcher: batching semantics on tiny real ONNX models (tests/integration/test_batcher_pipeline.py runs the real face pipeline through it)."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import anyio
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from server.inference.base import BackendError
from server.inference.onnxruntime import OnnxRuntimeBackend
from server.inference.batcher import BatchPolicy, MicroBatcher, create_batcher, policies_from_settings
from server.inference.scope import Cancelled, DeadlineExceeded, Overloaded, current_scope, request_scope
from server.config import Settings
from server.http.errors import api_error
from server.metrics import Metrics


# ---------------------------------------------------------------------------- tiny models
def _double_model(width: int | str) -> onnx.ModelProto:
    """y = 2 * x, x: float32 [N, width] (width may be symbolic: any width)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y"])], "double", [x], [y], [two])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_repo")
    for name, model in {"double": _double_model("W"), "double4": _double_model(4)}.items():
        (root / name / "1").mkdir(parents=True)
        onnx.save(model, str(root / name / "1" / "model.onnx"))
    return root


@pytest.fixture(scope="module")
def ort(tiny_repo):
    backend = OnnxRuntimeBackend(tiny_repo, threads=1)
    yield backend
    backend.close()


class Recording:
    """Passes every call to the real backend; records the batch shapes it sends; can hold calls at a gate."""

    name = "recording"

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls: list[tuple[str, tuple[int, ...]]] = []
        self.threads: list[str] = []  # name of the thread that ran each call
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def run(self, model, inputs):
        self.calls.append((model, next(iter(inputs.values())).shape))
        self.threads.append(threading.current_thread().name)
        self.entered.set()
        assert self.gate.wait(20), "test gate never opened"
        return self.inner.run(model, inputs)

    def close(self) -> None:
        pass


def _rows(seed: int, n: int, width: int = 4) -> np.ndarray:
    return (seed * 1000 + np.arange(n * width, dtype=np.float32)).reshape(n, width)


def _batcher(ort, metrics: Metrics | None = None, **policy) -> tuple[MicroBatcher, Recording]:
    rec = Recording(ort)
    return MicroBatcher(rec, {}, default=BatchPolicy(**policy), metrics=metrics, owns_inner=False), rec


def _in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    """Run fn in a thread; the dict gets 'result' or 'error' and 'elapsed'."""
    box: dict = {}

    def target() -> None:
        t0 = time.perf_counter()
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc
        box["elapsed"] = time.perf_counter() - t0

    th = threading.Thread(target=target)
    th.start()
    return th, box


def _wait_for(predicate, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.002)


# ---------------------------------------------------------------------------- batching
def test_concurrent_callers_get_exactly_their_rows(ort):
    batcher, rec = _batcher(ort, max_batch_size=32, max_queue_delay_ms=5)
    errors: list[BaseException] = []
    start = threading.Barrier(16)

    def worker(k: int) -> None:
        rng = np.random.default_rng(k)
        start.wait()
        try:
            for i in range(15):
                x = _rows(k * 100 + i, int(rng.integers(1, 6)))
                y = batcher.run("double", {"x": x})["y"]
                assert y.shape == x.shape and np.array_equal(y, 2 * x)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    batcher.close()
    assert not errors, errors[0]
    stats = batcher.stats("double")
    assert stats["rows"] == sum(shape[0] for _, shape in rec.calls)
    assert stats["batches"] == len(rec.calls) < 16 * 15
    assert stats["mean_batch"] > 1.5
    assert all(shape[0] <= 32 for _, shape in rec.calls)


def test_single_caller_waits_about_the_window(ort):
    batcher, _ = _batcher(ort, max_batch_size=64, max_queue_delay_ms=30)
    batcher.run("double", {"x": _rows(0, 1)})  # load the session outside the timing
    t0 = time.perf_counter()
    y = batcher.run("double", {"x": _rows(1, 2)})["y"]
    elapsed = time.perf_counter() - t0
    assert np.array_equal(y, 2 * _rows(1, 2))
    assert 0.029 <= elapsed < 0.030 + 0.1  # waited for company, but not much longer
    batcher.close()

    eager, _ = _batcher(ort, max_batch_size=64, max_queue_delay_ms=0)
    eager.run("double", {"x": _rows(0, 1)})
    t0 = time.perf_counter()
    eager.run("double", {"x": _rows(1, 1)})
    assert time.perf_counter() - t0 < 0.05
    eager.close()


def test_full_batch_goes_without_waiting_for_the_window(ort):
    batcher, rec = _batcher(ort, max_batch_size=4, max_queue_delay_ms=10_000)
    jobs = [_in_thread(batcher.run, "double", {"x": _rows(k, 1)}) for k in range(4)]
    for th, _ in jobs:
        th.join(5)
    for k, (_, box) in enumerate(jobs):
        assert box["elapsed"] < 5 and np.array_equal(box["result"]["y"], 2 * _rows(k, 1))
    assert rec.calls == [("double", (4, 4))]
    batcher.close()


def test_idle_model_runs_in_callers_thread_busy_model_queues(ort):
    for instances in (1, 2):
        batcher, rec = _batcher(ort, max_batch_size=64, max_queue_delay_ms=0, instances=instances)
        rec.gate.clear()
        first = [_in_thread(batcher.run, "double", {"x": _rows(k, 1)}) for k in range(instances)]
        _wait_for(lambda: len(rec.calls) == instances)  # idle slots: run at once, by the callers
        assert all(not name.startswith("batcher-") for name in rec.threads)
        later = [_in_thread(batcher.run, "double", {"x": _rows(k, 1)}) for k in (10, 11)]
        _wait_for(lambda: batcher.stats("double")["queued_rows"] == 2)
        time.sleep(0.05)
        assert len(rec.calls) == instances  # no more than `instances` batches at once
        rec.gate.set()
        for th, _ in first + later:
            th.join(5)
        for k, (_, box) in zip([*range(instances), 10, 11], first + later):
            assert np.array_equal(box["result"]["y"], 2 * _rows(k, 1))
        # the two that waited went together, from a dispatcher thread
        assert rec.calls[instances:] == [("double", (2, 4))]
        assert rec.threads[instances].startswith("batcher-double-")
        batcher.close()


def test_only_matching_shapes_are_batched_together(ort):
    batcher, rec = _batcher(ort, max_batch_size=64, max_queue_delay_ms=300)
    widths = [4, 6, 4, 6, 9, 4]
    jobs = [_in_thread(batcher.run, "double", {"x": _rows(k, 2, w)}) for k, w in enumerate(widths)]
    for th, _ in jobs:
        th.join(5)
    for k, ((_, box), w) in enumerate(zip(jobs, widths)):
        assert np.array_equal(box["result"]["y"], 2 * _rows(k, 2, w))
    # one batch per width; every batch is homogeneous because ORT would reject mixed widths anyway
    assert sorted(shape for _, shape in rec.calls) == [(2, 9), (4, 6), (6, 4)]
    batcher.close()


def test_oversize_item_is_split_into_max_size_batches(ort):
    batcher, rec = _batcher(ort, max_batch_size=4, max_queue_delay_ms=0)
    x = _rows(3, 10)
    y = batcher.run("double", {"x": x})["y"]
    assert np.array_equal(y, 2 * x)
    assert [shape[0] for _, shape in rec.calls] == [4, 4, 2]
    # no deadlock when a big item meets small ones
    jobs = [_in_thread(batcher.run, "double", {"x": _rows(k, n)}) for k, n in enumerate([9, 1, 13, 2])]
    for th, _ in jobs:
        th.join(5)
    for k, ((_, box), n) in enumerate(zip(jobs, [9, 1, 13, 2])):
        assert np.array_equal(box["result"]["y"], 2 * _rows(k, n))
    assert all(shape[0] <= 4 for _, shape in rec.calls)
    batcher.close()


def test_inner_error_reaches_every_caller_and_dispatcher_survives(ort):
    metrics = Metrics()
    batcher, rec = _batcher(ort, metrics, max_batch_size=16, max_queue_delay_ms=300)
    # double4 only takes width 4: ORT rejects the width-5 batch
    bad = [_in_thread(batcher.run, "double4", {"x": _rows(k, 1, 5)}) for k in range(3)]
    for th, _ in bad:
        th.join(5)
    assert rec.calls == [("double4", (3, 5))]
    for _, box in bad:
        assert isinstance(box["error"], BackendError) and "double4" in str(box["error"])
    # the same dispatcher goes on serving
    good = [_in_thread(batcher.run, "double4", {"x": _rows(k, 2)}) for k in range(3)]
    for th, _ in good:
        th.join(5)
    for k, (_, box) in enumerate(good):
        assert np.array_equal(box["result"]["y"], 2 * _rows(k, 2))
    assert metrics.registry.get_sample_value("facerec_inference_errors_total", {"model": "double4"}) == 1
    # a model the repository lacks: the backend's own error, every time
    for _ in range(2):
        with pytest.raises(BackendError, match="not found"):
            batcher.run("missing_model", {"x": _rows(0, 1)})
    batcher.close()


def test_overloaded_is_immediate_and_recovers(ort):
    metrics = Metrics()
    rec = Recording(ort)
    policy = BatchPolicy(max_batch_size=1, max_queue_delay_ms=0, queue_capacity=4)
    batcher = MicroBatcher(rec, {"double": policy}, metrics=metrics, owns_inner=False)
    rec.gate.clear()
    first = _in_thread(batcher.run, "double", {"x": _rows(0, 1)})
    assert rec.entered.wait(5)  # the dispatcher is busy with the first call
    queued = [_in_thread(batcher.run, "double", {"x": _rows(k, 1)}) for k in range(1, 5)]
    _wait_for(lambda: batcher.stats("double")["queued_rows"] == 4)
    t0 = time.perf_counter()
    with pytest.raises(Overloaded) as info:
        batcher.run("double", {"x": _rows(9, 1)})
    assert time.perf_counter() - t0 < 0.05
    answer = api_error(info.value)  # the HTTP answer to it (server/http/errors.py)
    assert info.value.retry_after_s >= 1 and answer.status == 503
    assert "retry after" in answer.message
    rec.gate.set()
    for k, (th, box) in enumerate([first, *queued]):
        th.join(5)
        assert np.array_equal(box["result"]["y"], 2 * _rows(k, 1))
    assert np.array_equal(batcher.run("double", {"x": _rows(9, 1)})["y"], 2 * _rows(9, 1))
    assert metrics.registry.get_sample_value("facerec_batch_rejected_total", {"model": "double"}) == 1
    batcher.close()


def test_expired_work_is_dropped_before_dispatch(ort):
    batcher, rec = _batcher(ort, max_batch_size=1, max_queue_delay_ms=0)
    rec.gate.clear()
    first = _in_thread(batcher.run, "double", {"x": _rows(0, 1)})
    assert rec.entered.wait(5)
    late = _in_thread(batcher.run, "double", {"x": _rows(1, 1)}, deadline=time.monotonic() + 0.1)
    late[0].join(5)
    assert isinstance(late[1]["error"], DeadlineExceeded)
    assert 0.09 < late[1]["elapsed"] < 1.0
    assert batcher.stats("double")["queued_rows"] == 0  # freed while the dispatcher was still busy
    rec.gate.set()
    first[0].join(5)
    assert np.array_equal(first[1]["result"]["y"], 2 * _rows(0, 1))
    assert np.array_equal(batcher.run("double", {"x": _rows(2, 1)})["y"], 2 * _rows(2, 1))
    assert len(rec.calls) == 2  # the expired item never reached the model
    with pytest.raises(DeadlineExceeded):  # already past: refused at the door
        batcher.run("double", {"x": _rows(3, 1)}, deadline=time.monotonic() - 1)
    batcher.close()


def test_scope_deadline_reaches_worker_threads_through_anyio(ort):
    batcher, rec = _batcher(ort, max_batch_size=1, max_queue_delay_ms=0)
    rec.gate.clear()
    first = _in_thread(batcher.run, "double", {"x": _rows(0, 1)})
    assert rec.entered.wait(5)

    async def request() -> BaseException | None:
        with request_scope(timeout_s=0.1) as scope:
            assert current_scope() is scope
            try:
                await anyio.to_thread.run_sync(batcher.run, "double", {"x": _rows(1, 1)})
            except DeadlineExceeded as exc:
                return exc
        return None

    assert isinstance(anyio.run(request), DeadlineExceeded)
    assert current_scope() is None
    rec.gate.set()
    first[0].join(5)
    assert len(rec.calls) == 1
    batcher.close()


def test_cancel_frees_queued_work(ort):
    batcher, rec = _batcher(ort, max_batch_size=1, max_queue_delay_ms=0)
    rec.gate.clear()
    first = _in_thread(batcher.run, "double", {"x": _rows(0, 1)})
    assert rec.entered.wait(5)
    scopes: list = []

    def request() -> dict:
        with request_scope() as scope:
            scopes.append(scope)
            return batcher.run("double", {"x": _rows(1, 3)})

    th, box = _in_thread(request)
    _wait_for(lambda: batcher.stats("double")["queued_rows"] == 3)
    scopes[0].cancel()
    th.join(5)
    assert isinstance(box["error"], Cancelled)
    assert batcher.stats("double")["queued_rows"] == 0
    with request_scope() as scope:  # a cancelled scope refuses further work at once
        scope.cancel()
        with pytest.raises(Cancelled):
            batcher.run("double", {"x": _rows(2, 1)})
    rec.gate.set()
    first[0].join(5)
    assert len(rec.calls) == 1
    batcher.close()


def test_close_fails_queued_work_and_stops_dispatchers(ort):
    batcher, rec = _batcher(ort, max_batch_size=1, max_queue_delay_ms=0)
    rec.gate.clear()
    running = _in_thread(batcher.run, "double", {"x": _rows(0, 1)})
    assert rec.entered.wait(5)
    queued = _in_thread(batcher.run, "double", {"x": _rows(1, 1)})
    _wait_for(lambda: batcher.stats("double")["queued_rows"] == 1)
    closing = _in_thread(batcher.close)
    queued[0].join(5)
    assert isinstance(queued[1]["error"], BackendError) and "closed" in str(queued[1]["error"])
    rec.gate.set()  # the running batch finishes and is delivered
    running[0].join(5)
    closing[0].join(5)
    assert np.array_equal(running[1]["result"]["y"], 2 * _rows(0, 1))
    assert not closing[0].is_alive() and "error" not in closing[1]
    assert not any(t.name.startswith("batcher-double") for t in threading.enumerate())
    with pytest.raises(BackendError, match="closed"):
        batcher.run("double", {"x": _rows(2, 1)})


def test_mixed_traffic_with_deadlines_and_cancels_never_hangs_or_mixes_rows(ort):
    batcher, _ = _batcher(ort, max_batch_size=8, max_queue_delay_ms=1, queue_capacity=10_000, instances=2)
    outcomes: dict[str, int] = {"ok": 0, "deadline": 0, "cancelled": 0}
    errors: list[BaseException] = []
    lock = threading.Lock()
    scopes: list = []

    def worker(k: int) -> None:
        rng = np.random.default_rng(k)
        for i in range(30):
            x = _rows(k * 100 + i, int(rng.integers(1, 12)), int(rng.choice([4, 6])))  # some split
            timeout = float(rng.choice([0.0005, 0.005, 5.0]))
            try:
                with request_scope(timeout_s=timeout) as scope:
                    with lock:
                        scopes.append(scope)
                    y = batcher.run("double", {"x": x})["y"]
                assert np.array_equal(y, 2 * x)
                kind = "ok"
            except DeadlineExceeded:
                kind = "deadline"
            except Cancelled:
                kind = "cancelled"
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                return
            with lock:
                outcomes[kind] += 1

    def canceller() -> None:
        rng = np.random.default_rng(99)
        for _ in range(100):
            with lock:
                victim = scopes[int(rng.integers(len(scopes)))] if scopes else None
            if victim is not None:
                victim.cancel()
            time.sleep(0.001)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(12)]
    threads.append(threading.Thread(target=canceller))
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert not any(t.is_alive() for t in threads), "a caller hung"
    assert not errors, errors[0]
    assert sum(outcomes.values()) == 12 * 30
    assert outcomes["ok"] > 100 and outcomes["deadline"] > 0
    assert batcher.stats("double")["queued_rows"] == 0
    assert batcher._queues["double"].running == 0
    batcher.close()


def test_policies_from_settings_and_switch():
    s = Settings()
    policies = policies_from_settings(s)
    assert set(policies) - {"face_age", "face_gender"} == {"face_detector_pnet", "face_detector_rnet",
                                                          "face_detector_onet", "face_detector_yunet",
                                                          "face_embedder"}
    assert (policies["face_age"].max_batch_size, policies["face_gender"].max_batch_size) == (s.batch_age_size,
                                                                                             s.batch_gender_size)
    assert policies["face_detector_yunet"].max_batch_size == s.batch_yunet_size
    assert policies["face_embedder"].max_batch_size == s.batch_embedder_size
    assert isinstance(create_batcher(object(), s.with_(batching=True)), MicroBatcher)
    inner = object()
    assert create_batcher(inner, s.with_(batching=False)) is inner
    with pytest.raises(ValueError):
        BatchPolicy(max_batch_size=0)
