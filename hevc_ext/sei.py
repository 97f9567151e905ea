"""The side stream inside the HEVC stream: user_data_unregistered SEI NAL units (spec: docs/sei.md).

Syntax, in the terms of ITU-T H.265 (04/2013 and later):

* A prefix SEI NAL unit (``nal_unit_type`` 39 = PREFIX_SEI_NUT, ``nuh_layer_id`` 0,
  ``nuh_temporal_id_plus1`` 1, i.e. NAL header bytes ``4E 01``) holding one ``sei_message()`` with
  ``payloadType`` 5 (user_data_unregistered), ``payloadSize`` coded with the 0xFF-byte extension
  scheme (§7.3.5), then ``rbsp_trailing_bits`` (0x80), with emulation prevention (§7.4.2).
* ``user_data_unregistered``: ``uuid_iso_iec_11578`` = :data:`PROJECT_UUID`
  (5b435a1a-e89b-46a4-b37b-8004c5bf8e9a, generated once for hevc-nlf), then the side-stream units,
  each framed exactly as in the sidecar file: ``unit_kind u(8)``, ``unit_size u(16)``, payload,
  ``crc16 u(16)`` (:func:`hevc_ext.sidecar.frame_unit`). The sidecar is therefore the magic ``HNLF``
  followed by the concatenated SEI contents in stream order, byte for byte.

Placement: the header unit goes into the first access unit; the records of a segment go into the
first access unit *in decoding order* that holds a picture of the segment (for random access: the
segment's intra picture; for low delay: its first picture), never before the carrier of the
previous segment (so the records keep the sidecar's order, which REUSE/NEW_DIFF depend on). All
units of one access unit share one SEI NAL unit, inserted directly before the access unit's first
VCL NAL unit (after parameter sets and any other prefix SEI). Every picture is decoded, and hence
output, after the records that filter it; a decoder that starts at a segment's intra picture finds
that segment's records there.

Reading is strict about our own SEI messages (recognised by payloadType 5 and the UUID): anything
malformed, damaged (CRC), truncated, or records that do not cover every picture of the stream raises
:class:`~hevc_ext.errors.SideStreamError`. Other NAL units are never touched, so :func:`strip` always
recovers the plain stream, byte for byte, even when the records are damaged.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Iterable, Sequence

from .errors import InputFormatError, SideStreamError, UsageError
from .sidecar import (MAGIC, UNIT_HEADER, UNIT_RECORD, Record, SideStream, frame_unit, header_payload,
                      iter_units)

#: uuid_iso_iec_11578 of every hevc-nlf SEI message (generated once with uuid4; never change it).
PROJECT_UUID_STR = "5b435a1a-e89b-46a4-b37b-8004c5bf8e9a"
PROJECT_UUID = uuid.UUID(PROJECT_UUID_STR).bytes

# nal_unit_type values (H.265 Table 7-1)
TRAIL_N, TRAIL_R = 0, 1
RADL_N, RADL_R, RASL_N, RASL_R = 6, 7, 8, 9
BLA_W_LP, BLA_W_RADL, BLA_N_LP, IDR_W_RADL, IDR_N_LP, CRA_NUT = 16, 17, 18, 19, 20, 21
VPS_NUT, SPS_NUT, PPS_NUT, AUD_NUT, EOS_NUT, EOB_NUT, FD_NUT = 32, 33, 34, 35, 36, 37, 38
PREFIX_SEI_NUT, SUFFIX_SEI_NUT = 39, 40
USER_DATA_UNREGISTERED = 5

#: NAL unit types that, after a VCL NAL unit, start a new access unit (§7.4.2.4.4)
AU_STARTERS = frozenset([VPS_NUT, SPS_NUT, PPS_NUT, AUD_NUT, PREFIX_SEI_NUT, 41, 42, 43, 44,
                          *range(48, 56)])
_START_CODE4 = b"\x00\x00\x00\x01"
_STRIP_HINT = ("; to decode the pictures without the filter, `hevc-nlf strip` removes the embedded records "
               "(or decode with a sidecar)")


# ------------------------------------------------------------------------- emulation prevention
def escape(rbsp: bytes) -> bytes:
    """RBSP → NAL payload: insert ``emulation_prevention_three_byte`` (0x03) after every two zero
    bytes that are followed by a byte <= 3, and after two trailing zero bytes (an RBSP that ends in a
    cabac_zero_word, §7.4.2)."""
    out = bytearray()
    zeros = 0
    for b in rbsp:
        if zeros >= 2 and b <= 3:
            out.append(3)
            zeros = 0
        out.append(b)
        zeros = zeros + 1 if b == 0 else 0
    if zeros >= 2:
        out.append(3)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    """NAL payload → RBSP: drop every 0x03 that follows two zero bytes."""
    out = bytearray()
    pos = 0
    while True:
        i = data.find(b"\x00\x00\x03", pos)
        if i < 0:
            out += data[pos:]
            return bytes(out)
        out += data[pos:i + 2]
        pos = i + 3


# ------------------------------------------------------------------------------ NAL units, AUs
@dataclass(frozen=True)
class NalUnit:
    """One NAL unit of an Annex-B byte stream: ``prefix`` holds the zero bytes and the start code in
    front of it (so that joining prefixes and data gives the stream back byte for byte), ``data`` the
    NAL unit itself (header and emulation-prevented payload)."""

    prefix: bytes
    data: bytes

    @property
    def type(self) -> int:
        return (self.data[0] >> 1) & 0x3F if self.data else -1

    @property
    def layer_id(self) -> int:
        return ((self.data[0] & 1) << 5) | (self.data[1] >> 3) if len(self.data) >= 2 else 0

    @property
    def temporal_id(self) -> int:
        return (self.data[1] & 7) - 1 if len(self.data) >= 2 else 0

    @property
    def is_vcl(self) -> bool:
        return 0 <= self.type <= 31 and len(self.data) >= 3

    @property
    def first_slice_in_picture(self) -> bool:
        """``first_slice_segment_in_pic_flag`` of a VCL NAL unit."""
        return self.is_vcl and bool(self.data[2] & 0x80)


def split_nal_units(stream: bytes, origin: str = "HEVC stream") -> tuple[list[NalUnit], bytes]:
    """Split an Annex-B byte stream into NAL units and the trailing zero bytes."""
    stream = bytes(stream)
    starts = []
    pos = 0
    while True:
        i = stream.find(b"\x00\x00\x01", pos)
        if i < 0:
            break
        starts.append(i)
        pos = i + 3
    if not starts:
        if stream.strip(b"\x00"):
            raise InputFormatError(f"{origin}: not an HEVC Annex-B byte stream (no start code)")
        return [], stream
    if stream[:starts[0]].strip(b"\x00"):
        raise InputFormatError(f"{origin}: not an HEVC Annex-B byte stream (data before the first start code)")
    nals = []
    carry = stream[:starts[0]]
    for k, s in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(stream)
        raw = stream[s + 3:end]
        data = raw.rstrip(b"\x00")
        nals.append(NalUnit(carry + stream[s:s + 3], data))
        carry = raw[len(data):]
    return nals, carry


def join_nal_units(nals: Iterable[NalUnit], tail: bytes = b"") -> bytes:
    return b"".join(n.prefix + n.data for n in nals) + tail


def access_units(nals: Sequence[NalUnit]) -> list[list[int]]:
    """Group NAL unit indices into access units (§7.4.2.4.4): after the last VCL NAL unit of a picture,
    an AUD, VPS, SPS, PPS, prefix SEI, reserved 41..44 / unspecified 48..55 NAL unit or the first
    slice segment of the next picture starts a new access unit."""
    aus: list[list[int]] = []
    current: list[int] = []
    seen_vcl = False
    for i, n in enumerate(nals):
        if seen_vcl and (n.type in AU_STARTERS or n.first_slice_in_picture):
            aus.append(current)
            current, seen_vcl = [], False
        current.append(i)
        seen_vcl = seen_vcl or n.is_vcl
    if current:
        aus.append(current)
    return aus


# ------------------------------------------------------------- display order from the slice headers
class _Bits:
    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def u(self, n: int) -> int:
        if self.pos + n > 8 * len(self.data):
            raise InputFormatError(f"{self.what}: truncated")
        v = 0
        for _ in range(n):
            v = (v << 1) | ((self.data[self.pos >> 3] >> (7 - (self.pos & 7))) & 1)
            self.pos += 1
        return v

    def ue(self) -> int:
        zeros = 0
        while self.u(1) == 0:
            zeros += 1
            if zeros > 31:
                raise InputFormatError(f"{self.what}: invalid Exp-Golomb code")
        return (1 << zeros) - 1 + self.u(zeros)


def _parse_sps(nal: NalUnit) -> tuple[int, int, bool]:
    """(sps id, log2_max_pic_order_cnt_lsb, separate_colour_plane_flag)"""
    r = _Bits(unescape(nal.data[2:200]), "SPS")
    r.u(4)
    max_sub_layers_minus1 = r.u(3)
    r.u(1)
    r.u(88)  # general profile
    r.u(8)  # general_level_idc
    present = [(r.u(1), r.u(1)) for _ in range(max_sub_layers_minus1)]
    if max_sub_layers_minus1 > 0:
        r.u(2 * (8 - max_sub_layers_minus1))
    for profile, level in present:
        r.u(88 * profile + 8 * level)
    sps_id = r.ue()
    separate = False
    if r.ue() == 3:
        separate = bool(r.u(1))
    r.ue()
    r.ue()
    if r.u(1):
        for _ in range(4):
            r.ue()
    r.ue()
    r.ue()
    return sps_id, r.ue() + 4, separate


def _parse_pps(nal: NalUnit) -> tuple[int, int, bool, bool, int]:
    """(pps id, sps id, dependent_slice_segments_enabled, output_flag_present, num_extra_slice_header_bits)"""
    r = _Bits(unescape(nal.data[2:64]), "PPS")
    pps_id, sps_id = r.ue(), r.ue()
    return pps_id, sps_id, bool(r.u(1)), bool(r.u(1)), r.u(3)


def display_order(stream: bytes | Sequence[NalUnit], origin: str = "HEVC stream") -> list[int | None]:
    """For each access unit (decoding order): the display index of its picture, or None for an access
    unit that has no picture or whose picture is not output. Derived from the picture order counts
    (§8.3.1) of the slice headers: pictures are output per coded video sequence in POC order."""
    nals = split_nal_units(stream, origin)[0] if isinstance(stream, (bytes, bytearray, memoryview)) else stream
    sps: dict[int, tuple[int, bool]] = {}
    pps: dict[int, tuple[int, bool, bool, int]] = {}
    keys: list[tuple[int, int] | None] = []
    cvs, prev_tid0, first, after_eos, irap_no_rasl = -1, 0, True, False, False
    for au in access_units(nals):
        key = None
        for i in au:
            n = nals[i]
            if n.layer_id != 0:
                continue
            t = n.type
            if t == SPS_NUT:
                sid, lsb_bits, sep = _parse_sps(n)
                sps[sid] = (lsb_bits, sep)
            elif t == PPS_NUT:
                pid, sid, dep, outflag, extra = _parse_pps(n)
                pps[pid] = (sid, dep, outflag, extra)
            elif t in (EOS_NUT, EOB_NUT):
                after_eos = True
            elif n.first_slice_in_picture and key is None:
                r = _Bits(unescape(n.data[2:64]), f"{origin}: slice header")
                r.u(1)
                irap = BLA_W_LP <= t <= 23
                if irap:
                    r.u(1)
                pid = r.ue()
                if pid not in pps or pps[pid][0] not in sps:
                    raise InputFormatError(f"{origin}: slice refers to a missing parameter set (PPS {pid})")
                sid, _dep, outflag, extra = pps[pid]
                lsb_bits, separate = sps[sid]
                r.u(extra)
                r.ue()  # slice_type
                output = bool(r.u(1)) if outflag else True
                if separate:
                    r.u(2)
                lsb = 0 if t in (IDR_W_RADL, IDR_N_LP) else r.u(lsb_bits)
                if irap:
                    irap_no_rasl = t in (IDR_W_RADL, IDR_N_LP, BLA_W_LP, BLA_W_RADL, BLA_N_LP) or first or after_eos
                if irap and irap_no_rasl:
                    cvs += 1
                    msb = 0
                else:
                    max_lsb = 1 << lsb_bits
                    prev_lsb = prev_tid0 & (max_lsb - 1)
                    prev_msb = prev_tid0 - prev_lsb
                    if lsb < prev_lsb and prev_lsb - lsb >= max_lsb // 2:
                        msb = prev_msb + max_lsb
                    elif lsb > prev_lsb and lsb - prev_lsb > max_lsb // 2:
                        msb = prev_msb - max_lsb
                    else:
                        msb = prev_msb
                poc = msb + lsb
                sub_layer_non_ref = t <= 14 and t % 2 == 0
                if n.temporal_id == 0 and not (RADL_N <= t <= RASL_R or sub_layer_non_ref):
                    prev_tid0 = poc
                if t in (RASL_N, RASL_R) and irap_no_rasl:
                    output = False  # leading pictures of a CRA that starts the stream are not output
                first, after_eos = False, False
                key = (cvs, poc) if output else None
        keys.append(key)
    order = sorted(k for k in keys if k is not None)
    rank = {k: i for i, k in enumerate(order)}
    if len(rank) != len(order):
        raise InputFormatError(f"{origin}: two pictures with the same picture order count")
    return [rank[k] if k is not None else None for k in keys]


# ---------------------------------------------------------------------------------- SEI syntax
def _ff_coded(value: int) -> bytes:
    return b"\xff" * (value // 255) + bytes([value % 255])


def sei_nal(content: bytes) -> bytes:
    """A prefix SEI NAL unit (header + emulation-prevented RBSP) with one user_data_unregistered
    message carrying ``content`` under :data:`PROJECT_UUID`."""
    body = PROJECT_UUID + content
    rbsp = _ff_coded(USER_DATA_UNREGISTERED) + _ff_coded(len(body)) + body + b"\x80"
    return bytes([PREFIX_SEI_NUT << 1, 1]) + escape(rbsp)


def _read_ff(rbsp: bytes, pos: int) -> tuple[int | None, int]:
    value = 0
    while pos < len(rbsp) and rbsp[pos] == 0xFF:
        value += 255
        pos += 1
    if pos >= len(rbsp):
        return None, pos
    return value + rbsp[pos], pos + 1


def _is_ours(nal: NalUnit) -> bool:
    """Cheap test: a prefix SEI NAL unit with a user_data_unregistered message under our UUID."""
    return nal.type == PREFIX_SEI_NUT and PROJECT_UUID in unescape(nal.data[2:])


def our_contents(nal: NalUnit, where: str) -> list[bytes] | None:
    """The contents of our SEI messages in ``nal`` (None: not ours). Raises SideStreamError when a
    message of ours is truncated or the NAL unit around it is malformed."""
    if nal.type != PREFIX_SEI_NUT or len(nal.data) < 3:
        return None
    rbsp = unescape(nal.data[2:])
    pos = 0
    found: list[bytes] = []
    malformed = None
    while pos < len(rbsp) and rbsp[pos:] != b"\x80":  # more_rbsp_data()
        ptype, pos = _read_ff(rbsp, pos)
        psize, pos = _read_ff(rbsp, pos) if ptype is not None else (None, pos)
        if ptype is None or psize is None:
            malformed = "SEI message header runs past the end of the NAL unit"
            break
        payload = rbsp[pos:pos + psize]
        if ptype == USER_DATA_UNREGISTERED and payload[:16] == PROJECT_UUID:
            if pos + psize > len(rbsp):
                raise SideStreamError(f"{where}: hevc-nlf SEI message truncated ({len(rbsp) - pos} of {psize} "
                                      f"bytes present)")
            found.append(payload[16:])
        elif pos + psize > len(rbsp):
            malformed = "SEI message runs past the end of the NAL unit"
            break
        pos += psize
    if not found:
        if PROJECT_UUID in rbsp:
            raise SideStreamError(f"{where}: damaged hevc-nlf SEI ({malformed or 'malformed SEI message'})")
        return None
    if malformed or rbsp[pos:] != b"\x80":
        raise SideStreamError(f"{where}: hevc-nlf SEI NAL unit is damaged "
                              f"({malformed or 'bad rbsp_trailing_bits'})")
    return found


def split_units(content: bytes, where: str) -> list[tuple[int, bytes]]:
    """The framed units of one SEI message (kind u8, size u16, payload, crc16 — as in the sidecar)."""
    units = list(iter_units(content, where, base=None))
    if not units:
        raise SideStreamError(f"{where}: empty hevc-nlf SEI message")
    return units


# ----------------------------------------------------------------------------------- placement
def carriers(display_of_au: Sequence[int | None], records: Sequence[Record]) -> tuple[int, list[int]]:
    """Access unit (decoding order) of the header and of each record: a record goes into the first
    access unit holding a picture of its segment, not before the previous record's carrier."""
    pictures = [a for a, d in enumerate(display_of_au) if d is not None]
    if not pictures:
        raise InputFormatError("the HEVC stream has no pictures")
    header_au = pictures[0]
    first_au: dict[int, int] = {}
    for a, d in enumerate(display_of_au):
        if d is not None and d not in first_au:
            first_au[d] = a
    out = []
    last = header_au
    for rec in records:
        aus = [first_au[f] for f in rec.frames if f in first_au]
        if not aus:
            raise UsageError(f"record for frames {rec.first_frame}..{rec.first_frame + rec.frame_count - 1}: "
                             f"no such pictures in the HEVC stream ({len(pictures)} pictures)")
        last = max(last, min(aus))
        out.append(last)
    return header_au, out


