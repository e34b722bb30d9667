"""End-to-end throughput of the HTTP server against the raw in-process pipeline, in one run.

    python -m benchmarks.server [--clients 1,8,32,64] [--seconds 20] [--repeat 1]
                               [--backend onnxruntime|triton|torch] [--client lean|httpx]

Starts the real server (a subprocess on a free 127.0.0.1 port, fresh data dir), enrols the
astronaut, then for each client count posts a 1-face 640x480 JPEG to /recognize as fast as the
clients can for --seconds, and reports requests/s, p50, p99 and the mean batch size per model
(from /metrics). It also measures the raw pipeline in-process (JPEG bytes -> decode -> detect ->
align -> embed, as the server does; no HTTP, no batcher) at its best batch size, both as one
stream on sessions with a thread per core and as one stream per core on single-threaded
sessions, and prints the ratios the batching issue asks for against the best of
all of them (vs_raw_best) and against the best single stream. The load generator shares the
machine with the server: on 2 cores its CPU time is part of the measurement, so by default it
writes pre-encoded requests on raw sockets (`--client httpx` for a full HTTP client).
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from benchmarks.common import fit_image, markdown_table
from server.config import Settings, usable_cores
from server.inference import names
from server.wiring import build_inference

ADMIN = "bench-admin-token"


def sample_jpeg() -> bytes:
    """The astronaut fitted into 640x480: a 1-face JPEG."""
    from skimage.data import astronaut

    buf = io.BytesIO()
    Image.fromarray(fit_image(astronaut(), 640, 480)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def batch_means(metrics_text: str) -> dict[str, tuple[float, float]]:
    """model -> (sum of rows, number of calls) from facerec_batch_size_rows."""
    out: dict[str, list[float]] = {}
    for m in re.finditer(r'^\w*batch_size_rows_(sum|count)\{model="([^"]+)"\} ([0-9.e+]+)$', metrics_text, re.M):
        kind, model, value = m.groups()
        out.setdefault(model, [0.0, 0.0])[0 if kind == "sum" else 1] = float(value)
    return {k: (v[0], v[1]) for k, v in out.items()}


async def load(base: str, key: str, jpeg: bytes, clients: int, seconds: float, client: str = "lean") -> dict:
    """`clients` connections posting the JPEG to /recognize back to back for `seconds`."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    stop = time.perf_counter() + seconds

    async def worker(post) -> None:
        while time.perf_counter() < stop:
            t = time.perf_counter()
            status, body = await post()
            latencies.append((time.perf_counter() - t) * 1000)
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200 and b'"subject"' not in body:
                raise AssertionError(f"recognize found no subject: {body[:200]!r}")

    t0 = time.perf_counter()
    if client == "httpx":
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as http:
            async def post() -> tuple[int, bytes]:
                r = await http.post("/api/v1/recognition/recognize", headers={"x-api-key": key},
                                    files={"file": ("face.jpg", jpeg, "image/jpeg")})
                return r.status_code, r.content

            await asyncio.gather(*(worker(post) for _ in range(clients)))
    else:
        url, request = httpx.URL(base), lean_request(base, key, jpeg)
        connections = [LeanConnection(url.host, url.port, request) for _ in range(clients)]
        try:
            await asyncio.gather(*(worker(c.post) for c in connections))
        finally:
            for c in connections:
                c.close()
    elapsed = time.perf_counter() - t0
    ok = statuses.get(200, 0)
    return {"clients": clients, "requests": len(latencies), "ok": ok, "req_per_s": ok / elapsed,
            "p50_ms": float(np.percentile(latencies, 50)), "p99_ms": float(np.percentile(latencies, 99)),
            "errors": len(latencies) - ok}


