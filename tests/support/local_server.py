"""A real server in a child process: `python -m server serve` on a free local port.

    with LocalServer(data_dir, env={"FR_BATCH_PNET_CAPACITY": "16"}) as srv:   # waits for /ready
        key = srv.create_key("recognition")          # through the CLI (`python -m server keys create`)
        httpx.get(srv.base_url + "/health")
        srv.rss_bytes(); srv.log_text()              # the child's memory and its log (stderr + stdout)
        srv.console_urls()                           # the page URLs with the admin token it printed
        srv.proc_stats()                             # rss, fds, sockets, threads from /proc

Without `admin_token` no --admin-token is passed: the server then uses (and on an empty data dir
creates) <data_dir>/admin-token, and prints the page's URL holding it (server/http/admin_token.py).

A separate process (not a thread of the caller) so that a load generator does not share the
server's GIL and cores' accounting, the server's memory can be read from /proc, and its log
output is exactly what an operator would see.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Mapping

import httpx

ROOT = Path(__file__).resolve().parents[2]
# the one line server/http/admin_token.py prints: "Admin console (admin token ... <file>): <url>"
CONSOLE_LINE = re.compile(r"^Admin console \(admin token [^)]*\): (http://\S+/ui/#admin=\S+)$", re.MULTILINE)
START_TIMEOUT_S = 240.0  # the first start may build the model repository


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base_url: str, timeout_s: float, died: Callable[[], str | None], poll_s: float = 0.1) -> None:
    """Poll GET /ready until 200. RuntimeError when `died()` names a reason, when /ready reports a
    failed start, or after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=base_url, timeout=5) as c:
        while time.monotonic() < deadline:
            reason = died()
            if reason:
                raise RuntimeError(reason)
            try:
                r = c.get("/ready")
                if r.status_code == 200:
                    return
                if "failed" in r.json().get("reason", ""):
                    raise RuntimeError(f"the server is not ready: {r.text}")
            except httpx.TransportError:
                pass
            time.sleep(poll_s)
    raise RuntimeError(f"the server did not become ready in {timeout_s:.0f} s")


class LocalServer:
    def __init__(
        self,
        data_dir: Path,
        *,
        admin_token: str = "",
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        verbose: bool = False,
        seed_demo_keys: bool = False,
        log_path: Path | None = None,
        python: str = sys.executable,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.admin_token = admin_token
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.python = python
        self.log_path = Path(log_path) if log_path else self.data_dir / "server.log"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.args = [python, "-m", "server"] + (["-v"] if verbose else []) + [
            "serve", "--host", "127.0.0.1", "--port", str(self.port), "--data-dir", str(self.data_dir)]
        if admin_token:
            self.args += ["--admin-token", admin_token]
        if seed_demo_keys:
            self.args.append("--seed-demo-keys")
        self.proc: subprocess.Popen | None = None
        self._log = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout_s: float = START_TIMEOUT_S) -> "LocalServer":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            wait_ready(self.base_url, timeout_s, died=lambda: None if self.proc.poll() is None
                       else f"the server exited with {self.proc.returncode}")
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"{exc}\n{self.log_tail()}") from None
        return self

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (uvicorn's graceful shutdown: index snapshots, storage closed), then SIGKILL."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ observation
    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_bytes(self) -> int:
        """Resident memory of the server process (Linux /proc)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("VmRSS not found")

    def proc_stats(self) -> dict[str, int]:
        """rss (bytes), fds, sockets, threads of the server process now (see proc_stats)."""
        return proc_stats(self.pid)

    def log_text(self) -> str:
        if self._log is not None:
            self._log.flush()
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def console_urls(self) -> list[str]:
        """Every page URL with the admin token the server printed at its starts (this log), oldest first."""
        return CONSOLE_LINE.findall(self.log_text())

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # ------------------------------------------------------------------ keys
    def create_key(self, key_type: str, name: str = "") -> str:
        """A new API key through the CLI, on the server's data dir (works at once: misses are not cached)."""
        return create_key_cli(self.data_dir, key_type, name=name, python=self.python, env=self.env)

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=kwargs.pop("timeout", 60), **kwargs)


def proc_stats(pid: int) -> dict[str, int]:
    """What a process holds now (Linux /proc): rss (bytes), fds, sockets (fds that are sockets:
    connections and listeners), threads."""
    stats = {"rss": 0, "threads": 0}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            stats["rss"] = int(line.split()[1]) * 1024
        elif line.startswith("Threads:"):
            stats["threads"] = int(line.split()[1])
    fds = sockets = 0
    for fd in os.scandir(f"/proc/{pid}/fd"):
        fds += 1
        try:
            sockets += os.readlink(fd.path).startswith("socket:")
        except OSError:  # closed meanwhile
            pass
    return {**stats, "fds": fds, "sockets": sockets}


def create_key_cli(data_dir: Path, key_type: str, *, name: str = "", python: str = sys.executable,
                   env: Mapping[str, str] | None = None) -> str:
    args = [python, "-m", "server", "keys", "create", "--type", key_type, "--data-dir", str(data_dir)]
    if name:
        args += ["--name", name]
    out = subprocess.run(args, cwd=ROOT, env=dict(env or os.environ), capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"`{' '.join(args)}` failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout.strip().splitlines()[-1]


def create_key_admin(base_url: str, admin_token: str, key_type: str, name: str = "") -> str:
    """A new API key through the admin API of a running server (needs its admin token)."""
    r = httpx.post(f"{base_url}/api/v1/admin/keys", json={"type": key_type, "name": name},
                   headers={"Authorization": f"Bearer {admin_token}"}, timeout=30)
    if r.status_code != 201:
        raise RuntimeError(f"creating a {key_type} key through the admin API failed: {r.status_code} {r.text}")
    return r.json()["key"]
