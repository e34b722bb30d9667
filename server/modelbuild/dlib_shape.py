"""Reader for dlib's `shape_predictor` files (../shared/docs/models.md, section 4) and the .npz cache.

Layout of the file (dlib/image_processing/shape_predictor.h, serialize()):
    int version (1)
    matrix<float,0,1> initial_shape            # (2*parts, 1): x0, y0, x1, y1, ... normalised to the box
    vector<vector<regression_tree>> forests     # levels x trees
        tree = vector<split_feature> splits     # split = ulong idx1, ulong idx2, float thresh
               vector<matrix<float,0,1>> leaf_values
    vector<vector<ulong>> anchor_idx            # levels x feature pixels
    vector<vector<vector<float,2>>> deltas      # levels x feature pixels x (x, y)

Every item of that format is one integer token (a float is two: mantissa, exponent), so the
file is tokenised in a single tight loop and the token stream is then cut into dense arrays
with numpy.  That keeps parsing to about a second instead of many seconds of per-value calls.
"""
from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np

from server.modelbuild.dlib_format import DlibFormatError

# Fixed member order (and timestamp, see write_npz) so conversions are byte-identical.
NPZ_KEYS = ("initial_shape", "split_idx1", "split_idx2", "thresh", "leaves", "anchor_idx", "deltas")

_EXP_POS_INF, _EXP_NEG_INF, _EXP_NAN = 32000, 32001, 32002
_NPZ_TIMESTAMP = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip member can carry


def _tokenize(data: bytes) -> np.ndarray:
    """All integer tokens of a dlib stream, in order (control byte: bit 7 sign, low nibble length)."""
    out: list[int] = []
    append = out.append
    from_bytes = int.from_bytes
    n = len(data)
    pos = 0
    while pos < n:
        ctrl = data[pos]
        if ctrl & 0x70:
            raise DlibFormatError(f"bad integer control byte {ctrl:#x} at {pos}")
        k = ctrl & 0x0F
        end = pos + 1 + k
        if k > 8 or end > n:
            raise DlibFormatError(f"unexpected end of data at byte {pos} (integer of {k} bytes)")
        if k == 1:  # the common case, without a slice object
            v = data[pos + 1]
        else:
            v = from_bytes(data[pos + 1 : end], "little")
        append(-v if ctrl & 0x80 else v)
        pos = end
    try:
        return np.array(out, dtype=np.int64)
    except OverflowError as e:  # an 8-byte magnitude beyond int64: not a shape predictor
        raise DlibFormatError(f"integer out of range: {e}") from None


class _Tokens:
    """Cursor over the token array with the few structural reads the format needs."""

    def __init__(self, tokens: np.ndarray) -> None:
        self.t = tokens
        self.pos = 0

    def take(self, count: int) -> np.ndarray:
        if self.pos + count > len(self.t):
            raise DlibFormatError(f"unexpected end of data (token {self.pos}, wanted {count})")
        out = self.t[self.pos : self.pos + count]
        self.pos += count
        return out

    def integer(self) -> int:
        return int(self.take(1)[0])

    def count(self, what: str) -> int:
        v = self.integer()
        if v < 0:
            raise DlibFormatError(f"negative {what} count {v}")
        return v

    def expect(self, value: int, what: str) -> None:
        v = self.integer()
        if v != value:
            raise DlibFormatError(f"{what}: expected {value}, found {v}")


def _floats(pairs: np.ndarray) -> np.ndarray:
    """(..., 2) int tokens (mantissa, exponent) -> float64 values m * 2**e, dlib's special exponents kept."""
    m = pairs[..., 0]
    e = pairs[..., 1]
    special = e >= _EXP_POS_INF
    out = np.ldexp(m.astype(np.float64), np.where(special, 0, e).astype(np.int32))
    if special.any():
        out = np.where(e == _EXP_POS_INF, math.inf, out)
        out = np.where(e == _EXP_NEG_INF, -math.inf, out)
        out = np.where(e == _EXP_NAN, math.nan, out)
    return out


def _check_all(block: np.ndarray, expected: int, what: str) -> None:
    if block.size and not np.all(block == expected):
        raise DlibFormatError(f"{what}: expected {expected} everywhere (non-uniform model?)")