def insert_sei(nals: list[NalUnit], au: Sequence[int], nal_data: bytes) -> None:
    """Insert a NAL unit (with a 4-byte start code) before the first VCL NAL unit of access unit ``au``."""
    pos = next((i for i in au if nals[i].is_vcl), au[-1] + 1)
    nals.insert(pos, NalUnit(_START_CODE4, nal_data))


def embed_au(au_bytes: bytes, content: bytes) -> bytes:
    """One access unit (Annex B) with an SEI NAL unit carrying ``content`` before its first slice."""
    nals, tail = split_nal_units(au_bytes, "access unit")
    insert_sei(nals, range(len(nals)), sei_nal(content))
    return join_nal_units(nals, tail)


def embed(stream: bytes, side: SideStream, display_of_au: Sequence[int | None] | None = None,
          origin: str = "HEVC stream") -> bytes:
    """``stream`` with the side stream's header and records embedded as SEI NAL units.

    ``display_of_au``: display index of each access unit in decoding order (e.g. the encoder's packet
    pts); derived from the slice headers when not given."""
    nals, tail = split_nal_units(stream, origin)
    if any(_is_ours(n) for n in nals if n.type == PREFIX_SEI_NUT):
        raise UsageError(f"{origin}: already carries hevc-nlf records (strip them first)")
    aus = access_units(nals)
    if display_of_au is None:
        display_of_au = display_order(nals, origin)
    if len(display_of_au) != len(aus):
        raise UsageError(f"{origin}: {len(aus)} access units, but a display order for {len(display_of_au)}")
    header_au, rec_aus = carriers(display_of_au, side.records)
    content: dict[int, list[bytes]] = {header_au: [frame_unit(UNIT_HEADER, header_payload(side.header))]}
    for a, payload in zip(rec_aus, side.record_payloads()):
        content.setdefault(a, []).append(frame_unit(UNIT_RECORD, payload))
    for a in sorted(content, reverse=True):  # back to front: earlier indices stay valid
        insert_sei(nals, aus[a], sei_nal(b"".join(content[a])))
    return join_nal_units(nals, tail)


