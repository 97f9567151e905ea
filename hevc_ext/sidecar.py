"""The side stream: a header and one record per segment and channel group (spec: docs/sidecar.md).

The same units travel either in a sidecar file (``MAGIC``, then length-prefixed units) or as SEI
payloads inside the HEVC stream (sei.py). A reader rejects anything malformed with
:class:`~hevc_ext.errors.SideStreamError` and never allocates more than the input justifies.
"""

from __future__ import annotations

import binascii
import enum
import hashlib
import zlib
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Iterable, Iterator, Sequence

import numpy as np

from .arch import Architecture, Group, Packing
from .entropy import decode_network, encode_network
from .errors import MismatchError, SideStreamError, UsageError
from .quant import QuantConfig, QuantizedNetwork
from .syntax import BitReader, BitWriter
from .yuv import MAX_FPS_TERM, sample_dtype  # MAX_FPS_TERM: fps_num, fps_den (each >= 1)

MAGIC = b"HNLF"
VERSION = 1
MODES = ("ra", "ldb", "ldp")
MAX_UNIT = 1 << 16


class RecordType(enum.IntEnum):
    OFF = 0  # segment not filtered for this group
    REUSE = 1  # the group's previous network again
    NEW = 2  # a new network, coded absolutely
    NEW_DIFF = 3  # a new network, coded as the difference to the group's previous one


class HashType(enum.IntEnum):
    NONE = 0
    MD5 = 1
    CRC32 = 2

    @property
    def size(self) -> int:
        return {HashType.NONE: 0, HashType.MD5: 16, HashType.CRC32: 4}[self]


@dataclass(frozen=True)
class StreamHeader:
    width: int
    height: int
    bitdepth: int
    frame_count: int  # 0: not known when the header was written (streaming)
    fps: Fraction
    mode: str
    arch_y: Architecture
    arch_uv: Architecture
    hash_type: HashType
    first_picture_crc: int | None  # CRC-32 of the first unfiltered picture (Y, U, V), if known

    def arch(self, group: Group) -> Architecture:
        return self.arch_y if group is Group.Y else self.arch_uv


@dataclass(frozen=True, eq=False)
class Record:
    type: RecordType
    group: Group
    segment: int
    first_frame: int
    frame_count: int
    output_hash: bytes = b""
    network: QuantizedNetwork | None = None  # NEW / NEW_DIFF: the (absolute) network it carries
    size: int = 0  # bytes of the coded unit (set when written or parsed)

    @property
    def frames(self) -> range:
        return range(self.first_frame, self.first_frame + self.frame_count)


def merge_off_runs(records: Sequence[Record]) -> tuple[list[Record], list[int | None]]:
    """The records with each run of consecutive OFF records of a group (adjacent frames) made one OFF
    record covering them all (up to MAX_COUNT_MINUS1 + 1 pictures), where the run's first one was. Also
    returns, for each record given, the index of its merged record if it heads one, else None."""
    out: list[Record] = []
    heads: list[int | None] = []
    open_run: dict[Group, int] = {}  # group -> index in out of its OFF record still open for merging
    for rec in records:
        k = open_run.get(rec.group)
        if rec.type is RecordType.OFF and k is not None and (
                out[k].first_frame + out[k].frame_count == rec.first_frame
                and out[k].frame_count + rec.frame_count <= MAX_COUNT_MINUS1 + 1):
            out[k] = replace(out[k], frame_count=out[k].frame_count + rec.frame_count)
            heads.append(None)
            continue
        if rec.type is RecordType.OFF:
            open_run[rec.group] = len(out)
        else:
            open_run.pop(rec.group, None)
        heads.append(len(out))
        out.append(rec)
    return out, heads


def crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE (polynomial 0x1021, initial value 0xFFFF)."""
    return binascii.crc_hqx(data, 0xFFFF)


class PictureHash:
    """MD5 or CRC-32 over plane samples, in the order fed: one byte per sample at bit depth 8, two
    (little-endian) at 9..16, whatever the arrays' dtype (docs/sidecar.md, ``output_hash``)."""

    def __init__(self, hash_type: HashType, bitdepth: int) -> None:
        self.hash_type = hash_type
        self._dtype = sample_dtype(bitdepth)
        self._md5 = hashlib.md5() if hash_type is HashType.MD5 else None
        self._crc = 0

    def update(self, plane: np.ndarray) -> None:
        # the samples' bytes, without a copy when the plane is contiguous (hashlib and zlib read buffers)
        samples = np.ascontiguousarray(plane, dtype=self._dtype)
        data = samples.reshape(-1).view(np.uint8)
        if self._md5 is not None:
            self._md5.update(data)
        elif self.hash_type is HashType.CRC32:
            self._crc = zlib.crc32(data, self._crc)

    def digest(self) -> bytes:
        if self._md5 is not None:
            return self._md5.digest()
        if self.hash_type is HashType.CRC32:
            return self._crc.to_bytes(4, "big")
        return b""


