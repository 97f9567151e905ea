"""The reference backend: HM (the HEVC test model, HM-16.x), run as external programs.

The paper's results are relative to HM-16.17 under the common test conditions (CTC). HM is not part of
this repository: a user builds it from the official repository and points ``HEVC_NLF_HM_DIR`` at it, or
places it at ``third_party/HM`` (see third_party/README.md). That directory must hold
``bin/TAppEncoderStatic``, ``bin/TAppDecoderStatic`` and HM's own ``cfg/``.

Encoding uses HM's own CTC configuration files, unchanged, plus the sequence options on the command
line (docs/hm.md):

=====  ==========================================  =================================================
mode   8-bit input (Main)                           10-bit input (Main10)
=====  ==========================================  =================================================
ra     ``cfg/encoder_randomaccess_main.cfg``        ``cfg/encoder_randomaccess_main10.cfg``
ldb    ``cfg/encoder_lowdelay_main.cfg``            ``cfg/encoder_lowdelay_main10.cfg``
ldp    ``cfg/encoder_lowdelay_P_main.cfg``          ``cfg/encoder_lowdelay_P_main10.cfg``
=====  ==========================================  =================================================

Input, internal and output bit depth all equal the source's, so HM's reconstruction (``-o``) has the
source's sample format and the decoder side (av) sees the same bit depth. The reconstruction is HM's
``-o`` output; after every encode it is compared with what av's decoder (the decoder side's) makes of
the bitstream (``decoder="av"``, default), or HM's own decoder (``"hm"``), both, or neither.

Every command line is logged at INFO level in a form that can be pasted into a shell, and HM's log is
kept in the working directory (``hm_encoder.log``; see ``--keep-tmp``).
"""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import BackendError, BackendUnavailableError, InputFormatError, MismatchError, UsageError
from ..hevcdec import HevcDecoder, decode_frames
from ..hmlog import EncoderLog, display_order_bits, parse_decoder_log, parse_encoder_log, parse_version
from ..metrics import PLANES, PsnrAccumulator, kbps
from ..yuv import MemmapSource, VideoFormat, VideoSource, VideoWriter, is_y4m_name
from ..commands import format_command
from .base import Backend, CodingConfig, EncodeResult, Progress, frame_count

log = logging.getLogger("hevc_ext.backends.hm")

HM_DIR_ENV = "HEVC_NLF_HM_DIR"
HM_TIMEOUT_ENV = "HEVC_NLF_HM_TIMEOUT"
DEFAULT_TIMEOUT = 6 * 3600.0  # seconds; a 2560x1600 CTC sequence takes hours in HM
HM_REPOSITORY = "https://vcgit.hhi.fraunhofer.de/jvet/HM"
PAPER_VERSION = "16.17"
ENCODER_NAMES = ("TAppEncoderStatic", "TAppEncoder")
DECODER_NAMES = ("TAppDecoderStatic", "TAppDecoder")
CFG_FILES = {
    ("ra", 8): "encoder_randomaccess_main.cfg", ("ra", 10): "encoder_randomaccess_main10.cfg",
    ("ldb", 8): "encoder_lowdelay_main.cfg", ("ldb", 10): "encoder_lowdelay_main10.cfg",
    ("ldp", 8): "encoder_lowdelay_P_main.cfg", ("ldp", 10): "encoder_lowdelay_P_main10.cfg",
}
DECODERS = ("av", "hm", "both", "none")
LOG_TAIL_LINES = 20

# HEVC levels (Rec. ITU-T H.265 Table A.8): MaxLumaPs (samples), MaxLumaSr (samples/s). The level also
# bounds the picture width/height by sqrt(8 * MaxLumaPs). Bit-rate limits are not checked (HM does not).
LEVELS = (
    ("1", 36864, 552960), ("2", 122880, 3686400), ("2.1", 245760, 7372800),
    ("3", 552960, 16588800), ("3.1", 983040, 33177600), ("4", 2228224, 66846720),
    ("4.1", 2228224, 133693440), ("5", 8912896, 267386880), ("5.1", 8912896, 534773760),
    ("5.2", 8912896, 1069547520), ("6", 35651584, 1069547520), ("6.1", 35651584, 2139095040),
    ("6.2", 35651584, 4278190080),
)


