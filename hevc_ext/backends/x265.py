"""The zero-install backend: x265 (``libx265`` inside the ``av`` wheel) to encode, av to decode.

Constant QP like the common test conditions (x265's own I/B QP offsets apply: ipratio 1.4, pbratio
1.3). Coding structures:

* ``ra`` — intra (CRA, open GOP) every ``intra_period`` pictures, 7 B-pictures between references with
  x265's B-pyramid (``bframes=7:b-adapt=0:b-pyramid=1``); x265's pyramid has one level below the
  reference B picture, shallower than HM's four-level hierarchy.
* ``ldp`` — one intra picture, then P pictures only (``bframes=0``, infinite GOP).
* ``ldb`` — refused: x265 cannot code low-delay B (generalised P/B) pictures, whose two reference
  lists both point to the past; use ``ldp`` or the HM backend.
"""

from __future__ import annotations

import logging
import re
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from ..errors import BackendError, BackendUnavailableError, UsageError
from ..hevcdec import HevcDecoder, pixel_format, planes_to_frame
from ..yuv import MemmapSource, VideoSource, VideoWriter
from ..commands import format_command
from .base import Backend, CodingConfig, EncodeResult, Progress, frame_count

log = logging.getLogger("hevc_ext.backends.x265")
_VERSION_RE = re.compile(rb"x265 \(build (\d+)\) - ([^:\s]+)")


def x265_params(config: CodingConfig) -> str:
    common = [f"qp={config.qp}", "scenecut=0", "log-level=error", "info=1"]
    if config.mode == "ra":
        p = config.intra_period
        structure = [f"keyint={p}", f"min-keyint={p}", "bframes=7", "b-adapt=0", "b-pyramid=1", "open-gop=1"]
    elif config.mode == "ldp":
        structure = ["keyint=-1", "bframes=0"]
    else:
        raise UsageError("x265 cannot code low-delay B (ldb): its B pictures always have a future "
                         "reference. Use --mode ldp (P pictures only) with x265, or --codec hm for ldb.")
    extra = [e for e in config.extra if e]
    return ":".join(structure + common + extra)


class X265Backend(Backend):
    name = "x265"

    def __init__(self, preset: str = "medium") -> None:
        self.preset = preset
        self._version: str | None = None

    def availability(self) -> tuple[bool, str]:
        if "libx265" not in av.codecs_available:
            return False, "this av build has no libx265 encoder"
        return True, f"libx265 in av {av.__version__}"

    def version(self) -> str:
        if self._version is None:
            self._version = self._probe_version()
        return self._version

    def _probe_version(self) -> str:
        cc = av.CodecContext.create("libx265", "w")
        cc.width, cc.height, cc.pix_fmt, cc.time_base = 64, 64, "yuv420p", Fraction(1, 25)
        cc.options = {"x265-params": "log-level=error:info=1"}
        frame = av.VideoFrame.from_ndarray(np.zeros((96, 64), np.uint8), format="yuv420p")
        frame.pts = 0
        data = b"".join(bytes(p) for p in list(cc.encode(frame)) + list(cc.encode(None)))
        m = _VERSION_RE.search(data)
        return f"x265 {m.group(2).decode()}" if m else "x265 (unknown version)"

    def equivalent_command(self, source: VideoSource, config: CodingConfig, n: int, out: Path) -> list[str]:
        """The ffmpeg command line that makes the same libx265 call (logged for copy-paste)."""
        fmt = source.fmt
        return ["ffmpeg", "-f", "rawvideo", "-pix_fmt", pixel_format(fmt.bitdepth),
                "-s", f"{fmt.width}x{fmt.height}", "-r", f"{fmt.fps.numerator}/{fmt.fps.denominator}",
                "-i", source.origin, "-frames:v", str(n), "-c:v", "libx265", "-preset", self.preset,
                "-x265-params", x265_params(config), str(out)]

    def encode(self, source: VideoSource, config: CodingConfig, workdir: Path,
               progress: Progress | None = None) -> EncodeResult:
        ok, why = self.availability()
        if not ok:
            raise BackendUnavailableError(f"x265 backend unavailable: {why}")
        params = x265_params(config)
        n = frame_count(source, config)
        fmt = source.fmt
        stream_path = workdir / "stream.hevc"
        recon_path = workdir / "recon.yuv"
        cmd = self.equivalent_command(source, config, n, stream_path)
        log.info("x265 (through av; equivalent command): %s", format_command(cmd))
        start = time.perf_counter()
        cc = av.CodecContext.create("libx265", "w")
        cc.width, cc.height = fmt.width, fmt.height
        cc.pix_fmt = pixel_format(fmt.bitdepth)
        cc.time_base = Fraction(fmt.fps.denominator, fmt.fps.numerator)
        cc.framerate = fmt.fps
        cc.options = {"x265-params": params, "preset": self.preset}
        bits = [0] * n
        decoder = HevcDecoder(f"x265 stream {stream_path}")
        decoded = 0
        try:
            with open(stream_path, "wb") as out, open(recon_path, "wb") as rec:
                writer = VideoWriter(rec, fmt, y4m=False)

                def emit(packets: list) -> None:
                    nonlocal decoded
                    for packet in packets:
                        data = bytes(packet)
                        out.write(data)
                        if packet.pts is None or not 0 <= packet.pts < n:
                            raise BackendError(f"x265 returned a packet with unexpected pts {packet.pts}")
                        bits[packet.pts] += 8 * len(data)
                        for frame in decoder.push(data):
                            writer.write(frame)
                            decoded += 1

                for i in range(n):
                    frame = planes_to_frame(source[i], fmt.bitdepth)
                    frame.pts = i
                    emit(list(cc.encode(frame)))
                    if progress:
                        progress(i + 1, n)
                emit(list(cc.encode(None)))
                for frame in decoder.flush():
                    writer.write(frame)
                    decoded += 1
        except av.error.FFmpegError as exc:
            raise BackendError(f"x265 failed: {exc}\n  command (equivalent): {format_command(cmd)}") from None
        if decoded != n:
            raise BackendError(f"decoding x265's stream gave {decoded} pictures, expected {n}")
        seconds = time.perf_counter() - start
        return EncodeResult(stream_path, MemmapSource(str(recon_path), fmt, 0, 0, n), bits, self.name,
                            self.version(), [cmd], None, seconds)