def parse_shape_predictor(data: bytes) -> dict[str, np.ndarray]:
    """Dense arrays of a serialized dlib shape_predictor (see read_shape_predictor)."""
    if not data:
        raise DlibFormatError("empty shape predictor file")
    tok = _Tokens(_tokenize(data))
    tok.expect(1, "shape_predictor version")

    nr, nc = -tok.integer(), -tok.integer()  # dlib writes matrix dimensions negated
    if nr <= 0 or nc != 1 or nr % 2:
        raise DlibFormatError(f"bad initial_shape dimensions {nr}x{nc}")
    initial_shape = _floats(tok.take(2 * nr).reshape(nr, 2)).reshape(-1, 2)
    n_parts = nr // 2

    n_levels = tok.count("cascade level")
    if n_levels == 0:
        raise DlibFormatError("shape predictor without cascade levels")
    # The first tree fixes the geometry; every other tree must match it (dense arrays).
    start = tok.pos
    n_trees = tok.count("tree")
    n_splits = tok.count("split")
    tok.take(4 * n_splits)  # idx1, idx2, thresh mantissa, thresh exponent
    n_leaves = tok.count("leaf")
    if n_leaves != n_splits + 1 or n_leaves & (n_leaves - 1):
        raise DlibFormatError(f"tree with {n_splits} splits and {n_leaves} leaves is not a full binary tree")
    tok.pos = start

    leaf_len = 2 + 2 * nr  # -nr, -1, then nr floats
    tree_len = 1 + 4 * n_splits + 1 + n_leaves * leaf_len
    level_len = 1 + n_trees * tree_len
    levels = tok.take(n_levels * level_len).reshape(n_levels, level_len)
    _check_all(levels[:, 0], n_trees, "trees per level")
    trees = levels[:, 1:].reshape(n_levels, n_trees, tree_len)
    _check_all(trees[:, :, 0], n_splits, "splits per tree")
    splits = trees[:, :, 1 : 1 + 4 * n_splits].reshape(n_levels, n_trees, n_splits, 4)
    _check_all(trees[:, :, 1 + 4 * n_splits], n_leaves, "leaves per tree")
    leaf_tok = trees[:, :, 2 + 4 * n_splits :].reshape(n_levels, n_trees, n_leaves, leaf_len)
    _check_all(leaf_tok[..., 0], -nr, "leaf rows")
    _check_all(leaf_tok[..., 1], -1, "leaf columns")
    leaves = _floats(leaf_tok[..., 2:].reshape(n_levels, n_trees, n_leaves, nr, 2))

    split_idx1 = splits[..., 0]
    split_idx2 = splits[..., 1]
    thresh = _floats(splits[..., 2:4])

    tok.expect(n_levels, "anchor_idx levels")
    n_pix = tok.count("feature pixel")
    anchor_block = tok.take(n_levels * (1 + n_pix) - 1)
    anchor_idx = np.concatenate([[n_pix], anchor_block]).reshape(n_levels, 1 + n_pix)
    _check_all(anchor_idx[:, 0], n_pix, "feature pixels per level")
    anchor_idx = anchor_idx[:, 1:]

    tok.expect(n_levels, "deltas levels")
    delta_block = tok.take(n_levels * (1 + 4 * n_pix)).reshape(n_levels, 1 + 4 * n_pix)
    _check_all(delta_block[:, 0], n_pix, "deltas per level")
    deltas = _floats(delta_block[:, 1:].reshape(n_levels, n_pix, 2, 2))

    if tok.pos != len(tok.t):
        raise DlibFormatError(f"{len(tok.t) - tok.pos} trailing tokens after the shape predictor")
    for name, idx, bound in (("split_idx1", split_idx1, n_pix), ("split_idx2", split_idx2, n_pix),
                             ("anchor_idx", anchor_idx, n_parts)):
        if idx.size and (idx.min() < 0 or idx.max() >= bound):
            raise DlibFormatError(f"{name} out of range [0, {bound})")

    return {
        "initial_shape": initial_shape.astype(np.float32),
        "split_idx1": split_idx1.astype(np.int32),
        "split_idx2": split_idx2.astype(np.int32),
        "thresh": thresh.astype(np.float32),
        "leaves": leaves.astype(np.float32).reshape(n_levels, n_trees, n_leaves, nr),
        "anchor_idx": anchor_idx.astype(np.int32),
        "deltas": deltas.astype(np.float32),
    }


def read_shape_predictor(path: str | Path) -> dict[str, np.ndarray]:
    """Parse a dlib shape_predictor .dat into dense arrays (levels L, trees T, splits S, pixels P):

    initial_shape (parts,2) f32, split_idx1/split_idx2 (L,T,S) i32, thresh (L,T,S) f32,
    leaves (L,T,S+1,2*parts) f32 (x0,y0,x1,y1,...), anchor_idx (L,P) i32, deltas (L,P,2) f32.
    Raises DlibFormatError when the bytes are not a complete shape predictor.
    """
    return parse_shape_predictor(Path(path).read_bytes())


def write_npz(arrays: dict[str, np.ndarray], out_npz_path: str | Path) -> Path:
    """np.savez's layout (stored, zip64 .npy members) with a fixed member timestamp.

    np.savez stamps each member with the current time, so two conversions a second apart
    would differ; pinning the timestamp makes equal inputs give byte-identical files,
    which np.load reads like any other .npz.
    """
    out = Path(out_npz_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with zipfile.ZipFile(tmp, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key in NPZ_KEYS:
            info = zipfile.ZipInfo(key + ".npy", date_time=_NPZ_TIMESTAMP)
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as fid:
                np.lib.format.write_array(fid, np.ascontiguousarray(arrays[key]), allow_pickle=False)
    tmp.replace(out)
    return out


def convert_shape_predictor(dat_path: str | Path, out_npz_path: str | Path) -> Path:
    """Parse the .dat and write its arrays as an uncompressed .npz (deterministic bytes)."""
    return write_npz(read_shape_predictor(dat_path), out_npz_path)


def load_shape_predictor_npz(npz_path: str | Path) -> dict[str, np.ndarray]:
    """The arrays written by convert_shape_predictor."""
    with np.load(npz_path, allow_pickle=False) as z:
        missing = [k for k in NPZ_KEYS if k not in z.files]
        if missing:
            raise DlibFormatError(f"{npz_path} lacks {missing}")
        return {k: z[k] for k in NPZ_KEYS}