def hevc_level(width: int, height: int, fps: float) -> str:
    """The lowest level whose picture-size and luma-sample-rate limits admit the sequence.

    Gives the CTC per-sequence levels, e.g. 416x240@50 → 2.1, 832x480@60 → 3.1, 1280x720@60 → 4,
    1920x1080@50 → 4.1, 2560x1600@30 → 5.
    """
    ps = width * height
    sr = ps * fps
    for name, max_ps, max_sr in LEVELS:
        limit = math.sqrt(8 * max_ps)
        if ps <= max_ps and sr <= max_sr and width <= limit and height <= limit:
            return name
    return LEVELS[-1][0]


def repo_hm_dir() -> Path:
    """``third_party/HM`` beside the package (the repository root for a source checkout)."""
    return Path(__file__).resolve().parents[2] / "third_party" / "HM"


# ----------------------------------------------------------------------------------------- locating
@dataclass(frozen=True)
class HMInstall:
    root: Path
    encoder: Path
    decoder: Path
    cfg_dir: Path
    source: str  # where it was found: "HEVC_NLF_HM_DIR", "third_party/HM" or "argument"

    def cfg(self, mode: str, bitdepth: int) -> Path:
        return self.cfg_dir / CFG_FILES[(mode, bitdepth)]


def _find_program(root: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        path = root / "bin" / name
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


def locate_hm(hm_dir: str | os.PathLike | None = None) -> tuple[HMInstall | None, str]:
    """Find HM: ``hm_dir``, else ``$HEVC_NLF_HM_DIR``, else ``third_party/HM``. Returns the
    installation (or None) and a sentence saying where it was found, or exactly what is missing."""
    if hm_dir is not None:
        root, source = Path(hm_dir), "argument"
    elif os.environ.get(HM_DIR_ENV):
        root, source = Path(os.environ[HM_DIR_ENV]), HM_DIR_ENV
    else:
        root, source = repo_hm_dir(), "third_party/HM"
    where = {"argument": f"the HM directory {root}", HM_DIR_ENV: f"{HM_DIR_ENV}={root}",
             "third_party/HM": f"{HM_DIR_ENV} is not set and {root}"}[source]
    if not root.is_dir():
        return None, f"{where} does not exist"
    encoder = _find_program(root, ENCODER_NAMES)
    decoder = _find_program(root, DECODER_NAMES)
    missing = []
    if encoder is None:
        missing.append("bin/TAppEncoderStatic")
    if decoder is None:
        missing.append("bin/TAppDecoderStatic")
    missing += [f"cfg/{name}" for (_, bd), name in sorted(CFG_FILES.items()) if bd == 8
                and not (root / "cfg" / name).is_file()]
    if missing or encoder is None or decoder is None:
        return None, f"{where} has no {', '.join(missing)}"
    return HMInstall(root, encoder, decoder, root / "cfg", source), f"{where}"


def how_to_provide(problem: str) -> str:
    """The full message for a missing HM: what is missing, then how to provide it."""
    return (f"HM (the HEVC reference software) was not found: {problem}. "
            f"Provide HM-{PAPER_VERSION} (the paper's anchor; HM-16.20 gives identical streams): clone "
            f"{HM_REPOSITORY} at tag HM-{PAPER_VERSION}, build it with HM's own instructions "
            f"(make -C build/linux release), then set {HM_DIR_ENV} to the HM directory (the one holding "
            f"bin/TAppEncoderStatic, bin/TAppDecoderStatic and cfg/) or put that directory at "
            f"{repo_hm_dir()}. Step by step: third_party/README.md.")


# ----------------------------------------------------------------------------------- running HM
def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    rows = [r for r in text.splitlines() if r.strip()]
    return "\n".join(rows[-lines:])


def _failure(what: str, argv: Sequence[str], stdout_log: Path, stderr_log: Path, detail: str) -> BackendError:
    out_tail, err_tail = _tail(stdout_log), _tail(stderr_log, 10)
    parts = [f"{what} {detail}", f"  command: {format_command(argv)}"]
    if out_tail:
        parts.append(f"  last lines of {stdout_log}:\n" + "\n".join("    " + r for r in out_tail.splitlines()))
    if err_tail:
        parts.append(f"  last lines of {stderr_log}:\n" + "\n".join("    " + r for r in err_tail.splitlines()))
    return BackendError("\n".join(parts))


def run_hm(argv: Sequence[str], stdout_log: Path, stderr_log: Path, timeout: float, cwd: Path,
           what: str, on_line: Callable[[str], None] | None = None) -> None:
    """Run an HM program from an argv list; its stdout goes to ``stdout_log`` (and through ``on_line``),
    its stderr to ``stderr_log``. Non-zero exit, a signal or the timeout → :class:`BackendError` with
    the command and the last lines of both logs."""
    log.info("%s: %s", what, format_command(argv))
    timed_out = threading.Event()
    try:
        with open(stdout_log, "w") as out, open(stderr_log, "w") as err:
            proc = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=err, cwd=cwd,
                                    text=True, errors="replace", bufsize=1)

            def kill() -> None:
                timed_out.set()
                proc.kill()

            timer = threading.Timer(timeout, kill)
            timer.daemon = True
            timer.start()
            try:
                for line in proc.stdout or ():
                    out.write(line)
                    if on_line is not None:
                        on_line(line)
                rc = proc.wait()
            finally:
                timer.cancel()
                if proc.poll() is None:  # interrupted (KeyboardInterrupt, an exception in on_line)
                    proc.kill()
                    proc.wait()
    except OSError as exc:
        raise BackendError(f"{what} could not be started: {exc}\n  command: {format_command(argv)}") from None
    if timed_out.is_set():
        raise _failure(what, argv, stdout_log, stderr_log,
                       f"did not finish within {timeout:g} s and was stopped (timeout; set {HM_TIMEOUT_ENV} "
                       f"or HMBackend(timeout=...) to allow longer)")
    if rc != 0:
        reason = f"was killed by signal {-rc}" if rc < 0 else f"failed with exit code {rc}"
        raise _failure(what, argv, stdout_log, stderr_log, reason)


