"""One-command headless load test: server, keys, locust, reports, pass/fail.

    python -m loadtests.run --users 16 --duration 60s --max-error-ratio 0.01 --max-p99-ms 2000

Without --host it starts a local server (`python -m server serve`, a fresh data dir, a free port)
and creates its keys with the CLI (`python -m server keys create`); with --host it targets a
running server and gets keys from --*-key, or the admin API (--admin-token), or the CLI on the
server's --data-dir. Then it runs locust headless (loadtests/locustfile.py), writes
<out>/<name>_stats.csv, _failures.csv, _stats_history.csv, <name>.html and <name>_summary.json,
prints a summary and exits 1 when the error ratio or the p99 exceeds its threshold (2 when the
run itself could not be made).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.support.local_server import ROOT, LocalServer, create_key_admin, create_key_cli

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
KEY_TYPES = ("recognition", "detection", "verification")


@dataclass
class Summary:
    users: int
    duration: str
    requests: int
    failures: int
    error_ratio: float
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    max_error_ratio: float
    max_p99_ms: float
    passed: bool
    reasons: list[str]
    per_endpoint: list[dict]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=16, help="concurrent locust users (default 16)")
    p.add_argument("--spawn-rate", type=float, default=0, help="users started per second (default: all at once)")
    p.add_argument("--duration", default="60s", help="run time, locust syntax: 30s, 2m, 1h (default 60s)")
    p.add_argument("--max-error-ratio", type=float, default=0.01, help="fail above this failures/requests")
    p.add_argument("--max-p99-ms", type=float, default=2000.0, help="fail above this aggregated p99 (ms)")
    p.add_argument("--out", default=str(ROOT / "loadtests" / "results"), help="report folder")
    p.add_argument("--name", default="", help="report file prefix (default: load-<users>u)")
    p.add_argument("--host", default="", help="target a running server (e.g. http://127.0.0.1:8000)")
    p.add_argument("--admin-token", default=os.environ.get("FR_ADMIN_TOKEN", ""),
                   help="admin token of the target server: keys are created through its admin API")
    p.add_argument("--data-dir", default="", help="data dir: of the started server, or of the target server "
                   "(keys are then created with the CLI)")
    for t in KEY_TYPES:
        p.add_argument(f"--{t}-key", default="", help=f"use this {t} key instead of creating one")
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                   help="settings for the started server, e.g. FR_MAX_WAITING_INFERENCE=8 (repeatable)")
    p.add_argument("--wait", default="", metavar="MIN,MAX", help="think time per user in seconds (default 0)")
    p.add_argument("--seed-faces", type=int, default=4, help="examples enrolled before the run (default 4)")
    return p.parse_args(argv)


def get_keys(args: argparse.Namespace, base_url: str, data_dir: Path | None) -> dict[str, str]:
    keys = {}
    for t in KEY_TYPES:
        given = getattr(args, f"{t}_key")
        if given:
            keys[t] = given
        elif args.host and args.admin_token:
            keys[t] = create_key_admin(base_url, args.admin_token, t, name="loadtest")
        elif data_dir is not None:
            keys[t] = create_key_cli(data_dir, t, name="loadtest")
        else:
            raise SystemExit(f"no {t} key: pass --{t}-key, --admin-token or --data-dir with --host")
    return keys


def run_locust(args: argparse.Namespace, base_url: str, keys: dict[str, str], prefix: Path) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "FR_LOAD_WAIT": args.wait, "FR_LOAD_SEED_FACES": str(args.seed_faces)}
    env.update({f"FR_LOAD_{t.upper()}_KEY": k for t, k in keys.items()})
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
           "--host", base_url, "-u", str(args.users), "-r", str(args.spawn_rate or args.users),
           "-t", args.duration, "--stop-timeout", "30", "--csv", str(prefix), "--csv-full-history",
           "--html", f"{prefix}.html", "--loglevel", "WARNING"]
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def read_stats(prefix: Path) -> tuple[dict, list[dict]]:
    """The Aggregated row and the per-endpoint rows of locust's <prefix>_stats.csv."""
    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    total = next(r for r in rows if r["Name"] == "Aggregated")
    return total, [r for r in rows if r["Name"] != "Aggregated"]


