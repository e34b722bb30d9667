"""A real `tritonserver` (CPU build from the nvidia-pytriton wheel) for the integration tests.

The environment comes from scripts/triton_env.sh (default .venv-triton/, override FR_TRITON_ENV):
its triton/env.json names the binary, the Python backend folder and the library / PATH entries the
Python-backend stub needs. Every port is ephemeral, so tests never collide with a server on 8000-8002.

    server = TritonServer.start(model_repository)   # waits until ready
    server.grpc_url, server.http_url                 # "127.0.0.1:<port>"
    server.stop()
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SETUP_COMMAND = "scripts/triton_env.sh"


def env_dir() -> Path:
    return Path(os.environ.get("FR_TRITON_ENV", ROOT / ".venv-triton"))


def load_env() -> dict | None:
    """The paths written by scripts/triton_env.sh, or None when that environment is missing or broken."""
    try:
        info = json.loads((env_dir() / "triton" / "env.json").read_text())
    except (OSError, ValueError):
        return None
    if not (os.access(info.get("tritonserver", ""), os.X_OK) and Path(info.get("backend_directory", "")).is_dir()):
        return None
    return info


def skip_reason() -> str | None:
    """Why the integration tests cannot run here (None when they can)."""
    try:
        import tritonclient.grpc  # noqa: F401
        import tritonclient.http  # noqa: F401
    except ImportError:
        return "tritonclient is not installed in this venv (pip install -e '.[triton]')"
    if load_env() is None:
        return f"Triton test environment not found at {env_dir()} (run {SETUP_COMMAND})"
    return None


def free_ports(n: int) -> list[int]:
    """n distinct ports the kernel just handed out (bound together so they differ)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class TritonServer:
    process: subprocess.Popen
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @classmethod
    def start(cls, model_repository: Path, log_path: Path, timeout_s: float = 60.0,
              ports: tuple[int, int, int] | None = None, extra_args: tuple[str, ...] = ()) -> "TritonServer":
        """Start tritonserver (HTTP, gRPC, metrics on `ports` or fresh ephemeral ones) and wait until ready."""
        info = load_env()
        if info is None:
            raise RuntimeError(f"no Triton environment at {env_dir()}; run {SETUP_COMMAND}")
        last_error = ""
        for _ in range(1 if ports else 3):  # a port taken between free_ports() and the bind: retry
            http_port, grpc_port, metrics_port = ports or free_ports(3)
            env = dict(os.environ)
            env["LD_LIBRARY_PATH"] = os.pathsep.join(info["ld_library_path"] + [env.get("LD_LIBRARY_PATH", "")])
            # The stub's embedded interpreter takes its site-packages (numpy<2, onnxruntime) from PATH's python3.
            env["PATH"] = os.pathsep.join(info["path"] + [env.get("PATH", "")])
            for var in ("PYTHONHOME", "PYTHONPATH", "VIRTUAL_ENV"):
                env.pop(var, None)
            cmd = [
                info["tritonserver"],
                f"--model-repository={model_repository}",
                f"--backend-directory={info['backend_directory']}",
                f"--http-port={http_port}", f"--grpc-port={grpc_port}", f"--metrics-port={metrics_port}",
                "--http-address=127.0.0.1", "--grpc-address=127.0.0.1",
                "--allow-metrics=false", "--exit-on-error=true", "--strict-readiness=true",
                *extra_args,
            ]
            log = open(log_path, "wb")
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            log.close()
            server = cls(proc, http_port, grpc_port, metrics_port, log_path)
            try:
                server.wait_ready(timeout_s)
                return server
            except RuntimeError as exc:
                server.stop()
                last_error = str(exc)
                if "address already in use" not in last_error.lower():
                    break
        raise RuntimeError(last_error)

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"tritonserver not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