def _default_timeout() -> float:
    text = os.environ.get(HM_TIMEOUT_ENV)
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{HM_TIMEOUT_ENV}={text!r}: expected a number of seconds") from None
    if value <= 0:
        raise UsageError(f"{HM_TIMEOUT_ENV}={text!r}: expected a positive number of seconds")
    return value


def cfg_gop_size(cfg: Path) -> int | None:
    """``GOPSize`` of an HM configuration file (16 in HM-16.17's random-access cfg, 4 in low delay)."""
    try:
        for line in cfg.read_text(errors="replace").splitlines():
            m = re.match(r"\s*GOPSize\s*:\s*(\d+)", line)
            if m:
                return int(m.group(1))
    except OSError:
        return None
    return None


def _is_raw_file(source: VideoSource) -> bool:
    """Whether ``source.origin`` is a raw 4:2:0 file HM can read directly (frames from offset 0)."""
    origin = source.origin
    if not isinstance(source, MemmapSource) or not origin or is_y4m_name(origin) or not os.path.isfile(origin):
        return False
    with open(origin, "rb") as f:
        if f.read(9) == b"YUV4MPEG2":
            return False
    return os.path.getsize(origin) % source.fmt.frame_bytes == 0


def _read_recon(path: Path, fmt: VideoFormat, n: int, what: str) -> MemmapSource:
    if not path.is_file():
        raise BackendError(f"{what} wrote no reconstruction {path}")
    size = path.stat().st_size
    if size != n * fmt.frame_bytes:
        raise BackendError(f"{what}: reconstruction {path} has {size} bytes, expected {n} pictures of "
                           f"{fmt.describe()} ({n * fmt.frame_bytes} bytes)")
    return MemmapSource(str(path), fmt, 0, 0, n)


