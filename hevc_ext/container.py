"""Containers: HEVC elementary streams in and out of MP4 / Matroska, and any video av can decode.

* :func:`mux` remuxes an Annex-B stream into MP4 or MKV without re-encoding: one packet per access
  unit, NAL units unchanged (FFmpeg's muxers convert start codes to length prefixes and keep every NAL
  unit, our SEI included, in-band; the parameter sets are also copied into the ``hvcC`` box). Timestamps
  come from the picture order counts (:func:`hevc_ext.sei.display_order`).
* :func:`read_annexb` turns any file av can demux (MP4, MKV, TS, raw .hevc...) back into an Annex-B
  byte stream: length prefixes become 4-byte start codes; the ``hvcC`` parameter sets are put in front
  only when the first access unit does not carry its own. We convert by hand instead of using
  ``hevc_mp4toannexb``, which would prepend the ``hvcC`` arrays to every intra picture.
* :func:`open_input` reads any video av can decode (or raw/Y4M through :mod:`hevc_ext.yuv`) as frames.
"""

from __future__ import annotations

import io
import logging
import sys
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO, Iterator

import av

from .errors import InputFormatError, UsageError
from .files import check_input
from .hevcdec import ffmpeg_reason, frame_to_planes, pixel_format
from .sei import (BLA_W_LP, PPS_NUT, SPS_NUT, VPS_NUT, access_units, display_order, join_nal_units,
                  split_nal_units)
from .yuv import Frame, VideoFormat, VideoSource, open_video, parse_fps

log = logging.getLogger("hevc_ext.container")

CONTAINERS = ("mp4", "mkv", "hevc")
_AV_FORMAT = {"mp4": "mp4", "mkv": "matroska"}
_SUFFIX = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mp4", ".mkv": "mkv", ".webm": "mkv",
           ".hevc": "hevc", ".h265": "hevc", ".265": "hevc", ".bin": "hevc"}


def container_for(path: str, choice: str = "auto") -> str:
    """The container to write: ``choice`` unless ``auto``, else from the file suffix (``-``: hevc)."""
    if choice != "auto":
        if choice not in CONTAINERS:
            raise UsageError(f"unknown container {choice!r}: expected auto, {', '.join(CONTAINERS)}")
        return choice
    if path == "-":
        return "hevc"
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIX:
        raise UsageError(f"{path}: cannot tell the container from the suffix {suffix!r}; use .mp4, .mkv or "
                         f".hevc, or pass --container")
    return _SUFFIX[suffix]


def is_annexb(head: bytes) -> bool:
    return head.startswith(b"\x00\x00\x01") or head.startswith(b"\x00\x00\x00\x01")


# ------------------------------------------------------------------------------------------ muxing
def mux(stream: bytes, output: str | BinaryIO, container: str, fps: Fraction) -> int:
    """Write the Annex-B ``stream`` to ``output`` (a path or a binary handle) as ``container``
    (mp4/mkv/hevc), one packet per access unit. Returns the number of packets."""
    nals, tail = split_nal_units(stream)
    aus = access_units(nals)
    if container == "hevc":
        data = join_nal_units(nals, tail)
        if isinstance(output, (str, Path)):
            Path(output).write_bytes(data)
        else:
            output.write(data)
        return len(aus)
    if container not in _AV_FORMAT:
        raise UsageError(f"unknown container {container!r}")
    display = display_order(nals)
    delay = max([0] + [a - d for a, d in enumerate(display) if d is not None])
    tb = Fraction(fps.denominator, fps.numerator)
    try:
        template = av.open(io.BytesIO(stream), format="hevc")
    except av.error.FFmpegError as exc:
        raise InputFormatError(f"HEVC stream cannot be parsed for muxing: {exc}") from None
    try:
        out = av.open(output, "w", format=_AV_FORMAT[container])
        try:
            ost = out.add_stream_from_template(template.streams.video[0])
            ost.time_base = tb
            count = 0
            last_pts = -1
            for a, au in enumerate(aus):
                packet = av.Packet(join_nal_units([nals[i] for i in au]))
                packet.stream = ost
                packet.time_base = tb
                pts = display[a]
                if pts is None:  # a picture that is not output: keep its timestamp monotonic
                    pts = last_pts
                last_pts = pts
                packet.pts = pts
                packet.dts = a - delay
                packet.is_keyframe = any(BLA_W_LP <= nals[i].type <= 23 for i in au)
                out.mux(packet)
                count += 1
        finally:
            out.close()
    except av.error.FFmpegError as exc:
        raise InputFormatError(f"muxing into {container} failed: {exc}") from None
    finally:
        template.close()
    return count


# ---------------------------------------------------------------------------------------- demuxing
def _hvcc_nals(extradata: bytes) -> tuple[int, list[bytes]]:
    """(NAL length size, the NAL units of the arrays) of an ``HEVCDecoderConfigurationRecord``."""
    if len(extradata) < 23:
        raise InputFormatError("hvcC record too short")
    length_size = (extradata[21] & 3) + 1
    pos, nals = 23, []
    for _ in range(extradata[22]):
        if pos + 3 > len(extradata):
            raise InputFormatError("hvcC record truncated")
        count = int.from_bytes(extradata[pos + 1:pos + 3], "big")
        pos += 3
        for _ in range(count):
            size = int.from_bytes(extradata[pos:pos + 2], "big")
            if pos + 2 + size > len(extradata):
                raise InputFormatError("hvcC record truncated")
            nals.append(extradata[pos + 2:pos + 2 + size])
            pos += 2 + size
    return length_size, nals


