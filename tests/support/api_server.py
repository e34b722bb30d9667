"""A real server for end-to-end API tests: uvicorn in a thread on 127.0.0.1, an ephemeral port.

    with LiveServer(settings) as server:       # returns once /ready answers 200
        client = server.client()              # httpx.Client with base_url
        key = server.create_key("recognition")

Test modules use `live_server(...)` in a module-scoped fixture: one server per module.
"""
from __future__ import annotations

import io
import socket
import threading
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import uvicorn
from PIL import Image

from tests.support.local_server import wait_ready
from server.http.app import create_app
from server.config import Settings

ADMIN_TOKEN = "test-admin-token-0123456789"
START_TIMEOUT_S = 180.0  # the first start may build the model repository


class LiveServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted sockets only when the listening
        # socket says TCP explicitly; without it every response waits ~40 ms for a delayed ACK.
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name=f"uvicorn-{self.port}", daemon=True)

    def __enter__(self) -> "LiveServer":
        self._thread.start()
        wait_ready(self.base_url, START_TIMEOUT_S,
                   died=lambda: None if self._thread.is_alive() else "the server thread died during start-up")
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()

    @property
    def state(self):
        return self.app.state.core

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=120, **kwargs)

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.settings.admin_token}"}

    def create_key(self, key_type: str, name: str = "") -> str:
        with self.client() as c:
            r = c.post("/api/v1/admin/keys", json={"type": key_type, "name": name}, headers=self.admin_headers())
        assert r.status_code == 201, r.text
        return r.json()["key"]


def live_server(tmp_dir: Path, model_dir: Path, **overrides) -> LiveServer:
    values = dict(data_dir=tmp_dir, model_dir=model_dir, host="127.0.0.1", port=0, admin_token=ADMIN_TOKEN)
    # FR_* variables apply (FR_DETECTOR=mtcnn runs the API tests on MTCNN); the test's values win
    settings = Settings.from_env(**{**values, **overrides})
    return LiveServer(settings)


# ------------------------------------------------------------------------------- test images
def encode(image: np.ndarray, fmt: str = "JPEG", **save_args) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **save_args)
    return buf.getvalue()


def astronaut() -> np.ndarray:
    """skimage's astronaut (Eileen Collins): one face, 512x512 RGB."""
    from skimage import data

    return data.astronaut()


def side_by_side(*images: np.ndarray) -> np.ndarray:
    h = max(i.shape[0] for i in images)
    padded = [np.pad(i, ((0, h - i.shape[0]), (0, 0), (0, 0))) for i in images]
    return np.concatenate(padded, axis=1)


def blank(size: int = 256, value: int = 200) -> np.ndarray:
    return np.full((size, size, 3), value, np.uint8)


def chunks(data: bytes, size: int = 65536) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]
