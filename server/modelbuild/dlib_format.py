"""Reader for dlib's binary serialization format (see ../shared/docs/models.md, section 1).

Only the primitives live here; readers for particular networks build on `DlibReader`.
"""
from __future__ import annotations

import math

import numpy as np


class DlibFormatError(ValueError):
    """The bytes do not follow dlib's serialization format."""


class DlibReader:
    """Sequential reader over the bytes of a dlib-serialized file."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    @classmethod
    def from_file(cls, path) -> "DlibReader":
        with open(path, "rb") as f:
            return cls(f.read())

    def at_end(self) -> bool:
        return self.pos == len(self.data)

    def raw(self, n: int) -> bytes:
        if n < 0:  # a corrupt (negative) count would otherwise move the cursor backwards
            raise DlibFormatError(f"negative length {n} at byte {self.pos}")
        if self.pos + n > len(self.data):
            raise DlibFormatError(f"unexpected end of data at byte {self.pos} (wanted {n})")
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def integer(self) -> int:
        """Any integral type: control byte (bit 7 = sign, low nibble = byte count), then |v| LE."""
        ctrl = self.raw(1)[0]
        if ctrl & 0x70:
            raise DlibFormatError(f"bad integer control byte {ctrl:#x} at {self.pos - 1}")
        n = ctrl & 0x0F
        if n > 8:
            raise DlibFormatError(f"integer of {n} bytes at {self.pos - 1}")
        value = int.from_bytes(self.raw(n), "little") if n else 0
        return -value if ctrl & 0x80 else value

    def boolean(self) -> bool:
        c = self.raw(1)
        if c not in (b"0", b"1"):
            raise DlibFormatError(f"bad bool {c!r} at {self.pos - 1}")
        return c == b"1"

    def real(self) -> float:
        """float/double: int64 mantissa first, then int16 exponent; value = m * 2**e."""
        if self.pos >= len(self.data):  # truncated file: a format error, not an IndexError
            raise DlibFormatError(f"unexpected end of data at byte {self.pos} (wanted a float)")
        if self.data[self.pos] & 0x70:
            raise DlibFormatError("legacy ASCII float encoding is not supported")
        mantissa = self.integer()
        exponent = self.integer()
        if exponent == 32000:
            return math.inf
        if exponent == 32001:
            return -math.inf
        if exponent == 32002:
            return math.nan
        return math.ldexp(mantissa, exponent)

    def string(self) -> str:
        n = self.integer()
        return self.raw(n).decode("latin-1")

    def expect_string(self, *allowed: str) -> str:
        s = self.string()
        if s not in allowed:
            raise DlibFormatError(f"expected one of {allowed}, found {s!r} at {self.pos}")
        return s

    def matrix(self) -> np.ndarray:
        """dlib matrix: nr and nc written negated, then the values row-major (as floats)."""
        nr = -self.integer()
        nc = -self.integer()
        if nr < 0 or nc < 0:
            raise DlibFormatError(f"bad matrix shape {nr}x{nc}")
        vals = [self.real() for _ in range(nr * nc)]
        return np.asarray(vals, dtype=np.float64).reshape(nr, nc)

    def tensor(self) -> np.ndarray:
        """resizable_tensor: int 2, n, k, nr, nc, then raw little-endian float32 (NCHW)."""
        version = self.integer()
        if version != 2:
            raise DlibFormatError(f"unsupported tensor version {version}")
        n, k, nr, nc = (self.integer() for _ in range(4))
        if min(n, k, nr, nc) < 0:  # a negative count would make raw() step backwards
            raise DlibFormatError(f"negative tensor shape {(n, k, nr, nc)} at byte {self.pos}")
        count = n * k * nr * nc
        buf = self.raw(4 * count)
        return np.frombuffer(buf, dtype="<f4").reshape(n, k, nr, nc).copy()

    def alias_tensor(self) -> tuple[int, int, int, int]:
        version = self.integer()
        if version != 1:
            raise DlibFormatError(f"unsupported alias_tensor version {version}")
        return tuple(self.integer() for _ in range(4))  # type: ignore[return-value]