def _num(row: dict, col: str) -> float:
    value = row.get(col, "") or "0"
    return float("nan") if value == "N/A" else float(value)


def evaluate(args: argparse.Namespace, total: dict, endpoints: list[dict]) -> Summary:
    requests = int(_num(total, "Request Count"))
    failures = int(_num(total, "Failure Count"))
    ratio = failures / requests if requests else 1.0
    p99 = _num(total, "99%")
    reasons = []
    if requests == 0:
        reasons.append("no request was made")
    if ratio > args.max_error_ratio:
        reasons.append(f"error ratio {ratio:.4f} > {args.max_error_ratio}")
    if not p99 <= args.max_p99_ms:
        reasons.append(f"p99 {p99:.0f} ms > {args.max_p99_ms:.0f} ms")
    per_endpoint = [{"name": r["Name"], "method": r["Type"], "requests": int(_num(r, "Request Count")),
                     "failures": int(_num(r, "Failure Count")), "rps": round(_num(r, "Requests/s"), 2),
                     "p50_ms": _num(r, "50%"), "p99_ms": _num(r, "99%")} for r in endpoints]
    return Summary(
        users=args.users, duration=args.duration, requests=requests, failures=failures,
        error_ratio=round(ratio, 5), rps=round(_num(total, "Requests/s"), 2), p50_ms=_num(total, "50%"),
        p95_ms=_num(total, "95%"), p99_ms=p99, max_ms=_num(total, "Max Response Time"),
        max_error_ratio=args.max_error_ratio, max_p99_ms=args.max_p99_ms, passed=not reasons, reasons=reasons,
        per_endpoint=per_endpoint,
    )


def print_summary(s: Summary, prefix: Path) -> None:
    print(f"\n{'endpoint':<34} {'reqs':>6} {'fail':>5} {'req/s':>7} {'p50':>6} {'p99':>6}")
    for e in s.per_endpoint:
        print(f"{e['name'][:34]:<34} {e['requests']:>6} {e['failures']:>5} {e['rps']:>7.2f} "
              f"{e['p50_ms']:>6.0f} {e['p99_ms']:>6.0f}")
    print(f"\n{s.users} users, {s.duration}: {s.requests} requests, {s.rps:.2f} req/s, p50 {s.p50_ms:.0f} ms, "
          f"p99 {s.p99_ms:.0f} ms, error ratio {s.error_ratio:.4f}")
    print(f"reports: {prefix}_stats.csv, {prefix}.html, {prefix}_summary.json")
    print("PASS" if s.passed else "FAIL: " + "; ".join(s.reasons))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / (args.name or f"load-{args.users}u")
    server: LocalServer | None = None
    try:
        if args.host:
            base_url = args.host.rstrip("/")
            data_dir = Path(args.data_dir) if args.data_dir else None
        else:
            data_dir = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="facerec-load-"))
            server_env = dict(item.split("=", 1) for item in args.server_env)
            server = LocalServer(data_dir, env=server_env, log_path=Path(f"{prefix}_server.log"))
            print(f"starting a server on {server.base_url} (data {data_dir}, log {server.log_path})", flush=True)
            server.start()
            base_url = server.base_url
        keys = get_keys(args, base_url, data_dir)
        started = time.monotonic()
        code = run_locust(args, base_url, keys, prefix)
        if not Path(f"{prefix}_stats.csv").exists():
            print(f"locust exited with {code} and wrote no statistics", file=sys.stderr)
            return 2
        total, endpoints = read_stats(prefix)
    except (RuntimeError, OSError, StopIteration) as exc:
        print(f"load test could not run: {exc}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            server.stop()
    summary = evaluate(args, total, endpoints)
    Path(f"{prefix}_summary.json").write_text(json.dumps(
        {**asdict(summary), "host": base_url, "wall_s": round(time.monotonic() - started, 1)}, indent=2))
    print_summary(summary, prefix)
    return 0 if summary.passed else 1


if __name__ == "__main__":
    sys.exit(main())