def picture_crc(planes: Iterable[np.ndarray], bitdepth: int) -> int:
    """``first_picture_crc``: CRC-32 of a picture's Y, U and V samples."""
    h = PictureHash(HashType.CRC32, bitdepth)
    for p in planes:
        h.update(p)
    return int.from_bytes(h.digest(), "big")


# ------------------------------------------------------------------------------------------ limits
# value ranges of the ue(v) fields (docs/sidecar.md); the writer refuses what the reader would reject
MAX_FRAME_COUNT = 1 << 24  # frame_count, segment_index, first_frame
MAX_COUNT_MINUS1 = 1 << 16  # frame_count_minus1 of a record


def _checked(name: str, value: int, lo: int, hi: int) -> int:
    if not lo <= value <= hi:
        raise UsageError(f"side stream: {name} {value} is outside {lo}..{hi}, which the syntax can carry")
    return value


# ------------------------------------------------------------------------------------------ writing
def _write_arch(w: BitWriter, arch: Architecture) -> None:
    w.ue((arch.layers - 3) // 2)
    w.ue(arch.filters - 1)


def header_payload(h: StreamHeader) -> bytes:
    """The header unit's payload (without the unit framing)."""
    w = BitWriter()
    w.u(8, VERSION)
    w.ue(h.width)
    w.ue(h.height)
    w.u(4, h.bitdepth - 8)
    w.u(2, 1)  # chroma_format_idc: 4:2:0
    w.u(2, MODES.index(h.mode))
    w.ue(_checked("frame count", h.frame_count, 0, MAX_FRAME_COUNT))
    w.ue(_checked("frame rate numerator", h.fps.numerator, 1, MAX_FPS_TERM))
    w.ue(_checked("frame rate denominator", h.fps.denominator, 1, MAX_FPS_TERM))
    _write_arch(w, h.arch_y)
    _write_arch(w, h.arch_uv)
    w.u(2, int(h.hash_type))
    w.flag(h.first_picture_crc is not None)
    if h.first_picture_crc is not None:
        w.u(32, h.first_picture_crc)
    w.byte_align()
    return w.getvalue()


def record_payload(rec: Record, hash_type: HashType, reference: QuantizedNetwork | None) -> bytes:
    """One record's payload. NEW_DIFF is coded against ``reference`` (the group's previous network)."""
    w = BitWriter()
    w.u(2, int(rec.type))
    w.u(1, rec.group.value)
    w.ue(_checked("segment index", rec.segment, 0, MAX_FRAME_COUNT))
    w.ue(_checked("first frame", rec.first_frame, 0, MAX_FRAME_COUNT))
    w.ue(_checked("record frame count - 1", rec.frame_count - 1, 0, MAX_COUNT_MINUS1))
    if rec.type is not RecordType.OFF:
        if len(rec.output_hash) != hash_type.size:
            raise ValueError(f"output hash of {len(rec.output_hash)} bytes, {hash_type.name} needs {hash_type.size}")
    if rec.type in (RecordType.NEW, RecordType.NEW_DIFF):
        net = rec.network
        if net is None:
            raise ValueError("NEW record without network")
        w.u(2, net.packing.index)
        w.u(3, net.config.weight_bits - 2)
        w.u(4, net.config.bias_bits - 2)
        w.u(3, net.config.scale_bits - 1)
    w.byte_align()
    if rec.type is not RecordType.OFF:
        w.raw(rec.output_hash)
    if rec.type is RecordType.NEW:
        w.raw(encode_network(rec.network))
    elif rec.type is RecordType.NEW_DIFF:
        if reference is None:
            raise ValueError("NEW_DIFF record without reference network")
        w.raw(encode_network(rec.network, reference))
    return w.getvalue()


def frame_unit(kind: int, payload: bytes) -> bytes:
    """Sidecar framing of one unit: ``unit_kind u(8)``, ``unit_size u(16)``, payload, ``crc16 u(16)``."""
    if len(payload) >= MAX_UNIT:
        raise ValueError(f"unit of {len(payload)} bytes exceeds {MAX_UNIT - 1}")
    body = bytes([kind]) + len(payload).to_bytes(2, "big") + payload
    return body + crc16(body).to_bytes(2, "big")


UNIT_HEADER, UNIT_RECORD = 0, 1


# ------------------------------------------------------------------------------------------ reading
def _read_arch(r: BitReader) -> Architecture:
    layers = r.ranged_ue("layers code", 0, 6) * 2 + 3
    filters = r.ranged_ue("filters code", 0, 31) + 1
    return Architecture(layers, filters)


def parse_header_payload(data: bytes, what: str = "side stream header") -> StreamHeader:
    r = BitReader(data, what)
    version = r.u(8)
    if version != VERSION:
        raise SideStreamError(f"{what}: version {version} is not supported (this decoder reads version {VERSION})")
    width = r.ranged_ue("width", 2, 1 << 16)
    height = r.ranged_ue("height", 2, 1 << 16)
    bitdepth = r.ranged_u(4, "bit depth code", 0, 8) + 8
    if r.u(2) != 1:
        raise SideStreamError(f"{what}: only 4:2:0 is supported")
    mode = r.ranged_u(2, "mode", 0, 2)
    frames = r.ranged_ue("frame count", 0, MAX_FRAME_COUNT)
    num = r.ranged_ue("frame rate numerator", 1, MAX_FPS_TERM)
    den = r.ranged_ue("frame rate denominator", 1, MAX_FPS_TERM)
    arch_y = _read_arch(r)
    arch_uv = _read_arch(r)
    hash_type = HashType(r.ranged_u(2, "hash type", 0, 2))
    crc = r.u(32) if r.flag() else None
    r.byte_align()
    r.expect_end()
    if width % 2 or height % 2:
        raise SideStreamError(f"{what}: odd picture size {width}x{height} for 4:2:0")
    return StreamHeader(width, height, bitdepth, frames, Fraction(num, den), MODES[mode], arch_y, arch_uv,
                        hash_type, crc)


class RecordParser:
    """Parses record payloads in order, tracking each group's reference network."""

    def __init__(self, header: StreamHeader) -> None:
        self.header = header
        self.reference: dict[Group, QuantizedNetwork | None] = {Group.Y: None, Group.UV: None}

    def parse(self, data: bytes, index: int) -> Record:
        what = f"record {index}"
        r = BitReader(data, what)
        rtype = RecordType(r.u(2))
        group = Group(r.u(1))
        what = f"record {index} ({group.label})"
        r.what = what
        segment = r.ranged_ue("segment", 0, MAX_FRAME_COUNT)
        first = r.ranged_ue("first frame", 0, MAX_FRAME_COUNT)
        count = r.ranged_ue("frame count", 0, MAX_COUNT_MINUS1) + 1
        network = None
        if rtype in (RecordType.NEW, RecordType.NEW_DIFF):
            packing = Packing.from_index(r.u(2))
            config = QuantConfig(r.ranged_u(3, "weight bits code", 0, 6) + 2,
                                 r.ranged_u(4, "bias bits code", 0, 14) + 2,
                                 r.ranged_u(3, "scale bits code", 0, 7) + 1)
        r.byte_align()
        digest = r.raw(self.header.hash_type.size) if rtype is not RecordType.OFF else b""
        ref = self.reference[group]
        if rtype is RecordType.REUSE and ref is None:
            raise SideStreamError(f"{what}: reuses a previous network, but none was sent before")
        if rtype in (RecordType.NEW, RecordType.NEW_DIFF):
            if rtype is RecordType.NEW_DIFF and ref is None:
                raise SideStreamError(f"{what}: difference-coded, but no previous network was sent")
            network = decode_network(r.rest(), group, packing, self.header.arch(group), config,
                                     prev=ref if rtype is RecordType.NEW_DIFF else None, what=what)
            self.reference[group] = network
        else:
            r.expect_end()
        if rtype is RecordType.REUSE:
            network = ref
        return Record(rtype, group, segment, first, count, digest, network, size=len(data))


def iter_units(data: bytes, origin: str, base: int | None = len(MAGIC)) -> Iterator[tuple[int, bytes]]:
    """Split framed units (kind u8, size u16, payload, crc16: a sidecar after its magic, or the content
    of one SEI message) into (kind, payload), checking sizes and CRCs. ``base``: the byte offset of
    ``data`` in its file, named in the errors (None: no offsets, e.g. inside an SEI message)."""
    pos, index = 0, 0
    while pos < len(data):
        at = "" if base is None else f" at byte {pos + base}"
        if len(data) - pos < 5:
            raise SideStreamError(f"{origin}: unit {index}{at} truncated ({len(data) - pos} bytes left)")
        kind = data[pos]
        size = int.from_bytes(data[pos + 1:pos + 3], "big")
        end = pos + 3 + size
        if end + 2 > len(data):
            raise SideStreamError(f"{origin}: unit {index}{at} announces {size} bytes, "
                                  f"only {max(0, len(data) - pos - 5)} present (truncated)")
        if crc16(data[pos:end]) != int.from_bytes(data[end:end + 2], "big"):
            raise SideStreamError(f"{origin}: unit {index}{at} is damaged (CRC mismatch)")
        if kind not in (UNIT_HEADER, UNIT_RECORD):
            raise SideStreamError(f"{origin}: unit {index} has unknown kind {kind}")
        yield kind, data[pos + 3:end]
        pos = end + 2
        index += 1


@dataclass(frozen=True, eq=False)
class SideStream:
    """A parsed (or to-be-written) side stream."""

    header: StreamHeader
    records: tuple[Record, ...] = field(default_factory=tuple)

    def to_bytes(self) -> bytes:
        out = [MAGIC, frame_unit(UNIT_HEADER, header_payload(self.header))]
        for payload in self.record_payloads():
            out.append(frame_unit(UNIT_RECORD, payload))
        return b"".join(out)

    def record_payloads(self) -> list[bytes]:
        refs: dict[Group, QuantizedNetwork | None] = {Group.Y: None, Group.UV: None}
        out = []
        for rec in self.records:
            out.append(record_payload(rec, self.header.hash_type, refs[rec.group]))
            if rec.type in (RecordType.NEW, RecordType.NEW_DIFF):
                refs[rec.group] = rec.network
        return out

    @classmethod
    def from_bytes(cls, data: bytes, origin: str = "side stream") -> "SideStream":
        if data[:4] != MAGIC:
            raise SideStreamError(f"{origin}: not a hevc-nlf side stream (expected magic {MAGIC!r}, "
                                  f"found {bytes(data[:4])!r})")
        return cls.from_units(iter_units(data[4:], origin), origin)

    @classmethod
    def from_units(cls, units: Iterable[tuple[int, bytes]], origin: str, embedded: bool = False) -> "SideStream":
        """Assemble a side stream from (kind, payload) units in stream order: one header first, then
        the records. ``embedded``: the units came from SEI messages (the errors say so)."""
        what = "embedded side-stream header" if embedded else "header"
        header = None
        records: list[Record] = []
        parser = None
        for kind, payload in units:
            if kind == UNIT_HEADER:
                if header is not None:
                    raise SideStreamError(f"{origin}: more than one {what}")
                header = parse_header_payload(payload, f"{origin}: {'embedded header' if embedded else 'header'}")
                parser = RecordParser(header)
            else:
                if parser is None:
                    raise SideStreamError(f"{origin}: embedded record before the side-stream header (the header "
                                          f"SEI is missing or damaged)" if embedded else
                                          f"{origin}: record before the header")
                records.append(parser.parse(payload, len(records)))
        if header is None:
            raise SideStreamError(f"{origin}: no {what}")
        return cls(header, tuple(records))

    def check_consistency(self, complete: bool = True) -> None:
        """Each group's records must cover the pictures in order from 0, without gap or overlap, and (when
        the header gives a picture count, and ``complete``: not a stream whose records are still to
        come) all of them."""
        seen: dict[Group, int] = {Group.Y: 0, Group.UV: 0}
        for i, rec in enumerate(self.records):
            if rec.first_frame != seen[rec.group]:
                raise SideStreamError(f"record {i} ({rec.group.label}): starts at frame {rec.first_frame}, "
                                      f"expected {seen[rec.group]}")
            seen[rec.group] = rec.first_frame + rec.frame_count
        total = self.header.frame_count
        if total and complete:
            for g, n in seen.items():
                if n != total:
                    raise SideStreamError(f"{g.label} records cover {n} frames, header says {total}")

    def records_by_group(self, group: Group) -> list[Record]:
        return [r for r in self.records if r.group is group]


def check_stream_matches(header: StreamHeader, width: int, height: int, bitdepth: int,
                         origin: str, frame_count: int | None = None) -> None:
    if (header.width, header.height, header.bitdepth) != (width, height, bitdepth):
        raise MismatchError(f"{origin}: side stream is for {header.width}x{header.height} {header.bitdepth}-bit "
                            f"video, the HEVC stream is {width}x{height} {bitdepth}-bit "
                            f"(side stream from another encode?)")
    if frame_count is not None and header.frame_count and header.frame_count != frame_count:
        raise MismatchError(f"{origin}: side stream is for {header.frame_count} frames, the HEVC stream has "
                            f"{frame_count} (side stream from another encode?)")


def group_planes(frame_planes: Sequence[np.ndarray], group: Group) -> list[np.ndarray]:
    return [frame_planes[i] for i in group.plane_indices]
