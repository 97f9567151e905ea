"""Streaming Python API: :class:`Encoder` (push frames, pull packets) and :class:`Decoder` (push bytes,
pull filtered frames). The side stream travels in-band as SEI NAL units (docs/sei.md).

Example::

    from hevc_ext import Decoder, Encoder
    from hevc_ext.pipeline import EncoderConfig
    from hevc_ext.yuv import VideoFormat, open_video

    with open_video("clip_416x240_50.yuv") as src:
        enc = Encoder(src.fmt, EncoderConfig())
        packets = [p for frame in src for p in enc.push(frame)] + enc.flush()
    dec = Decoder()
    frames = [f for p in packets for f in dec.push(p.data)] + dec.flush()  # filtered, MD5-verified

Latency of the encoder: a segment (random access: ``intra_period`` pictures; low delay: a filter GoP of
``ld_gop`` pictures) is trained once all its pictures are encoded and reconstructed, and the access
unit that carries its records (the first one of the segment in decoding order) is held until then,
with every packet after it. So a packet leaves at the latest about one segment (plus x265's
lookahead) after its picture went in; with open-GOP random access, the leading pictures of a segment
follow the next segment's intra picture in decoding order and wait for that segment's training too.
The decoder holds one access unit (FFmpeg's parser knows an access unit is complete when the next one
starts), and with byte input also the NAL unit in progress (complete at the next start code); beyond
that, only the HEVC decoder's reordering delay. So in low delay, pushing whole :class:`Packet` s, a
picture comes out when the next packet goes in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from .arch import Group
from .errors import MismatchError, SideStreamError, UsageError
from .hevcdec import HevcDecoder
from .sei import AU_STARTERS, PREFIX_SEI_NUT, NalSplitter, NalUnit, embed_au, our_contents, split_units
from .sidecar import (UNIT_HEADER, UNIT_RECORD, Record, RecordParser, RecordType, SideStream, StreamHeader,
                      frame_unit, header_payload, parse_header_payload, picture_crc, record_payload)
from .yuv import Frame, VideoFormat

log = logging.getLogger("hevc_ext.api")

_HINT = "; Decoder(ignore_side_stream=True) or `hevc-nlf strip` gives the pictures without the filter"


@dataclass(frozen=True)
class Packet:
    """One access unit of the HEVC stream (Annex B), with the side-stream SEI of its segment if any."""

    data: bytes
    pts: int  # display index of its picture
    dts: int  # decoding index
    is_key: bool


class _Frames:
    """Frames by absolute index (what the pipeline's segment functions index into)."""

    def __init__(self) -> None:
        self.frames: dict[int, Frame] = {}
        self.count = 0  # frames added so far

    def add(self, frame: Frame) -> None:
        self.frames[self.count] = frame
        self.count += 1

    def __getitem__(self, index: int) -> Frame:
        return self.frames[index]

    def drop_before(self, index: int) -> None:
        for k in [k for k in self.frames if k < index]:
            del self.frames[k]


# -------------------------------------------------------------------------------------------- encoder
class Encoder:
    """Streaming encoder: x265 through av, online training per segment, records embedded as SEI.

    ``push(frame)`` and ``flush()`` return the packets that are ready, in decoding order; their
    concatenation has the syntax of the embedded stream ``hevc-nlf encode --embed`` writes (the header's
    frame count is 0 = unknown). The HEVC pictures are the same; the records are the same unless an RD
    decision lies near its threshold: a stream prices side bits with the mean bits per picture so far,
    the file encoder with the whole sequence's mean. ``config.coding.frames`` is ignored (the stream
    ends at :meth:`flush`); only the x265 backend streams.

    Memory does not grow with the length of the stream: a segment is forgotten once its packets are
    out. ``keep_records=True`` keeps every segment's records and decisions (:attr:`records`,
    :attr:`decisions`, :attr:`side_stream`), about 15 KB per segment.
    """

    def __init__(self, fmt: VideoFormat, config: Any = None, *, progress: Any = None, preset: str = "medium",
                 keep_records: bool = False) -> None:
        from fractions import Fraction as _F

        import av

        from .backends.x265 import x265_params
        from .gop import split
        from .hevcdec import pixel_format
        from .kernels import get_kernel
        from .pipeline import EncoderConfig, _GroupState
        from .train import TrainConfig

        self.config = config if config is not None else EncoderConfig()
        if self.config.codec != "x265":
            raise UsageError(f"the streaming Encoder supports the x265 backend only, not {self.config.codec!r}")
        coding = self.config.coding
        params = x265_params(coding)
        split(1, coding.mode, coding.intra_period, self.config.ld_gop)  # validates mode and GoP size
        self.fmt = fmt
        self._size = coding.intra_period if coding.mode == "ra" else self.config.ld_gop
        self._low_delay = coding.mode in ("ldb", "ldp")
        self._tcfg = self.config.train if self.config.train is not None else TrainConfig()
        self._kernel = get_kernel(self.config.kernel)
        self._bits_coded = 0  # of every access unit so far (one per picture), for the RD decisions
        self._progress = progress
        self._states = {Group.Y: _GroupState(), Group.UV: _GroupState()}
        cc = av.CodecContext.create("libx265", "w")
        cc.width, cc.height = fmt.width, fmt.height
        cc.pix_fmt = pixel_format(fmt.bitdepth)
        cc.time_base = _F(fmt.fps.denominator, fmt.fps.numerator)
        cc.framerate = fmt.fps
        cc.options = {"x265-params": params, "preset": preset}
        self._cc = cc
        self._av = av
        self._recon_decoder = av.CodecContext.create("hevc", "r")  # packet by packet: no parser delay
        self._src, self._recon = _Frames(), _Frames()
        self._pending: list[list[Any]] = []  # [data, pts, dts, is_key] in decoding order
        self._packets_in = 0
        self._first_au: dict[int, int] = {}  # segment -> decoding index of its first access unit (unreleased ones)
        self._carried = (0, 0)  # the first segment in _first_au, and the latest first access unit of those before it
        self._seg_units: dict[int, list[bytes]] = {}  # segment -> framed record units (once trained)
        self._next_segment = 0
        self._refs: dict[Group, Any] = {Group.Y: None, Group.UV: None}
        self.header: StreamHeader | None = None
        self.keep_records = keep_records
        self.records: list[Record] = []  # with keep_records only
        self.decisions: list[Any] = []  # with keep_records only
        self._total: int | None = None
        self._flushed = False

    @property
    def side_stream(self) -> SideStream | None:
        """Header and records so far (a sidecar of the packets emitted: ``side_stream.to_bytes()``); needs
        ``keep_records=True``."""
        if not self.keep_records:
            raise UsageError("Encoder.side_stream needs Encoder(..., keep_records=True)")
        return SideStream(self.header, tuple(self.records)) if self.header is not None else None

    # -- input
    def push(self, frame: Frame) -> list[Packet]:
        """Encode one picture (a :class:`~hevc_ext.yuv.Frame` of integer planes in the encoder's format).
        A frame that is not one raises :class:`UsageError` and is not counted: the stream goes on."""
        if self._flushed:
            raise UsageError("Encoder.push after flush")
        planes = self._checked_planes(frame)
        from .hevcdec import planes_to_frame

        index = self._src.count
        self._src.add(Frame(*planes))
        vf = planes_to_frame(self._src[index], self.fmt.bitdepth)
        vf.pts = index
        self._take(self._encode(vf))
        self._train_ready()
        return self._release()

    def _checked_planes(self, frame: Any) -> list[np.ndarray]:
        """Copies of ``frame``'s Y, U, V planes in the encoder's sample type, after checking their shapes,
        integer type and sample range (a float, negative or too large sample is refused, not wrapped)."""
        index, f = self._src.count, self.fmt
        planes = getattr(frame, "planes", None)
        if planes is None or len(planes) != 3:
            raise UsageError(f"frame {index}: expected a hevc_ext.yuv.Frame (Y, U, V planes), "
                             f"got {type(frame).__name__}")
        out = []
        for name, plane, shape in zip("YUV", planes, [(f.height, f.width), f.chroma_shape, f.chroma_shape]):
            a = np.asarray(plane)
            if a.shape != shape:
                raise UsageError(f"frame {index}: plane {name} has shape {a.shape}, expected {shape} "
                                 f"(the encoder was set up for {f.describe()})")
            if not np.issubdtype(a.dtype, np.integer):
                raise UsageError(f"frame {index}: plane {name} holds {a.dtype} samples, expected integers "
                                 f"0..{f.max_value} ({f.bitdepth}-bit)")
            lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
            if lo < 0 or hi > f.max_value:
                raise UsageError(f"frame {index}: plane {name} has samples {lo}..{hi}, outside 0..{f.max_value} "
                                 f"({f.bitdepth}-bit)")
            out.append(np.array(a, dtype=f.dtype, copy=True))
        return out

    def flush(self) -> list[Packet]:
        if self._flushed:
            return []
        self._flushed = True
        self._take(self._encode(None))
        self._reconstruct(None)
        self._total = self._src.count
        if self._recon.count != self._total:
            raise MismatchError(f"decoding x265's stream gave {self._recon.count} pictures, expected {self._total}")
        self._train_ready()
        out = self._release()
        if self._pending:  # pragma: no cover - every segment is trained by now
            raise RuntimeError("packets left after flush")
        return out

    def _encode(self, vf: Any) -> list[Any]:
        try:
            return list(self._cc.encode(vf))
        except self._av.error.FFmpegError as exc:
            from .errors import BackendError

            raise BackendError(f"x265 failed: {exc}") from None

    def _take(self, packets: list[Any]) -> None:
        for p in packets:
            data = bytes(p)
            dts = self._packets_in
            self._packets_in += 1
            seg = p.pts // self._size
            self._first_au.setdefault(seg, dts)
            self._bits_coded += 8 * len(data)
            self._pending.append([data, int(p.pts), dts, bool(p.is_keyframe)])
            self._reconstruct(data)

    def _reconstruct(self, data: bytes | None) -> None:
        from .hevcdec import frame_to_planes

        try:
            for frame in self._recon_decoder.decode(self._av.Packet(data) if data is not None else None):
                self._recon.add(frame_to_planes(frame))
        except self._av.error.FFmpegError as exc:
            from .errors import BackendError

            raise BackendError(f"decoding x265's packets failed: {exc}") from None

    # -- training
    def _train_ready(self) -> None:
        from .gop import Segment
        from .pipeline import _encode_group

        while True:
            s = self._next_segment
            start = s * self._size
            end = start + self._size
            if self._total is not None:
                end = min(end, self._total)
                if end <= start:
                    return
            elif self._src.count < end:
                return
            if self._recon.count < end:
                return
            if self.header is None:
                c = self.config
                self.header = StreamHeader(self.fmt.width, self.fmt.height, self.fmt.bitdepth, 0, self.fmt.fps,
                                           c.coding.mode, c.arch_y, c.arch_uv, c.hash_type,
                                           picture_crc(self._recon[0].planes, self.fmt.bitdepth))
            seg = Segment(s, start, end - start)
            # the GoPs after this one, for the low-delay credit of a network's later reuse: those left when
            # the end is known, else as many as the credit looks ahead (a stream is taken to go on)
            later = (tuple(min(self._size, self._total - b) for b in range(end, self._total, self._size))
                     if self._total is not None else (self._size,) * self.config.reuse_horizon)
            units = []
            for group in (Group.Y, Group.UV):
                # mean bits per picture of everything coded so far (the whole sequence is not known yet)
                bits_per_frame = self._bits_coded / max(1, self._packets_in)
                decision, rec = _encode_group(self._src, self._recon, seg, group, self.fmt, self.config, self._tcfg,
                                              self._kernel, bits_per_frame, self._states[group], self._low_delay,
                                              self._progress, "?", later)  # type: ignore[arg-type]
                units.append(frame_unit(UNIT_RECORD, record_payload(rec, self.config.hash_type, self._refs[group])))
                if rec.type in (RecordType.NEW, RecordType.NEW_DIFF):
                    self._refs[group] = rec.network
                if self.keep_records:
                    self.records.append(rec)
                    self.decisions.append(decision)
            self._seg_units[s] = units
            self._src.drop_before(end)
            self._recon.drop_before(end)
            self._next_segment += 1

    # -- output
    def _carriers(self) -> dict[int, int]:
        """segment -> decoding index of the access unit carrying its records (known unreleased ones only):
        its first access unit, or a later segment's carrier if that came first (open GOP)."""
        out = {}
        s, last = self._carried
        while s in self._first_au:
            last = max(last, self._first_au[s])
            out[s] = last
            s += 1
        return out

    def _release(self) -> list[Packet]:
        carriers = self._carriers()
        by_au: dict[int, list[int]] = {}
        for s, a in carriers.items():
            by_au.setdefault(a, []).append(s)
        out = []
        while self._pending:
            data, pts, dts, key = self._pending[0]
            segs = by_au.get(dts, [])
            if any(s not in self._seg_units for s in segs) or (dts == 0 and self.header is None):
                break
            units = [frame_unit(UNIT_HEADER, header_payload(self.header))] if dts == 0 else []
            for s in sorted(segs):
                units += self._seg_units.pop(s)
            if units:
                data = embed_au(data, b"".join(units))
            out.append(Packet(data, pts, dts, key))
            self._pending.pop(0)
        s, last = self._carried  # forget the segments whose records are out
        while s in self._first_au and s < self._next_segment and s not in self._seg_units:  # trained, and sent
            last = max(last, self._first_au.pop(s))
            s += 1
        self._carried = (s, last)
        return out


# -------------------------------------------------------------------------------------------- decoder
class Decoder:
    """Streaming decoder: push Annex-B bytes (any chunking) or :class:`Packet` s, get the filtered
    pictures in display order, each segment's output verified against its record's hash.

    Records come from the stream's hevc-nlf SEI; a stream without them decodes to the plain pictures.
    A damaged or missing SEI raises :class:`~hevc_ext.errors.SideStreamError` (unless
    ``ignore_side_stream``, which skips the records and gives the plain pictures). Needs no torch.

    Memory does not grow with the length of the stream; ``keep_records=True`` keeps every record for
    :attr:`side_stream` (about 15 KB per segment).
    """

    def __init__(self, kernel: str = "auto", *, ignore_side_stream: bool = False, origin: str = "stream",
                 keep_records: bool = False) -> None:
        self.kernel_name = kernel
        self.ignore_side_stream = ignore_side_stream
        self.origin = origin
        self._splitter = NalSplitter()
        self._hevc = HevcDecoder(origin)
        self._filter: Any = None
        self._parser: RecordParser | None = None
        self._next: dict[Group, int] = {Group.Y: 0, Group.UV: 0}
        self.keep_records = keep_records
        self._records: list[Record] = []  # with keep_records only
        self._n_records = 0
        self._au = 0
        self._seen_vcl = False
        self.header: StreamHeader | None = None
        self.frames_out = 0
        self._flushed = False

    @property
    def bitdepth(self) -> int | None:
        return self._hevc.bitdepth

    @property
    def side_stream(self) -> SideStream | None:
        """Header and records received so far; needs ``keep_records=True``."""
        if not self.keep_records:
            raise UsageError("Decoder.side_stream needs Decoder(..., keep_records=True)")
        return SideStream(self.header, tuple(self._records)) if self.header is not None else None

    @property
    def verified_records(self) -> int:
        return self._filter.verified if self._filter is not None else 0

    def push(self, data: bytes | bytearray | memoryview | Packet) -> list[Frame]:
        if self._flushed:
            raise UsageError("Decoder.push after flush (a new stream needs a new Decoder)")
        if isinstance(data, Packet):  # a whole access unit: its last NAL unit is complete too
            return self._handle(self._splitter.push(data.data) + self._splitter.flush())
        if isinstance(data, (bytes, bytearray, memoryview)):
            return self._handle(self._splitter.push(bytes(data)))
        raise TypeError(f"Decoder.push takes bytes or a Packet, not {type(data).__name__}")

    def flush(self) -> list[Frame]:
        """The pictures still held, at the end of the stream; then checks the records against the
        pictures output. A second call returns nothing."""
        if self._flushed:
            return []
        self._flushed = True
        out = self._handle(self._splitter.flush())
        out += self._output(self._hevc.flush())
        if self._filter is not None:
            self._filter.finish()  # also checks the records against the pictures output
        return out

    def _handle(self, nals: list[NalUnit]) -> list[Frame]:
        plain = []
        for n in nals:
            if self._seen_vcl and (n.type in AU_STARTERS or n.first_slice_in_picture):
                self._au += 1
                self._seen_vcl = False
            self._seen_vcl = self._seen_vcl or n.is_vcl
            if n.type == PREFIX_SEI_NUT:
                where = f"{self.origin}: SEI in access unit {self._au}"
                try:
                    contents = our_contents(n, where)
                except SideStreamError as exc:
                    if self.ignore_side_stream:
                        continue
                    raise SideStreamError(f"{exc}{_HINT}") from None
                if contents is not None:
                    if not self.ignore_side_stream:
                        for c in contents:
                            self._units(c, where)
                    continue
            plain.append(n.prefix + n.data)
        return self._output(self._hevc.push(b"".join(plain))) if plain else []

    def _units(self, content: bytes, where: str) -> None:
        from .kernels import get_kernel
        from .pipeline import FrameFilter

        try:
            for kind, payload in split_units(content, where):
                if kind == UNIT_HEADER:
                    if self.header is not None:
                        raise SideStreamError(f"{where}: a second side-stream header")
                    self.header = parse_header_payload(payload, f"{where}: header")
                    self._parser = RecordParser(self.header)
                    self._filter = FrameFilter(SideStream(self.header, ()), get_kernel(self.kernel_name), self.origin,
                                               more_records=True)
                    continue
                if self._parser is None:
                    raise SideStreamError(f"{where}: record before the side-stream header (the header SEI is "
                                          f"missing or damaged)")
                rec = self._parser.parse(payload, self._n_records)
                if rec.first_frame != self._next[rec.group]:
                    raise SideStreamError(f"{where}: {rec.group.label} record for frames from {rec.first_frame}, "
                                          f"expected {self._next[rec.group]} (an SEI is missing or damaged)")
                self._next[rec.group] = rec.first_frame + rec.frame_count
                self._n_records += 1
                if self.keep_records:
                    self._records.append(rec)
                self._filter.records[rec.group].append(rec)
        except SideStreamError as exc:
            raise SideStreamError(f"{exc}{_HINT}") from None

    def _output(self, frames: list[Frame]) -> list[Frame]:
        out = []
        for frame in frames:
            i = self.frames_out
            if self._filter is not None:
                for g, n in self._next.items():
                    if i >= n:
                        raise SideStreamError(f"{self.origin}: picture {i} is output before any {g.label} record "
                                              f"for it arrived (an SEI is missing or damaged){_HINT}")
                frame = self._filter.process(frame, self._hevc.bitdepth or 8)
            out.append(frame)
            self.frames_out += 1
        return out


__all__ = ["Decoder", "Encoder", "Packet"]
