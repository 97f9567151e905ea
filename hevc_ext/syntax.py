"""Bit-level syntax in the style of the HEVC specification: ``u(n)``, ``ue(v)``, ``se(v)``.

Writers never fail on valid values; readers raise :class:`~hevc_ext.errors.SideStreamError` on any
overrun or out-of-range value, so a damaged stream is rejected with one error type.
"""

from __future__ import annotations

from .errors import SideStreamError

MAX_UE_LEADING_ZEROS = 32


class BitWriter:
    """MSB-first bit writer."""

    def __init__(self) -> None:
        self._bytes = bytearray()
        self._acc = 0
        self._nbits = 0

    def u(self, n: int, value: int) -> None:
        """Unsigned integer in ``n`` bits."""
        if n < 0 or value < 0 or (n < 64 and value >> n):
            raise ValueError(f"u({n}) cannot hold {value}")
        for i in range(n - 1, -1, -1):
            self._acc = (self._acc << 1) | ((value >> i) & 1)
            self._nbits += 1
            if self._nbits == 8:
                self._bytes.append(self._acc)
                self._acc = 0
                self._nbits = 0

    def flag(self, value: bool) -> None:
        self.u(1, int(bool(value)))

    def ue(self, value: int) -> None:
        """Unsigned Exp-Golomb code."""
        if value < 0:
            raise ValueError(f"ue(v) cannot hold {value}")
        v = value + 1
        length = v.bit_length()
        self.u(length - 1, 0)
        self.u(length, v)

    def se(self, value: int) -> None:
        """Signed Exp-Golomb code (HEVC mapping: 1 → 1, −1 → 2, 2 → 3...)."""
        self.ue(2 * value - 1 if value > 0 else -2 * value)

    def byte_align(self) -> None:
        """Pad with zero bits to the next byte boundary."""
        if self._nbits:
            self.u(8 - self._nbits, 0)

    def raw(self, data: bytes) -> None:
        if self._nbits:
            raise ValueError("raw bytes need byte alignment")
        self._bytes += data

    @property
    def bit_position(self) -> int:
        return len(self._bytes) * 8 + self._nbits

    def getvalue(self) -> bytes:
        if self._nbits:
            raise ValueError("stream is not byte-aligned")
        return bytes(self._bytes)


class BitReader:
    """MSB-first bit reader over ``data``; ``what`` names the structure in error messages."""

    def __init__(self, data: bytes, what: str = "side stream") -> None:
        self._data = data
        self._pos = 0
        self.what = what

    @property
    def bits_left(self) -> int:
        return len(self._data) * 8 - self._pos

    @property
    def byte_position(self) -> int:
        return (self._pos + 7) // 8

    def u(self, n: int) -> int:
        if n > self.bits_left:
            raise SideStreamError(f"{self.what}: truncated (needs {n} more bits, {self.bits_left} left)")
        value = 0
        for _ in range(n):
            byte = self._data[self._pos >> 3]
            value = (value << 1) | ((byte >> (7 - (self._pos & 7))) & 1)
            self._pos += 1
        return value

    def flag(self) -> bool:
        return bool(self.u(1))

    def ue(self) -> int:
        zeros = 0
        while self.u(1) == 0:
            zeros += 1
            if zeros > MAX_UE_LEADING_ZEROS:
                raise SideStreamError(f"{self.what}: invalid Exp-Golomb code")
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self) -> int:
        k = self.ue()
        return (k + 1) // 2 if k & 1 else -(k // 2)

    def byte_align(self) -> None:
        pad = (-self._pos) % 8
        if self.u(pad) != 0:
            raise SideStreamError(f"{self.what}: non-zero alignment bits")

    def raw(self, n: int) -> bytes:
        if self._pos % 8:
            raise SideStreamError(f"{self.what}: raw bytes at an unaligned position")
        start = self._pos // 8
        if start + n > len(self._data):
            raise SideStreamError(f"{self.what}: truncated (needs {n} bytes, {len(self._data) - start} left)")
        self._pos += 8 * n
        return bytes(self._data[start:start + n])

    def rest(self) -> bytes:
        """All remaining bytes (from a byte-aligned position)."""
        return self.raw(len(self._data) - self._pos // 8)

    def expect_end(self) -> None:
        if self.bits_left:
            raise SideStreamError(f"{self.what}: {self.bits_left} unexpected trailing bits")

    def ranged_ue(self, name: str, lo: int, hi: int) -> int:
        value = self.ue()
        if not lo <= value <= hi:
            raise SideStreamError(f"{self.what}: {name} = {value} out of range {lo}..{hi}")
        return value

    def ranged_u(self, n: int, name: str, lo: int, hi: int) -> int:
        value = self.u(n)
        if not lo <= value <= hi:
            raise SideStreamError(f"{self.what}: {name} = {value} out of range {lo}..{hi}")
        return value