# ------------------------------------------------------------------------------------ HM decoder
@dataclass
class HMDecodeResult:
    output: Path
    version: str | None
    pictures: int
    hash_checked: int  # pictures whose decoded-picture-hash SEI was verified (0 without the SEI)
    command: list[str]
    log: Path
    seconds: float


def hm_decode(bitstream: str | os.PathLike, output: str | os.PathLike, *, hm_dir: str | os.PathLike | None = None,
              output_bitdepth: int = 0, timeout: float | None = None,
              workdir: str | os.PathLike | None = None) -> HMDecodeResult:
    """Decode ``bitstream`` with HM's TAppDecoderStatic into the raw 4:2:0 file ``output``.

    ``output_bitdepth`` 0 writes the stream's own bit depth (HM's ``-d 0``). A failed picture-hash check
    (when the stream carries the SEI) raises :class:`MismatchError`.
    """
    hm, why = locate_hm(hm_dir)
    if hm is None:
        raise BackendUnavailableError(how_to_provide(why))
    out = Path(output).resolve()
    wd = Path(workdir) if workdir is not None else out.parent
    argv = [str(hm.decoder), "-b", str(Path(bitstream).resolve()), "-o", str(out), "-d", str(output_bitdepth)]
    stdout_log, stderr_log = wd / "hm_decoder.log", wd / "hm_decoder.stderr.log"
    start = time.perf_counter()
    run_hm(argv, stdout_log, stderr_log, timeout if timeout is not None else _default_timeout(), wd,
           "HM decoder")
    seconds = time.perf_counter() - start
    version, pics = parse_decoder_log(stdout_log.read_text(errors="replace"))
    bad = [p.poc for p in pics if p.hash_status == "ERROR"]
    if bad:
        raise MismatchError(f"HM decoder: decoded picture hash mismatch for POC {', '.join(map(str, bad[:10]))} "
                            f"of {bitstream}\n  command: {format_command(argv)}")
    if not pics:
        raise _failure("HM decoder", argv, stdout_log, stderr_log, "decoded no pictures")
    return HMDecodeResult(out, version, len(pics), sum(p.hash_status == "OK" for p in pics), argv, stdout_log,
                          seconds)


def compare_with_av(bitstream: str | os.PathLike, recon: VideoSource) -> tuple[bool, int, str]:
    """Decode ``bitstream`` with av and compare every picture with ``recon`` sample by sample.

    Returns (identical, pictures decoded, a sentence)."""
    dec = HevcDecoder(str(bitstream))
    count = 0
    for i, frame in enumerate(decode_frames(Path(bitstream), dec)):
        count += 1
        if i >= len(recon):
            continue
        ref = recon[i]
        for name, a, b in zip(PLANES, ref.planes, frame.planes):
            if a.shape != b.shape or not np.array_equal(a, np.asarray(b, a.dtype)):
                return False, count, f"picture {i} plane {name.upper()} differs between HM's reconstruction and av"
    if dec.bitdepth is not None and dec.bitdepth != recon.fmt.bitdepth:
        return False, count, f"av decodes {dec.bitdepth}-bit pictures, the reconstruction is {recon.fmt.bitdepth}-bit"
    if count != len(recon):
        return False, count, f"av decoded {count} pictures, HM's reconstruction has {len(recon)}"
    return True, count, f"av's decoder gives the same {count} pictures as HM's reconstruction (byte-identical)"


def _files_identical(a: Path, b: Path, chunk: int = 1 << 20) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True


# --------------------------------------------------------------------------------- our own figures
def _round(x: float | None, nd: int = 4) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), nd)