# ------------------------------------------------------------------------------------- reading
@dataclass
class Extracted:
    """What :func:`scan` found: the plain stream, the units in stream order and the picture count."""

    plain: bytes
    units: list[tuple[int, bytes]]
    pictures: int

    def sidecar_bytes(self) -> bytes:
        """The sidecar file with exactly these units (byte-identical to what ``encode`` writes)."""
        return MAGIC + b"".join(frame_unit(kind, payload) for kind, payload in self.units)


def scan(stream: bytes, origin: str = "HEVC stream") -> Extracted:
    """Remove our SEI NAL units from ``stream`` and check and collect their units."""
    nals, tail = split_nal_units(stream, origin)
    keep: list[NalUnit] = []
    units: list[tuple[int, bytes]] = []
    pictures = 0
    for a, au in enumerate(access_units(nals)):
        for i in au:
            n = nals[i]
            pictures += n.first_slice_in_picture and n.layer_id == 0
            if n.type == PREFIX_SEI_NUT:
                where = f"{origin}: SEI in access unit {a}"
                try:
                    contents = our_contents(n, where)
                    if contents is not None:
                        for c in contents:
                            units += split_units(c, where)
                        continue
                except SideStreamError as exc:
                    raise SideStreamError(f"{exc}{_STRIP_HINT}") from None
            keep.append(n)
    return Extracted(join_nal_units(keep, tail), units, pictures)


