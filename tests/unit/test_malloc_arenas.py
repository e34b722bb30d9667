"""limit_malloc_arenas (server/http/app.py): the serving process caps glibc's malloc arenas, so worker
threads that come and go share a few arenas instead of each keeping pages of its own. Counted for
real: eight threads malloc at once in a fresh interpreter, and glibc's malloc_info lists the heaps."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = r"""
import ctypes, sys, tempfile, threading
from server.http.app import limit_malloc_arenas
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.fopen.restype, libc.fopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes, libc.fclose.argtypes = [ctypes.c_int, ctypes.c_void_p], [ctypes.c_void_p]
limited = limit_malloc_arenas(int(sys.argv[1]))
barrier = threading.Barrier(8)
def work():
    libc.malloc(4096)
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
with tempfile.NamedTemporaryFile("r") as out:
    f = libc.fopen(out.name.encode(), b"w")
    libc.malloc_info(0, f)
    libc.fclose(f)
    print(limited, out.read().count("<heap nr="))
"""

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="malloc arenas and malloc_info are glibc's")


def probe(arenas: int, **env: str) -> tuple[bool, int]:
    environ = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | env
    out = subprocess.run([sys.executable, "-c", PROBE, str(arenas)], cwd=ROOT, env=environ, capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    return out[0] == "True", int(out[1])


def test_two_arenas_are_shared_by_many_threads():
    assert probe(2) == (True, 2)


def test_zero_keeps_glibcs_default_of_an_arena_per_thread():
    limited, heaps = probe(0)
    assert not limited and heaps > 2


def test_malloc_arena_max_in_the_environment_wins():
    assert probe(2, MALLOC_ARENA_MAX="4") == (False, 4)