def compare_figures(hm: EncoderLog, acc: PsnrAccumulator, frame_bits: list[int], file_bytes: int,
                    fps: float, hm_fps: int) -> dict:
    """Our figures from the files (rate from the bitstream size, PSNR from reconstruction vs source, HM's
    conventions) and their differences from HM's SUMMARY (all pictures)."""
    n = len(frame_bits)
    ours_psnr = acc.mean()
    per_frame = acc.per_frame()
    ours = {"frames": n, "file_bytes": file_bytes, "kbps": _round(kbps(8 * file_bytes, n, fps)),
            **{f"psnr_{p}": _round(ours_psnr[p]) for p in PLANES}, "psnr_yuv": _round(acc.yuv_psnr())}
    row = hm.summary["all"]
    per_pic = [abs(p.psnr[c] - per_frame[p.poc][c]) for p in hm.pictures if p.psnr and 0 <= p.poc < n
               for c in PLANES if p.psnr.get(c) is not None]
    sei_bits = 8 * file_bytes - sum(frame_bits)
    diff = {
        "kbps": _round(ours["kbps"] - row.kbps, 4) if row.kbps is not None and ours["kbps"] is not None else None,
        **{f"psnr_{k}": _round(ours[f"psnr_{k}"] - v, 4) if v is not None and ours[f"psnr_{k}"] is not None
           else None for k, v in row.psnr.items()},
        "per_picture_psnr_max_abs": _round(max(per_pic) if per_pic else None, 5),
        "bits_not_in_hm_pictures": sei_bits,
    }
    notes = []
    if sei_bits:
        notes.append(f"the file has {sei_bits} bits ({sei_bits // 8} bytes) more than the sum of HM's per-picture "
                     f"bits: HM does not count SEI NAL units (e.g. the decoded picture hash) in its bit figures")
    if hm_fps != fps:
        notes.append(f"HM computes its bitrate with its integer frame rate {hm_fps}, ours with {fps:g} fps")
    notes.append("HM prints PSNRs with 4 decimals; differences up to 0.00005 dB are rounding")
    return {"hm_bytes_written": hm.bytes_written, "hm_picture_bits": sum(frame_bits), "ours": ours,
            "ours_minus_hm": diff, "notes": notes}