class LeanConnection:
    """One keep-alive connection that writes the pre-encoded request and reads the answer
    (reconnecting when the server closes)."""

    def __init__(self, host: str, port: int, request: bytes) -> None:
        self.host, self.port, self.request = host, port, request
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(self.request)
        status, body, close = await read_response(self.reader)
        if close:
            self.close()
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def lean_request(base: str, key: str, jpeg: bytes) -> bytes:
    """The whole HTTP/1.1 request, encoded once: the load generator then only writes bytes and
    reads responses, so it takes little of the CPU that it shares with the server (httpx took
    ~3 ms per request, 4-5 % of a request's cost on 2 cores)."""
    url = httpx.URL(base)
    boundary = "benchboundary7d1a"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"face.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + jpeg + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /api/v1/recognition/recognize HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
            f"x-api-key: {key}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """(status, body, server closes) of one HTTP/1.1 response with a Content-Length."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, body, headers.get("connection", "").lower() == "close"


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RawPipeline:
    """The pipeline in-process (decode, detect batched across images, align, embed: the pipeline
    the models issue defines, from image bytes to descriptors), no HTTP and no batcher, in the two
    ways the machine can run it: one stream of batches on sessions with one intra-op thread per
    core, and one stream per core on single-threaded sessions (as the server's model instances
    run)."""

    def __init__(self, settings: Settings, jpeg: bytes, layouts: tuple[tuple[int, int], ...] | None = None) -> None:
        cores = usable_cores()
        self.settings, self.jpeg = settings, jpeg
        self.layouts: dict[tuple[int, int], list] = {}  # (threads, streams) -> one pipeline per stream
        for threads, streams in layouts or ((cores, 1), (1, cores)):
            s = settings.with_(inference_threads=threads, batching=False)
            self.layouts[(threads, streams)] = [build_inference(s, batching=False, plugins=False).pipeline
                                                for _ in range(streams)]

    def table(self, seconds: float) -> list[dict]:
        rows = []
        for (threads, streams) in self.layouts:
            for batch in ((1, 2, 4, 8) if streams == 1 else (1, 2, 4)):
                rows.append({"streams": streams, "threads": threads, "batch": batch,
                             "images_per_s": self.measure(threads, streams, batch, seconds)})
        return rows

    def measure(self, threads: int, streams: int, batch: int, seconds: float) -> float:
        """images/s of `streams` threads, each running batches of `batch` images for `seconds`."""
        import threading

        from server.vision.decode import decode_image

        threshold = self.settings.face_threshold()

        def once(pipeline) -> None:
            images = [decode_image(self.jpeg) for _ in range(batch)]
            dets = pipeline.detector.detect_batch(images)
            chips = []
            for im, det in zip(images, dets):
                keep = det.probs > threshold
                chips.append(pipeline.face_chips(im, det.boxes[keep], det.landmarks[keep]))
            pipeline.embed_chips(np.concatenate(chips))

        pipelines = self.layouts[(threads, streams)]
        counts = [0] * streams
        for p in pipelines:
            once(p)  # warm-up
        stop = time.perf_counter() + seconds

        def worker(i: int) -> None:
            while time.perf_counter() < stop:
                once(pipelines[i])
                counts[i] += batch

        workers = [threading.Thread(target=worker, args=(i,)) for i in range(streams)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return sum(counts) / (time.perf_counter() - t0)


def level_ratios(rows: list[dict]) -> dict[int, dict]:
    """Per client count: the median over rounds of its req/s and of each ratio, each ratio taken
    within one round (against that round's 1-client level, or the measurements right after it)."""
    one = {r["round"]: r["req_per_s"] for r in rows if r["clients"] == 1}
    per: dict[int, list[dict]] = {}
    for r in rows:
        per.setdefault(r["clients"], []).append({
            "req_per_s": r["req_per_s"], "vs_raw_best": r["req_per_s"] / r["raw_best"],
            "vs_raw_one_stream": r["req_per_s"] / r["raw_one_stream"],
            "vs_1_client": r["req_per_s"] / one[r["round"]] if r["round"] in one else float("nan"),
            "vs_1_client_adjacent": r["req_per_s"] / r["one_client"]})
    return {n: {"rounds": len(v), **{k: statistics.median(x[k] for x in v) for k in v[0]}} for n, v in per.items()}


def compare_detectors(args: argparse.Namespace, env_extra: dict[str, str]) -> dict:
    """The detector issue's figures: two servers, FR_DETECTOR=yunet and FR_DETECTOR=mtcnn, loaded in
    turn at each client count (their order alternating by round), and the raw in-process pipeline's
    per-image time with each detector (one stream, one image at a time) for the 1-client latency."""
    from tests.support.local_server import LocalServer, create_key_admin

    jpeg = sample_jpeg()
    detectors = ("yunet", "mtcnn")
    tmp = Path(tempfile.mkdtemp(prefix="bench-detectors-"))
    report: dict = {"env": env_extra, "raw_ms": {}, "levels": []}
    base_settings = Settings.from_env()
    for name in detectors:  # single-image latency of the raw pipeline, 1 thread per session as the server
        raw = RawPipeline(base_settings.with_(detector=name), jpeg, layouts=((1, 1),))
        report["raw_ms"][name] = 1000.0 / raw.measure(1, 1, 1, args.seconds / 2)
    servers = {name: LocalServer(tmp / name, admin_token=ADMIN, env={**env_extra, "FR_DETECTOR": name})
               for name in detectors}
    keys = {}
    try:
        for name, srv in servers.items():
            srv.start()
            keys[name] = create_key_admin(srv.base_url, ADMIN, "recognition", "bench")
            with httpx.Client(base_url=srv.base_url, timeout=10) as c:
                c.post("/api/v1/recognition/faces", params={"subject": "astronaut"}, headers={"x-api-key": keys[name]},
                       files={"file": ("a.jpg", jpeg, "image/jpeg")}).raise_for_status()
            asyncio.run(load(srv.base_url, keys[name], jpeg, 2, 3, args.client))  # warm-up
        for rnd in range(args.repeat):
            for n in (int(x) for x in args.clients.split(",")):
                order = detectors if rnd % 2 == 0 else detectors[::-1]
                row: dict = {"round": rnd, "clients": n}
                for name in order:
                    srv = servers[name]
                    with httpx.Client(base_url=srv.base_url, timeout=10) as c:
                        before = batch_means(c.get("/metrics").text)
                        got = asyncio.run(load(srv.base_url, keys[name], jpeg, n, args.seconds, args.client))
                        after = batch_means(c.get("/metrics").text)
                    row[f"{name}_req_per_s"] = got["req_per_s"]
                    row[f"{name}_p50_ms"] = got["p50_ms"]
                    row[f"{name}_p99_ms"] = got["p99_ms"]
                    det_model = names.YUNET if name == "yunet" else names.PNET
                    s0, c0 = before.get(det_model, (0.0, 0.0))
                    s1, c1 = after.get(det_model, (0.0, 0.0))
                    row[f"{name}_det_batch"] = (s1 - s0) / (c1 - c0) if c1 > c0 else 0.0
                row["ratio"] = row["yunet_req_per_s"] / max(row["mtcnn_req_per_s"], 1e-9)
                report["levels"].append(row)
                print(f"  round {rnd + 1}, {n} clients: yunet {row['yunet_req_per_s']:.1f} req/s, mtcnn "
                      f"{row['mtcnn_req_per_s']:.1f} req/s, ratio {row['ratio']:.2f}", flush=True)
    finally:
        for srv in servers.values():
            srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n# recognize, 1-face 640x480 JPEG, one server per detector, taking turns\n")
    print(markdown_table(report["levels"], {k: ".1f" for k in report["levels"][0] if k.endswith(("_s", "_ms"))}
                         | {"ratio": ".2f", "yunet_det_batch": ".2f", "mtcnn_det_batch": ".2f"}))
    summary = []
    for n in sorted({r["clients"] for r in report["levels"]}):
        rows = [r for r in report["levels"] if r["clients"] == n]
        summary.append({"clients": n, "rounds": len(rows),
                        "yunet_req_per_s": statistics.median(r["yunet_req_per_s"] for r in rows),
                        "mtcnn_req_per_s": statistics.median(r["mtcnn_req_per_s"] for r in rows),
                        "ratio": statistics.median(r["ratio"] for r in rows),
                        "yunet_p50_ms": statistics.median(r["yunet_p50_ms"] for r in rows),
                        "mtcnn_p50_ms": statistics.median(r["mtcnn_p50_ms"] for r in rows)})
    report["summary"] = summary
    print("\n## medians over rounds (ratio taken within each round)\n")
    print(markdown_table(summary, {"yunet_req_per_s": ".1f", "mtcnn_req_per_s": ".1f", "ratio": ".2f",
                                   "yunet_p50_ms": ".1f", "mtcnn_p50_ms": ".1f"}))
    print(f"\nraw in-process pipeline, one image at a time (1 thread): "
          + ", ".join(f"{k} {v:.1f} ms" for k, v in report["raw_ms"].items()))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.server")
    parser.add_argument("--clients", default="1,8,32,64")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--repeat", type=int, default=1, help="rounds over all client levels; the summary gives medians")
    parser.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "triton", "torch"],
                        help="the server's backend; the raw pipeline runs on torch too for torch, else onnxruntime")
    parser.add_argument("--client", default="lean", choices=["lean", "httpx"],
                        help="load generator: pre-encoded requests on raw asyncio sockets (default) or httpx")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server (e.g. FR_BATCHING=0)")
    parser.add_argument("--compare-detectors", action="store_true",
                        help="FR_DETECTOR=yunet against FR_DETECTOR=mtcnn, taking turns (onnxruntime)")
    parser.add_argument("--out", help="also write the report as JSON")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    jpeg = sample_jpeg()
    env_extra = dict(e.split("=", 1) for e in args.env)
    if args.compare_detectors:
        report = compare_detectors(args, env_extra)
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2))
        return 0
    if args.backend == "torch":
        env_extra["FR_BACKEND"] = "torch"
        settings = settings.with_(backend="torch")
    triton = None
    tmp = Path(tempfile.mkdtemp(prefix="bench-server-"))
    if args.backend == "triton":
        from server.modelbuild.repository import build
        from tests.support.triton_server import TritonServer, skip_reason

        if skip_reason():
            print(skip_reason())
            return 2
        repo = tmp / "triton-repo"
        build(repo, target="python")
        triton = TritonServer.start(repo, tmp / "triton.log")
        env_extra.update(FR_BACKEND="triton", FR_TRITON_URL=triton.grpc_url)
    # The raw pipeline first (every layout and batch size), to find its best configurations; then
    # after each client level the best ones again, so that each ratio compares measurements taken
    # minutes apart at most (a shared machine's speed drifts by tens of percent over a run).
    raw = RawPipeline(settings, jpeg)
    report: dict = {"backend": args.backend, "env": env_extra, "levels": []}
    report["raw_pipeline"] = raw.table(args.seconds / 4)
    best_cfg = max(report["raw_pipeline"], key=lambda r: r["images_per_s"])
    one_cfg = max((r for r in report["raw_pipeline"] if r["streams"] == 1), key=lambda r: r["images_per_s"])
    cfg = lambda r: (r["threads"], r["streams"], r["batch"])  # noqa: E731

    # the server in a child process, so the load generator below does not share its GIL
    from tests.support.local_server import LocalServer, create_key_admin

    server = LocalServer(tmp, admin_token=ADMIN, env=env_extra)
    base = server.base_url
    try:
        server.start()
        key = create_key_admin(base, ADMIN, "recognition", "bench")
        with httpx.Client(base_url=base, timeout=10) as c:
            c.post("/api/v1/recognition/faces", params={"subject": "astronaut"}, headers={"x-api-key": key},
                   files={"file": ("a.jpg", jpeg, "image/jpeg")}).raise_for_status()
            asyncio.run(load(base, key, jpeg, 2, 3, args.client))  # warm-up
            for rnd, n in ((r, int(x)) for r in range(args.repeat) for x in args.clients.split(",")):
                before = batch_means(c.get("/metrics").text)
                cpu0 = (_cpu_s(server.proc.pid), sum(os.times()[:2]))
                row = asyncio.run(load(base, key, jpeg, n, args.seconds, args.client))
                cpu1 = (_cpu_s(server.proc.pid), sum(os.times()[:2]))
                after = batch_means(c.get("/metrics").text)
                # where the machine's time goes, per answered request: the server process (HTTP,
                # decoding, inference, search) and this load generator, which share the cores
                row["server_cpu_ms"] = (cpu1[0] - cpu0[0]) * 1000 / max(1, row["requests"])
                row["loadgen_cpu_ms"] = (cpu1[1] - cpu0[1]) * 1000 / max(1, row["requests"])
                for model in sorted(after):
                    s0, n0 = before.get(model, (0.0, 0.0))
                    calls = after[model][1] - n0
                    short = model.replace("face_detector_", "").replace("face_", "")
                    row[f"batch_{short}"] = (after[model][0] - s0) / calls if calls else 0.0
                # one client again right away: the "vs 1 client" ratio then compares measurements
                # seconds apart, not minutes (the machine's speed drifts, as for the raw pipeline)
                row["one_client"] = (row["req_per_s"] if n == 1 else
                                     asyncio.run(load(base, key, jpeg, 1, args.seconds / 2, args.client))["req_per_s"])
                # the idle server holds no core while the raw pipeline runs beside it
                row["raw_best"] = raw.measure(*cfg(best_cfg), args.seconds / 2)
                row["raw_one_stream"] = raw.measure(*cfg(one_cfg), args.seconds / 2)
                row["round"] = rnd
                report["levels"].append(row)
                print(f"  round {rnd + 1}, {n} clients: {row['req_per_s']:.1f} req/s, p50 {row['p50_ms']:.0f} ms; raw best "
                      f"{row['raw_best']:.1f} images/s", flush=True)
    finally:
        server.stop()
        if triton:
            triton.stop()
        shutil.rmtree(tmp, ignore_errors=True)  # the server's data dir and logs
    print(f"\n# server benchmark: recognize, 1-face 640x480 JPEG, backend {args.backend} {env_extra or ''}\n")
    print(markdown_table(report["levels"], {"req_per_s": ".1f", "p50_ms": ".0f", "p99_ms": ".0f",
                                            "server_cpu_ms": ".1f", "loadgen_cpu_ms": ".1f", "one_client": ".1f",
                                            "raw_best": ".1f", "raw_one_stream": ".1f"}))
    print("\n## raw pipeline in-process (JPEG decode -> detect -> align -> embed; no HTTP, no batcher), before the server runs\n")
    print(markdown_table(report["raw_pipeline"], {"images_per_s": ".1f"}))
    print(f"\nbest: {best_cfg['streams']} stream(s) x {best_cfg['threads']} thread(s), batch {best_cfg['batch']}; "
          f"best single stream: batch {one_cfg['batch']} (raw_best / raw_one_stream above: the same, re-measured "
          f"right after each level)")
    ratios = level_ratios(report["levels"])
    print("\n## per client count, median over rounds (ratios taken within a round; vs_1_client: against the "
          "round's 1-client level; _adjacent: against 1 client re-measured right after this level)\n")
    print(markdown_table([{"clients": n, **v} for n, v in ratios.items()],
                         {"req_per_s": ".1f", "vs_raw_best": ".2f", "vs_raw_one_stream": ".2f", "vs_1_client": ".2f",
                          "vs_1_client_adjacent": ".2f"}))
    report["ratios"] = ratios
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