def _length_prefixed_to_annexb(data: bytes, length_size: int, origin: str) -> list[bytes]:
    nals, pos = [], 0
    while pos < len(data):
        if pos + length_size > len(data):
            raise InputFormatError(f"{origin}: truncated NAL length prefix")
        size = int.from_bytes(data[pos:pos + length_size], "big")
        pos += length_size
        if pos + size > len(data):
            raise InputFormatError(f"{origin}: NAL unit of {size} bytes runs past the packet end")
        nals.append(data[pos:pos + size])
        pos += size
    return nals


def _not_readable(origin: str, exc: "av.error.FFmpegError", expected: str) -> InputFormatError:
    """av could not open ``origin``: say what was expected, with FFmpeg's reason."""
    return InputFormatError(f"{origin}: not {expected} (FFmpeg: {ffmpeg_reason(exc)})")


def demux_annexb(source: str | BinaryIO, origin: str | None = None) -> Iterator[bytes]:
    """The access units (Annex B, decoding order) of the HEVC video track of a container."""
    origin = origin or (source if isinstance(source, str) else "<input>")
    try:
        container = av.open(source)
    except av.error.FFmpegError as exc:
        raise _not_readable(origin, exc, "an HEVC elementary stream (Annex B) or a container with HEVC video") from None
    try:
        if not container.streams.video:
            raise InputFormatError(f"{origin}: no video track")
        stream = container.streams.video[0]
        if stream.codec_context.name != "hevc":
            raise InputFormatError(f"{origin}: the video track is {stream.codec_context.name}, not HEVC")
        extradata = bytes(stream.codec_context.extradata or b"")
        length_size, ps = (_hvcc_nals(extradata) if extradata[:1] == b"\x01" else (0, []))
        first = True
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            data = bytes(packet)
            if length_size:
                units = _length_prefixed_to_annexb(data, length_size, origin)
                if first and not any(((u[0] >> 1) & 0x3F) in (VPS_NUT, SPS_NUT, PPS_NUT) for u in units if u):
                    units = ps + units
                data = b"".join(b"\x00\x00\x00\x01" + u for u in units)
            first = False
            yield data
    except av.error.FFmpegError as exc:
        raise InputFormatError(f"{origin}: demuxing failed: {exc}") from None
    finally:
        container.close()


def read_annexb(path: str) -> bytes:
    """An HEVC Annex-B byte stream from a raw .hevc file or any container av can demux."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            if is_annexb(head):
                return head + f.read()
    except OSError as exc:
        raise InputFormatError(f"{path}: cannot read: {exc.strerror}") from None
    return b"".join(demux_annexb(path))


# -------------------------------------------------------------------------------- decoded input
class AvSource(VideoSource):
    """Frames of any video av can decode, converted to 4:2:0 integer planes (read once, in order)."""

    def __init__(self, source: str | BinaryIO, origin: str, fps: str | None = None) -> None:
        self.origin = origin
        try:
            self._container = av.open(source)
        except av.error.FFmpegError as exc:
            raise _not_readable(origin, exc, "a video file FFmpeg can read") from None
        if not self._container.streams.video:
            self._container.close()
            raise InputFormatError(f"{origin}: no video track")
        self._stream = self._container.streams.video[0]
        cc = self._stream.codec_context
        name = cc.pix_fmt or "yuv420p"
        depth = 12 if "12" in name else 10 if "10" in name else 8
        rate = (parse_fps(fps) if fps is not None
                else Fraction(self._stream.average_rate or self._stream.guessed_rate or 25))
        try:
            self.fmt = VideoFormat(cc.width, cc.height, rate, depth)
        except UsageError as exc:
            self._container.close()
            raise InputFormatError(f"{origin}: {exc}") from None
        self._pix = pixel_format(depth)

    @property
    def random_access(self) -> bool:
        return False

    def __len__(self) -> int:
        raise TypeError(f"{self.origin}: the frame count of a decoded stream is not known in advance")

    def __iter__(self) -> Iterator[Frame]:
        try:
            for frame in self._container.decode(self._stream):
                if frame.width != self.fmt.width or frame.height != self.fmt.height:
                    raise InputFormatError(f"{self.origin}: picture size changes mid-stream "
                                           f"({frame.width}x{frame.height})")
                if frame.format.name != self._pix:
                    frame = frame.reformat(format=self._pix)
                yield frame_to_planes(frame)
        except av.error.FFmpegError as exc:
            raise InputFormatError(f"{self.origin}: decoding failed: {exc}") from None

    def close(self) -> None:
        self._container.close()


def open_input(path: str, size: str | None = None, fps: str | None = None, bitdepth: int | None = None,
               stdin: BinaryIO | None = None) -> VideoSource:
    """A video source for ``path``: raw .yuv / .y4m through :func:`hevc_ext.yuv.open_video`; ``-``:
    Y4M on standard input (raw with ``size``; any other stream av can read from a pipe, e.g. MKV or
    Annex-B HEVC); any other file: decoded with av."""
    if path == "-":
        stream = stdin if stdin is not None else sys.stdin.buffer
        if size is not None:
            return open_video("-", size, fps, bitdepth, stdin=stream)
        head = stream.peek(9)[:9] if hasattr(stream, "peek") else b""
        if head.startswith(b"YUV4MPEG2") or not head:
            return open_video("-", None, fps, bitdepth, stdin=stream)
        return AvSource(stream, "<stdin>", fps)
    lower = path.lower()
    if lower.endswith((".yuv", ".y4m")):
        return open_video(path, size, fps, bitdepth)
    check_input(path, "a video file")
    return AvSource(path, path, fps)