# ------------------------------------------------------------------------------------------ backend
class HMBackend(Backend):
    """HM's TAppEncoderStatic (HM-16.17 for the paper's anchor) behind the backend interface."""

    name = "hm"

    def __init__(self, hm_dir: str | os.PathLike | None = None, timeout: float | None = None,
                 decoder: str = "av") -> None:
        if decoder not in DECODERS:
            raise UsageError(f"unknown HM reconstruction check {decoder!r}: expected one of {', '.join(DECODERS)}")
        if timeout is not None and timeout <= 0:
            raise UsageError(f"HM timeout must be positive, got {timeout}")
        self.hm_dir = hm_dir
        self.timeout = timeout
        self.decoder = decoder
        self._version: str | None = None
        self._banner: str | None = None

    # -- interface
    def install(self) -> HMInstall:
        hm, why = locate_hm(self.hm_dir)
        if hm is None:
            raise BackendUnavailableError(how_to_provide(why))
        return hm

    def availability(self) -> tuple[bool, str]:
        hm, why = locate_hm(self.hm_dir)
        if hm is None:
            return False, how_to_provide(why)
        return True, f"HM at {hm.root} (from {why})"

    def version(self) -> str:
        if self._version is None:
            hm = self.install()
            try:
                proc = subprocess.run([str(hm.encoder), "--help"], capture_output=True, text=True,
                                      errors="replace", timeout=60)
                text = proc.stdout + proc.stderr
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise BackendError(f"cannot run {hm.encoder} --help: {exc}") from None
            ver = parse_version(text)
            if ver is None:
                raise BackendError(f"{hm.encoder} --help printed no 'HM software: Encoder Version [...]' banner")
            self._version, self._banner = ver
        return f"HM-{self._version}"

    def encode(self, source: VideoSource, config: CodingConfig, workdir: Path,
               progress: Progress | None = None) -> EncodeResult:
        hm = self.install()
        fmt = source.fmt
        n = frame_count(source, config)
        if fmt.bitdepth not in (8, 10):
            raise UsageError(f"the HM backend codes 8-bit (Main) and 10-bit (Main10) 4:2:0 input; this input is "
                             f"{fmt.bitdepth}-bit (HM's RExt configurations are not supported)")
        cfg = hm.cfg(config.mode, fmt.bitdepth)
        if not cfg.is_file():
            raise BackendUnavailableError(how_to_provide(f"{hm.root} has no cfg/{cfg.name}"))
        version = self.version()
        workdir = Path(workdir).resolve()
        gop = cfg_gop_size(cfg)
        intra_period = -1
        if config.mode == "ra":
            intra_period = config.intra_period
            if gop and intra_period % gop:
                raise UsageError(f"HM's random-access configuration {cfg.name} has GOPSize {gop}, and HM's "
                                 f"IntraPeriod must be a multiple of it: --intra-period {intra_period} is not "
                                 f"(use e.g. {', '.join(str(gop * k) for k in (2, 4, 8, 16))})")
        input_path = self._input_file(source, n, workdir)
        stream_path, recon_path = workdir / "stream.hevc", workdir / "hm_recon.yuv"
        fps = float(fmt.fps)
        hm_fps = max(1, round(fps))
        if hm_fps != fps:
            log.warning("HM takes an integer frame rate: coding %g fps as -fr %d (HM's kbps use %d)", fps, hm_fps,
                        hm_fps)
        level = hevc_level(fmt.width, fmt.height, fps)
        bd = str(fmt.bitdepth)
        argv = [str(hm.encoder), "-c", str(cfg), "-i", str(input_path), "-wdt", str(fmt.width),
                "-hgt", str(fmt.height), "-fr", str(hm_fps), "-f", str(n), "-q", str(config.qp),
                f"--InputBitDepth={bd}", f"--OutputBitDepth={bd}", f"--InternalBitDepth={bd}",
                f"--Level={level}"]
        if config.mode == "ra":
            argv.append(f"--IntraPeriod={intra_period}")
        if fmt.width % 8 or fmt.height % 8:  # HM's minimum CU size: pad, and crop in the conformance window
            argv.append("--ConformanceWindowMode=1")
        argv += ["-b", str(stream_path), "-o", str(recon_path), *[e for e in config.extra if e]]
        stdout_log, stderr_log = workdir / "hm_encoder.log", workdir / "hm_encoder.stderr.log"
        done = 0

        def on_line(line: str) -> None:
            nonlocal done
            if line.startswith("POC"):
                done += 1
                if progress:
                    progress(min(done, n), n)

        start = time.perf_counter()
        run_hm(argv, stdout_log, stderr_log, self.timeout if self.timeout is not None else _default_timeout(),
               workdir, "HM encoder", on_line)
        seconds = time.perf_counter() - start
        hm_log = parse_encoder_log(stdout_log.read_text(errors="replace"))
        if not hm_log.complete:
            raise _failure("HM encoder", argv, stdout_log, stderr_log, "exited without its SUMMARY (incomplete log)")
        frame_bits = display_order_bits(hm_log.pictures, n)
        if not stream_path.is_file():
            raise _failure("HM encoder", argv, stdout_log, stderr_log, f"wrote no bitstream {stream_path}")
        recon = _read_recon(recon_path, fmt, n, "HM encoder")
        file_bytes = stream_path.stat().st_size
        if hm_log.bytes_written is not None and hm_log.bytes_written != file_bytes:
            raise BackendError(f"HM reports {hm_log.bytes_written} bytes written, {stream_path} has {file_bytes}")

        ysize = fmt.width * fmt.height
        acc = PsnrAccumulator(fmt.bitdepth, (ysize, ysize // 4, ysize // 4))
        for i in range(n):
            acc.add_planes(source[i].planes, recon[i].planes)
        figures = compare_figures(hm_log, acc, frame_bits, file_bytes, fps, hm_fps)
        commands = [argv]
        check = self._check_decoders(stream_path, recon, workdir, commands)
        type_counts = {t: sum(p.slice_type == t for p in hm_log.pictures) for t in "IPB"}
        summary = {
            "backend": "hm", "hm_version": hm_log.version or self._version, "hm_banner": hm_log.banner,
            "hm_dir": str(hm.root), "hm_found_by": hm.source, "cfg": str(cfg), "profile":
                "main" if fmt.bitdepth == 8 else "main10", "level": level, "hm_frame_rate": hm_fps,
            "bitdepth": {"input": fmt.bitdepth, "internal": fmt.bitdepth, "output": fmt.bitdepth},
            "intra_period": intra_period, "hm_gop_size": gop,
            "slice_types": type_counts,
            "hm_summary": {k: v.as_dict() for k, v in hm_log.summary.items()},
            **figures,
            "decoder_check": check,
            "hm_seconds": round(seconds, 3), "log": str(stdout_log),
        }
        row = hm_log.summary["all"]
        log.info("HM-%s %s QP %d: HM SUMMARY %s kbps Y %s dB; ours %s kbps Y %s dB; %s", summary["hm_version"],
                 config.mode, config.qp, row.kbps, row.psnr["y"], figures["ours"]["kbps"], figures["ours"]["psnr_y"],
                 check["result"])
        return EncodeResult(stream_path, recon, frame_bits, self.name, version, commands, summary, seconds)

    # -- helpers
    def _input_file(self, source: VideoSource, n: int, workdir: Path) -> Path:
        if _is_raw_file(source):
            return Path(source.origin).resolve()
        path = workdir / "hm_input.yuv"
        log.info("writing the first %d pictures of %s as raw YUV for HM: %s", n, source.origin, path)
        with open(path, "wb") as f:
            writer = VideoWriter(f, source.fmt, y4m=False)
            for i, frame in enumerate(source):
                if i >= n:
                    break
                writer.write(frame)
        return path

    def _check_decoders(self, stream: Path, recon: MemmapSource, workdir: Path,
                        commands: list[list[str]]) -> dict:
        result: dict = {"decoder": self.decoder}
        start = time.perf_counter()
        if self.decoder in ("av", "both"):
            same, count, text = compare_with_av(stream, recon)
            result["av_identical"] = same
            if not same:
                raise MismatchError(f"{text}: {stream}")
        if self.decoder in ("hm", "both"):
            out = workdir / "hm_decoded.yuv"
            dec = hm_decode(stream, out, hm_dir=self.hm_dir, timeout=self.timeout, workdir=workdir)
            commands.append(dec.command)
            same = _files_identical(out, Path(recon.origin))
            result["hm_decoder_identical"] = same
            if not same:
                raise MismatchError(f"HM's decoder output {out} differs from HM's reconstruction {recon.origin}")
        names = {"av": "av's decoder", "hm": "HM's decoder", "both": "av's and HM's decoders"}
        result["result"] = ("not checked" if self.decoder == "none" else
                            f"{names[self.decoder]}: same {len(recon)} pictures as HM's reconstruction")
        result["seconds"] = round(time.perf_counter() - start, 3)
        return result


def hm_decode_source(bitstream: str | os.PathLike, workdir: str | os.PathLike, fmt: VideoFormat, *,
                     hm_dir: str | os.PathLike | None = None, timeout: float | None = None) -> MemmapSource:
    """Decode with HM's decoder (the decoder side "on request") and view the pictures as a source.

    ``fmt`` gives the geometry and bit depth (e.g. from the side stream's header)."""
    out = Path(workdir) / "hm_decoded.yuv"
    res = hm_decode(bitstream, out, hm_dir=hm_dir, timeout=timeout, output_bitdepth=fmt.bitdepth, workdir=workdir)
    size = out.stat().st_size
    if size % fmt.frame_bytes:
        raise InputFormatError(f"HM decoder output {out} ({size} bytes) is not a whole number of {fmt.describe()} "
                               f"pictures: the stream's size or bit depth differs")
    if size // fmt.frame_bytes != res.pictures:
        raise InputFormatError(f"HM decoder output {out} holds {size // fmt.frame_bytes} pictures of "
                               f"{fmt.describe()}, its log lists {res.pictures}")
    return _read_recon(out, fmt, res.pictures, "HM decoder")
