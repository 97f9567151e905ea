"""HEVC decoding with av (FFmpeg's decoder): pictures in display order as integer planes.

Used by the x265 backend to obtain the reconstruction and by the decoder for every backend's streams
(HM's and av's decoders gave identical pictures in every case we compared, see docs/hm.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import av
import numpy as np

from .errors import InputFormatError
from .yuv import Frame, VideoFormat, sample_dtype

_PIX_BITDEPTH = {"yuv420p": 8, "yuvj420p": 8, "yuv420p10le": 10, "yuv420p12le": 12}


def frame_to_planes(frame: "av.VideoFrame") -> Frame:
    """The Y, U, V planes of a decoded 4:2:0 picture (copies; av's ``to_ndarray`` has no 12-bit
    conversion, so the planes are read directly, rows ``line_size`` bytes apart)."""
    name = frame.format.name
    if name not in _PIX_BITDEPTH:
        raise InputFormatError(f"decoded pictures are {name}; only 4:2:0 (8/10/12-bit) is supported")
    dtype = sample_dtype(_PIX_BITDEPTH[name])
    out = []
    for plane in frame.planes:
        rows = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)
        out.append(rows[:, :plane.width * dtype.itemsize].view(dtype).astype(dtype.newbyteorder("=")))
    return Frame(*out)


def planes_to_frame(frame: Frame, bitdepth: int) -> "av.VideoFrame":
    """An av picture of ``frame``'s planes (written directly: av's ``from_ndarray`` has no 12-bit
    conversion)."""
    h, w = frame.y.shape
    vf = av.VideoFrame(w, h, pixel_format(bitdepth))
    dtype = sample_dtype(bitdepth)
    for plane, samples in zip(vf.planes, frame.planes):
        data = np.ascontiguousarray(samples, dtype).view(np.uint8)
        if plane.line_size != data.shape[1]:  # rows padded for alignment
            padded = np.zeros((plane.height, plane.line_size), np.uint8)
            padded[:, :data.shape[1]] = data
            data = padded
        plane.update(data)
    return vf


def pixel_format(bitdepth: int) -> str:
    if bitdepth == 8:
        return "yuv420p"
    if bitdepth in (10, 12):
        return f"yuv420p{bitdepth}le"
    raise InputFormatError(f"bit depth {bitdepth} is not supported by the av backend (8, 10, 12)")


def _chunks(data: bytes | Path | str, size: int = 1 << 16) -> Iterator[bytes]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data)
        for i in range(0, len(view), size):
            yield bytes(view[i:i + size])
        return
    with open(data, "rb") as f:
        while chunk := f.read(size):
            yield chunk


def ffmpeg_reason(exc: "av.error.FFmpegError") -> str:
    """FFmpeg's reason for a failure, without its errno and function names."""
    return getattr(exc, "strerror", None) or str(exc)


def _decode_error(origin: str, exc: "av.error.FFmpegError") -> InputFormatError:
    return InputFormatError(f"{origin}: HEVC decoding failed (FFmpeg: {ffmpeg_reason(exc)}): the stream is damaged, "
                            f"or not HEVC")


class HevcDecoder:
    """Push Annex-B bytes, get decoded pictures (display order). ``bitdepth`` is known after the first."""

    def __init__(self, origin: str = "HEVC stream") -> None:
        self.origin = origin  # named in errors
        self._codec = av.CodecContext.create("hevc", "r")
        self.bitdepth: int | None = None
        self.frames_out = 0

    def _convert(self, frames: Iterable["av.VideoFrame"]) -> list[Frame]:
        out = []
        for frame in frames:
            if self.bitdepth is None:
                self.bitdepth = _PIX_BITDEPTH.get(frame.format.name)
            out.append(frame_to_planes(frame))
        self.frames_out += len(out)
        return out

    def push(self, chunk: bytes) -> list[Frame]:
        try:
            out: list[Frame] = []
            for packet in self._codec.parse(chunk):
                out += self._convert(self._codec.decode(packet))
            return out
        except av.error.FFmpegError as exc:
            raise _decode_error(self.origin, exc) from None

    def flush(self) -> list[Frame]:
        try:
            out: list[Frame] = []
            for packet in self._codec.parse(None):
                out += self._convert(self._codec.decode(packet))
            out += self._convert(self._codec.decode(None))
            return out
        except av.error.FFmpegError as exc:
            raise _decode_error(self.origin, exc) from None


def decode_frames(data: bytes | Path | str | Iterable[bytes], decoder: HevcDecoder | None = None) -> Iterator[Frame]:
    """Decode an HEVC Annex-B elementary stream (bytes, a file, or an iterable of byte chunks)."""
    dec = decoder if decoder is not None else HevcDecoder(str(data) if isinstance(data, (Path, str)) else "HEVC stream")
    chunks = data if not isinstance(data, (bytes, bytearray, memoryview, Path, str)) else _chunks(data)
    for chunk in chunks:
        yield from dec.push(chunk)
    yield from dec.flush()


def stream_format(frame: Frame, bitdepth: int, fps) -> VideoFormat:
    h, w = frame.y.shape
    return VideoFormat(w, h, fps, bitdepth)