def parse_units(units: Sequence[tuple[int, bytes]], origin: str, pictures: int | None = None) -> SideStream:
    """Build the side stream from units in stream order, checking that the records cover every
    picture (``pictures``: the picture count of the stream, if known)."""
    try:
        side = SideStream.from_units(units, origin, embedded=True)
        try:
            side.check_consistency()
        except SideStreamError as exc:
            raise SideStreamError(f"{origin}: embedded {exc} (an SEI is missing or damaged)") from None
        if pictures is not None:
            from .arch import Group

            for g in (Group.Y, Group.UV):
                covered = sum(r.frame_count for r in side.records_by_group(g))
                if covered != pictures:
                    raise SideStreamError(f"{origin}: the embedded {g.label} records cover {covered} pictures, "
                                          f"the stream has {pictures} (an SEI is missing or damaged, or the stream is truncated)")
    except SideStreamError as exc:
        raise SideStreamError(f"{exc}{_STRIP_HINT}" if _STRIP_HINT not in str(exc) else str(exc)) from None
    return side


def extract(stream: bytes, origin: str = "HEVC stream") -> tuple[bytes, SideStream | None]:
    """(the plain stream, the embedded side stream or None if there is none)."""
    found = scan(stream, origin)
    if not found.units:
        return found.plain, None
    return found.plain, parse_units(found.units, origin, found.pictures)


