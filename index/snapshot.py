"""Snapshot files of a VectorIndex: the format, written atomically, read and checked.

Snapshot: `<name>` (the manifest: header, sha256, and for a flat base the labels + vectors, for a
graph base the dead labels) and, for a graph base, `<name>.<token>.graph` (hnswlib's own file,
whose size and sha256 the manifest records). Both are written to temp files, fsynced and renamed;
the manifest last, so a crash leaves the old snapshot whole. hnswlib loads its file directly.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import struct
import tempfile
from pathlib import Path

import numpy as np

from .exact import _Flat
from .graph import _Graph

__all__ = ["IndexCorrupt", "snapshot_files"]


class IndexCorrupt(Exception):
    """A snapshot file is missing, truncated, fails its checksum, or does not fit the parameters."""


_HASH_CHUNK = 1 << 20

# Manifest: header, then payload (flat: labels int64[count] + vectors float32[count, dim];
# graph: dead labels int64[dead]). The header's last field is the sha256 of everything before it
# plus the payload; the graph file's size and sha256 are fields of the header.
_MAGIC = b"FRHNSW\r\n"  # \r\n catches text-mode mangling, like PNG's signature
_VERSION = 2
_HEADER = struct.Struct("<8sIIqQQqQQ32s16s32s")
# magic, version, dim, sequence, count, dead, top, elements, graph_size, graph_sha256, graph_token, sha256
_GRAPH_SUFFIX = ".graph"


def snapshot_files(path: Path) -> list[Path]:
    """Every file of the snapshot at `path`: the manifest and its graph files (current or stale)."""
    path = Path(path)
    prefix = path.name + "."
    out = [path] if path.exists() else []
    if path.parent.is_dir():
        out += [p for p in path.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(_GRAPH_SUFFIX)]
    return out


def _graph_name(path: Path, token: str) -> str:
    return f"{path.name}.{token}{_GRAPH_SUFFIX}"


def _write_snapshot(path: Path, base: _Flat | _Graph, dim: int, sequence: int) -> None:
    directory = path.parent
    graph_name, graph_size, graph_sha, token = "", 0, b"\0" * 32, ""
    if isinstance(base, _Graph):
        token = secrets.token_hex(8)
        graph_name = _graph_name(path, token)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".graph.tmp", dir=directory)
        os.close(fd)
        try:
            base.g.save_index(tmp)
            graph_size, graph_sha = _fsync_and_hash(tmp)
            os.replace(tmp, directory / graph_name)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        _fsync_dir(directory)
        dead = np.fromiter(base.dead, np.int64, len(base.dead))
        payload = [_raw(dead, "<i8")]
        fields = (_MAGIC, _VERSION, dim, sequence, base.count, dead.size, base.top, base.elements, graph_size,
                  graph_sha, token.encode("ascii"))
    else:
        labels, vectors = base.live()
        payload = [_raw(labels, "<i8"), _raw(vectors, "<f4")]
        fields = (_MAGIC, _VERSION, dim, sequence, labels.size, 0, -1, 0, 0, graph_sha, b"")
    digest = hashlib.sha256(_HEADER.pack(*fields, b"\0" * 32)[:-32])
    for part in payload:
        digest.update(part)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(_HEADER.pack(*fields, digest.digest()))
            for part in payload:
                out.write(part)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:  # e.g. ENOSPC: the old manifest and its graph stay as they were
        _unlink_quietly(tmp)
        if graph_name:  # the new graph no manifest names: give its space back at once
            _unlink_quietly(directory / graph_name)
        raise
    _fsync_dir(directory)
    for stale in snapshot_files(path):  # graphs of earlier snapshots (or of crashed saves)
        if stale != path and stale.name != graph_name:
            _unlink_quietly(stale)


def _read_manifest(path: Path) -> tuple[dict, memoryview]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise IndexCorrupt(f"{path}: cannot read ({e})") from e
    if len(data) < _HEADER.size:
        raise IndexCorrupt(f"{path}: truncated header")
    magic, version, dim, sequence, count, dead, top, elements, graph_size, graph_sha, token, stored = \
        _HEADER.unpack_from(data)
    if magic != _MAGIC or version != _VERSION:
        raise IndexCorrupt(f"{path}: not an index snapshot of version {_VERSION} (magic/version)")
    view = memoryview(data)
    digest = hashlib.sha256(view[: _HEADER.size - 32])
    digest.update(view[_HEADER.size :])
    if digest.digest() != stored:
        raise IndexCorrupt(f"{path}: checksum mismatch")
    text = token.rstrip(b"\0").decode("ascii", "replace")
    if text and not all(c in "0123456789abcdef" for c in text):
        raise IndexCorrupt(f"{path}: bad graph token {text!r}")
    graph_name = _graph_name(path, text) if text else ""
    expected = 8 * dead if graph_name else count * (8 + 4 * dim)
    if len(data) - _HEADER.size != expected or dim <= 0:
        raise IndexCorrupt(f"{path}: payload of {len(data) - _HEADER.size} bytes, expected {expected}")
    meta = dict(dim=dim, sequence=sequence, count=count, dead=dead, top=top, elements=elements,
                graph_size=graph_size, graph_sha256=graph_sha, graph_name=graph_name)
    return meta, view[_HEADER.size :]


def _check_file(path: Path, size: int, sha: bytes) -> None:
    try:
        actual = path.stat().st_size
        if actual != size:
            raise IndexCorrupt(f"{path}: size {actual} != expected {size}")
        digest = _hash_file(path)
    except OSError as e:
        raise IndexCorrupt(f"{path}: cannot read ({e})") from e
    if digest.digest() != sha:
        raise IndexCorrupt(f"{path}: checksum mismatch")


def _hash_file(path: str | Path, fsync: bool = False) -> "hashlib._Hash":
    # one reused buffer: reading the file in fresh chunks would leave freed megabytes in the heap
    digest = hashlib.sha256()
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
        if fsync:
            os.fsync(f.fileno())
    return digest


def _fsync_and_hash(path: str) -> tuple[int, bytes]:
    digest = _hash_file(path, fsync=True)
    return os.path.getsize(path), digest.digest()


def _raw(array: np.ndarray, dtype: str) -> np.ndarray:
    """Little-endian bytes of an array as a flat uint8 view (no copy on little-endian hosts)."""
    return np.ascontiguousarray(array, dtype=dtype).reshape(-1).view(np.uint8)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str | Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
