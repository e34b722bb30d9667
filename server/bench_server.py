"""End-to-end throughput of the HTTP server against the raw in-process pipeline, in one run.

    python -m server.bench_server [--clients 1,8,32,64] [--seconds 20] [--backend onnxruntime|triton]

Starts the real server (a subprocess on a free 127.0.0.1 port, fresh data dir), enrols the
astronaut, then for each client count posts a 1-face 640x480 JPEG to /recognize as fast as the
clients can for --seconds, and reports requests/s, p50, p99 and the mean batch size per model
(from /metrics). It also measures the raw pipeline in-process (no HTTP, no batcher) at its best
batch size, both as one stream on sessions with a thread per core and as one stream per core on
single-threaded sessions, and prints the ratios the batching issue asks for against the best of
all of them (vs_raw_best) and against the best single stream. The load generator shares the
machine with the server: on 2 cores its CPU time is part of the measurement.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from server.bench import _fit, _table
from server.config import Settings

ROOT = Path(__file__).resolve().parents[1]
ADMIN = "bench-admin-token"


def test_image() -> tuple[np.ndarray, bytes]:
    from skimage.data import astronaut

    img = _fit(astronaut(), 640, 480)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return img, buf.getvalue()


def batch_means(metrics_text: str) -> dict[str, tuple[float, float]]:
    """model -> (sum of rows, number of calls) from facerec_batch_size_rows."""
    out: dict[str, list[float]] = {}
    for m in re.finditer(r'^\w*batch_size_rows_(sum|count)\{model="([^"]+)"\} ([0-9.e+]+)$', metrics_text, re.M):
        kind, model, value = m.groups()
        out.setdefault(model, [0.0, 0.0])[0 if kind == "sum" else 1] = float(value)
    return {k: (v[0], v[1]) for k, v in out.items()}


async def load(base: str, key: str, jpeg: bytes, clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        async def worker() -> None:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                r = await client.post("/api/v1/recognition/recognize", headers={"x-api-key": key},
                                      files={"file": ("face.jpg", jpeg, "image/jpeg")})
                latencies.append((time.perf_counter() - t) * 1000)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    ok = statuses.get(200, 0)
    return {"clients": clients, "requests": len(latencies), "ok": ok, "req_per_s": ok / elapsed,
            "p50_ms": float(np.percentile(latencies, 50)), "p99_ms": float(np.percentile(latencies, 99)),
            "errors": len(latencies) - ok}


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raw_pipeline(settings: Settings, img: np.ndarray, seconds: float) -> list[dict]:
    """In-process detect (batched across images) + embed, no HTTP and no batcher, in the two ways
    the machine can be used: one stream of batches on sessions with one intra-op thread per core,
    and one stream per core on single-threaded sessions (what the server's model instances do)."""
    import threading

    from server.backends import create_backend
    from server.config import usable_cores
    from server.pipeline import FacePipeline
    from server.pipeline.alignment import face_chips, mtcnn_box_to_rect

    cores = usable_cores()
    rows = []
    for threads, streams, batches in ((cores, 1, (1, 2, 4, 8)), (1, cores, (1, 2, 4))):
        s = settings.with_(inference_threads=threads, batching=False)
        pipelines = [FacePipeline.from_settings(s, backend=create_backend(s)) for _ in range(streams)]
        for batch in batches:
            images = [img] * batch

            def once(pipeline: FacePipeline) -> None:
                dets = pipeline.detector.detect_batch(images)
                chips = []
                for im, det in zip(images, dets):
                    rects = [mtcnn_box_to_rect(b) for b in det.boxes[det.probs > settings.det_prob_threshold]]
                    if rects:
                        chips.append(face_chips(im, pipeline.shape_predictor.predict_many(im, rects)))
                pipeline.embed_chips(np.concatenate(chips))

            counts = [0] * streams
            stop = time.perf_counter() + seconds / 4

            def worker(i: int) -> None:
                once(pipelines[i])  # warm-up
                while time.perf_counter() < stop:
                    once(pipelines[i])
                    counts[i] += batch

            workers = [threading.Thread(target=worker, args=(i,)) for i in range(streams)]
            t0 = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            rows.append({"streams": streams, "threads": threads, "batch": batch,
                         "images_per_s": sum(counts) / (time.perf_counter() - t0)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.bench_server")
    parser.add_argument("--clients", default="1,8,32,64")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "triton"])
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server (e.g. FR_BATCHING=0)")
    parser.add_argument("--out", help="also write the report as JSON")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    img, jpeg = test_image()
    env_extra = dict(e.split("=", 1) for e in args.env)
    triton = None
    tmp = Path(tempfile.mkdtemp(prefix="bench-server-"))
    sys.path.insert(0, str(ROOT))  # the repo's test and load-test helpers
    if args.backend == "triton":
        from server.models.repository import build
        from tests.triton_server import TritonServer, skip_reason

        if skip_reason():
            print(skip_reason())
            return 2
        repo = tmp / "triton-repo"
        build(repo, target="python")
        triton = TritonServer.start(repo, tmp / "triton.log")
        env_extra.update(FR_BACKEND="triton", FR_TRITON_URL=triton.grpc_url)
    # the server in a child process, so the load generator below does not share its GIL
    from loadtests.server import LocalServer, create_key_admin

    server = LocalServer(tmp, admin_token=ADMIN, env=env_extra)
    base = server.base_url
    report: dict = {"backend": args.backend, "env": env_extra, "levels": []}
    try:
        server.start()
        key = create_key_admin(base, ADMIN, "recognition", "bench")
        with httpx.Client(base_url=base, timeout=10) as c:
            c.post("/api/v1/recognition/faces", params={"subject": "astronaut"}, headers={"x-api-key": key},
                   files={"file": ("a.jpg", jpeg, "image/jpeg")}).raise_for_status()
            asyncio.run(load(base, key, jpeg, 2, 3))  # warm-up
            for n in (int(x) for x in args.clients.split(",")):
                before = batch_means(c.get("/metrics").text)
                cpu0 = (_cpu_s(server.proc.pid), sum(os.times()[:2]))
                row = asyncio.run(load(base, key, jpeg, n, args.seconds))
                cpu1 = (_cpu_s(server.proc.pid), sum(os.times()[:2]))
                after = batch_means(c.get("/metrics").text)
                # where the machine's time goes, per answered request: the server process (HTTP,
                # decoding, inference, search) and this load generator (httpx), which share the cores
                row["server_cpu_ms"] = (cpu1[0] - cpu0[0]) * 1000 / max(1, row["requests"])
                row["loadgen_cpu_ms"] = (cpu1[1] - cpu0[1]) * 1000 / max(1, row["requests"])
                for model in sorted(after):
                    s0, n0 = before.get(model, (0.0, 0.0))
                    calls = after[model][1] - n0
                    short = model.replace("face_detector_", "").replace("face_", "")
                    row[f"batch_{short}"] = (after[model][0] - s0) / calls if calls else 0.0
                report["levels"].append(row)
                print(f"  {n} clients: {row['req_per_s']:.1f} req/s, p50 {row['p50_ms']:.0f} ms", flush=True)
    finally:
        server.stop()
        if triton:
            triton.stop()
    report["raw_pipeline"] = raw_pipeline(settings, img, args.seconds)
    best = max(r["images_per_s"] for r in report["raw_pipeline"])  # the fastest way to run the pipeline
    best_one_stream = max(r["images_per_s"] for r in report["raw_pipeline"] if r["streams"] == 1)
    levels = {r["clients"]: r for r in report["levels"]}
    print(f"\n# server benchmark: recognize, 1-face 640x480 JPEG, backend {args.backend} {env_extra or ''}\n")
    print(_table(report["levels"], {"req_per_s": ".1f", "p50_ms": ".0f", "p99_ms": ".0f", "server_cpu_ms": ".1f",
                                     "loadgen_cpu_ms": ".1f"}))
    print("\n## raw pipeline in-process (no HTTP, no batcher)\n")
    print(_table(report["raw_pipeline"], {"images_per_s": ".1f"}))
    ratios = {}
    if 1 in levels:
        for n, r in levels.items():
            ratios[n] = {"vs_raw_best": r["req_per_s"] / best, "vs_raw_one_stream": r["req_per_s"] / best_one_stream,
                         "vs_1_client": r["req_per_s"] / levels[1]["req_per_s"]}
        print("\n## ratios\n")
        print(_table([{"clients": n, **v} for n, v in ratios.items()],
                     {"vs_raw_best": ".2f", "vs_raw_one_stream": ".2f", "vs_1_client": ".2f"}))
    report["ratios"] = ratios
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