def strip(stream: bytes, origin: str = "HEVC stream") -> bytes:
    """``stream`` without our SEI NAL units (the plain stream, byte for byte); their contents are not
    checked, so this works on damaged records too."""
    nals, tail = split_nal_units(stream, origin)
    return join_nal_units([n for n in nals if not _is_ours(n)], tail)


def has_embedded(stream: bytes) -> bool:
    nals, _ = split_nal_units(stream)
    return any(_is_ours(n) for n in nals)


# --------------------------------------------------------------------------- streaming reading
class NalSplitter:
    """Incremental Annex-B splitter: push byte chunks, get the NAL units that are complete.

    Work is linear in the bytes pushed, whatever the chunking: the buffer grows in place, and each push
    searches only its new bytes for a start code (a NAL unit is complete when the next one starts)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf searched: no start code in them but the unit's own, at its head

    def push(self, chunk: bytes) -> list[NalUnit]:
        self._buf += chunk
        last = self._buf.rfind(b"\x00\x00\x01", max(self._scanned - 2, 1))
        self._scanned = len(self._buf)
        if last <= 0:
            return []
        # the NAL unit in front of the last start code is complete; keep the rest
        cut = last
        while cut > 0 and self._buf[cut - 1] == 0:
            cut -= 1
        if not self._buf[:cut].strip(b"\x00"):
            return []
        head, self._buf = bytes(self._buf[:cut]), self._buf[cut:]
        nals, tail = split_nal_units(head, "stream")
        if tail:
            self._buf[:0] = tail
        self._scanned = len(self._buf)
        return nals

    def flush(self) -> list[NalUnit]:
        buf, self._buf, self._scanned = bytes(self._buf), bytearray(), 0
        if not buf.strip(b"\x00"):
            return []
        return split_nal_units(buf, "stream")[0]


__all__ = ["PROJECT_UUID", "PROJECT_UUID_STR", "Extracted", "NalSplitter", "NalUnit", "access_units", "carriers",
           "display_order", "embed", "embed_au", "escape", "extract", "has_embedded", "join_nal_units",
           "our_contents", "parse_units", "scan", "sei_nal", "split_nal_units", "split_units", "strip",
           "unescape"]
