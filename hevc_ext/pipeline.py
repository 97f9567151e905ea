"""The one orchestrator: encode (backend → segments → training → quantization → decision → side
stream) and decode (HEVC decode → side stream → integer filter → pictures).

The encoder decides with exactly what the decoder will compute: every candidate network is quantized,
run through the integer filter (the fast kernel, bit-identical to the reference) on the whole segment,
and charged the real size of its coded record. The decode path imports no torch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .arch import ALL_PACKINGS, Architecture, Group, Packing
from .backends import CodingConfig, get_backend
from .commands import format_command
from .errors import MismatchError, SideStreamError, UsageError
from .gop import Segment, split
from .hevcdec import HevcDecoder, decode_frames
from .metrics import PsnrAccumulator, kbps, sse
from .quant import QuantConfig, QuantizedNetwork, derive
from .reference import IntNetwork
from .sidecar import (HashType, PictureHash, Record, RecordType, SideStream, StreamHeader, check_stream_matches,
                      merge_off_runs, picture_crc, record_payload)
from .files import atomic_output, atomic_outputs, check_input, check_output, written_in_place
from .yuv import Frame, MemmapSource, VideoFormat, VideoSource, VideoWriter, is_y4m_name, open_video, parse_fps

log = logging.getLogger("hevc_ext.pipeline")

#: (stage, done, total, message) — stages: "encode", "train", "measure", "decode"
ProgressFn = Callable[[str, int, int, str], None]

DEFAULT_QUANT_CANDIDATES = (
    QuantConfig(weight_bits=8, bias_bits=10, scale_bits=4),
    QuantConfig(weight_bits=6, bias_bits=8, scale_bits=4),
    QuantConfig(weight_bits=5, bias_bits=8, scale_bits=2),
    QuantConfig(weight_bits=4, bias_bits=8, scale_bits=2),
    QuantConfig(weight_bits=3, bias_bits=8, scale_bits=2),
)
#: Training is skipped when even a cheap network (this many bits per parameter; the smallest records
#: measured, at b_w = 3, take 4.5 with their hash) could only pay for itself by removing more than this
#: fraction of every picture's SSE: more than any network here has reached (per picture, on average over
#: a segment's pictures: luma ~5 %, 4 % on a single picture; chroma ~20 %, 16 % on a single picture).
#: Typically a short last segment, such as the 33rd picture of an RA encode with intra period 32.
SKIP_BITS_PER_PARAM = 4.0
SKIP_SSE_FRACTION = {Group.Y: 0.15, Group.UV: 0.25}


def default_packing(width: int, height: int, group: Group) -> Packing:
    """The paper's choice (§4.2, Table 12): luma 2x2 for ≥ 2560×1600, 1x2 for 1080p, else 1x1;
    chroma always 1x1."""
    if group is Group.UV:
        return Packing(1, 1)
    if width * height >= 2560 * 1600:
        return Packing(2, 2)
    if width * height >= 1920 * 1080:
        return Packing(1, 2)
    return Packing(1, 1)


def parse_packing(text: str) -> str | Packing:
    """``auto``, ``default`` or a packing like ``1x2``."""
    if text in ("auto", "default"):
        return text
    return Packing.parse(text)


def bits_per_relative_sse(bits_per_frame: float, rd_slope_db: float) -> float:
    """What removing all of one picture's SSE in a plane would be worth in bits, to that plane's
    BD-rate.

    A sequence's PSNR is the mean of its pictures' PSNRs (HM), and along the backend's own RD curve
    doubling the rate gains ``rd_slope_db`` dB. Lowering a picture's SSE D by ΔD raises its PSNR by
    ≈ (10/ln 10)·ΔD/D dB, and thus the sequence's by 1/N of that — worth the same as
    ``(10·ln 2 / (rd_slope_db·ln 10)) · R̄ · ΔD/D`` bits, where R̄ is the mean number of bits per picture
    of the whole sequence (not of the picture: an intra picture's gain counts as much as a B picture's).
    The encoder signals a network when that value, summed over the pictures it filters and averaged
    over its planes, exceeds the network's real size: decisions consistent with per-channel BD-rates."""
    return 10.0 * math.log(2.0) / (rd_slope_db * math.log(10.0)) * bits_per_frame


def given(**options: Any) -> dict[str, Any]:
    """The options that are set (not None), for ``EncoderConfig(**given(...))``: an option left unset by
    a command line or an eval spec takes EncoderConfig's default."""
    return {k: v for k, v in options.items() if v is not None}


@dataclass(frozen=True)
class EncoderConfig:
    coding: CodingConfig = CodingConfig()
    codec: str = "x265"
    ld_gop: int = 5
    arch_y: Architecture = Architecture()
    arch_uv: Architecture = Architecture()
    packing: str | Packing = "default"  # "default" (paper), "auto" (RD search) or a fixed packing
    packing_uv: str | Packing | None = None  # None: as ``packing`` for "auto", else the paper's (1x1)
    train: Any = None  # TrainConfig (import of torch deferred); None: defaults
    quant_candidates: tuple[QuantConfig, ...] = DEFAULT_QUANT_CANDIDATES
    hash_type: HashType = HashType.MD5
    kernel: str = "auto"
    lambda_scale: float = 1.0  # multiplies the price of side bits in the decisions (1: BD-consistent)
    rd_slope_db: float = 4.5  # the backend's RD slope, dB per doubling of the rate (see bits_per_relative_sse)
    reuse_factor: float = 1.1  # low delay: new parameters only if their gain exceeds 110 % of reuse
    # low delay: a group's first network is credited with what reusing it in the following segments is
    # expected to be worth, its gain per picture decaying by this factor per segment (0: greedy, each
    # segment's decision pays for itself; see reference_credit)
    reuse_decay: float = 0.0
    reuse_horizon: int = 8  # ... over at most this many following segments
    filter_enabled: bool = True
    keep_tmp: bool = False
    embed: bool = False  # side stream as SEI NAL units inside BASE.hevc instead of BASE.nlf (docs/sei.md)
    backend_options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.lambda_scale < 0:
            raise UsageError(f"lambda scale must be >= 0, got {self.lambda_scale}")
        if not self.rd_slope_db > 0:
            raise UsageError(f"RD slope must be positive (dB per doubling of the rate), got {self.rd_slope_db}")
        if not self.reuse_factor >= 1:
            raise UsageError(f"reuse factor must be >= 1, got {self.reuse_factor}")
        if not 0 <= self.reuse_decay < 1:
            raise UsageError(f"reuse decay must be in [0, 1), got {self.reuse_decay}")
        if self.reuse_horizon < 0:
            raise UsageError(f"reuse horizon must be >= 0, got {self.reuse_horizon}")

    def arch(self, group: Group) -> Architecture:
        return self.arch_y if group is Group.Y else self.arch_uv

    def packings(self, group: Group, width: int, height: int) -> tuple[Packing, ...]:
        choice = self.packing if group is Group.Y else (
            self.packing_uv if self.packing_uv is not None else ("auto" if self.packing == "auto" else "default"))
        if choice == "auto":
            return ALL_PACKINGS
        if choice == "default":
            return (default_packing(width, height, group),)
        return (choice,)  # type: ignore[return-value]


# -------------------------------------------------------------------------------------------- report
@dataclass
class GroupDecision:
    group: Group
    decision: str  # off | reuse | new | new_diff
    packing: str | None
    config: dict | None
    side_bytes: int
    sse_before: list[int]
    sse_after: list[int]
    candidates: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0


@dataclass
class EncodeReport:
    data: dict

    def summary_line(self) -> str:
        d = self.data
        pb, pa = d["psnr_before"], d["psnr_after"]
        return (f"{d['frames']} frames, {d['hevc_bytes']} + {d['side_bytes']} side bytes; PSNR Y/U/V "
                f"{pb['y']:.3f}/{pb['u']:.3f}/{pb['v']:.3f} → {pa['y']:.3f}/{pa['u']:.3f}/{pa['v']:.3f} dB "
                f"({pa['y'] - pb['y']:+.3f}/{pa['u'] - pb['u']:+.3f}/{pa['v'] - pb['v']:+.3f})")


# ------------------------------------------------------------------------------------------- helpers
def _group_planes(frame: Frame, group: Group) -> list[np.ndarray]:
    planes = frame.planes
    return [planes[i] for i in group.plane_indices]


@contextlib.contextmanager
def _workdir(keep: bool, parent: Path | None = None) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="hevc-nlf-", dir=parent))
    try:
        yield path
    finally:
        if keep:
            log.info("kept temporary files in %s", path)
        else:
            shutil.rmtree(path, ignore_errors=True)


def spool(source: VideoSource, workdir: Path, limit: int | None) -> MemmapSource:
    """Copy a streamed source (a pipe) into a raw file so that it can be read more than once."""
    path = workdir / "input.yuv"
    n = 0
    with open(path, "wb") as f:
        writer = VideoWriter(f, source.fmt, y4m=False)
        for frame in source:
            writer.write(frame)
            n += 1
            if limit is not None and n >= limit:
                break
    if n == 0:
        raise UsageError(f"{source.origin}: no frames")
    spooled = MemmapSource(str(path), source.fmt, 0, 0, n)
    spooled.origin = source.origin  # messages name the user's input, not the spool file
    return spooled


@dataclass
class _Candidate:
    rtype: RecordType
    network: QuantizedNetwork | None
    intnet: IntNetwork | None
    payload_bytes: int
    sse: list[list[int]]  # per frame, per plane
    digest: bytes
    label: str

    @property
    def total_sse(self) -> int:
        return sum(sum(f) for f in self.sse)


class _Measure:
    """Runs candidates over a segment with the integer filter and records SSE and output hash."""

    def __init__(self, source: VideoSource, recon: VideoSource, segment: Segment, group: Group,
                 bitdepth: int, hash_type: HashType, kernel: Any) -> None:
        self.source, self.recon, self.segment, self.group = source, recon, segment, group
        self.bitdepth, self.hash_type, self.kernel = bitdepth, hash_type, kernel
        self.before = [[sse(o, r) for o, r in zip(_group_planes(source[i], group), _group_planes(recon[i], group))]
                       for i in segment.frames]

    def run(self, intnet: IntNetwork | None) -> tuple[list[list[int]], bytes]:
        if intnet is None:
            return self.before, b""
        h = PictureHash(self.hash_type, self.bitdepth)
        errs = []
        for i in self.segment.frames:
            out = self.kernel.filter_planes(_group_planes(self.recon[i], self.group), intnet, self.bitdepth)
            orig = _group_planes(self.source[i], self.group)
            errs.append([sse(o, p) for o, p in zip(orig, out)])
            for p in out:
                h.update(p)
        return errs, h.digest()


# ------------------------------------------------------------------------------------------- encoder
class _GroupState:
    """Low-delay memory of one channel group: the last signalled network and its training."""

    def __init__(self) -> None:
        self.reference: QuantizedNetwork | None = None
        self.reference_int: IntNetwork | None = None
        self.reference_train: Any = None


def reference_credit(gain_bits_per_picture: float, reuse_bits: float, later_frames: tuple[int, ...],
                     decay: float, horizon: int) -> float:
    """What a low-delay reference network is expected to be worth in the segments after this one, in bits.

    Segment ``j`` (1-based) after this one would reuse the network if that pays: its gain there is
    taken as ``decay**j`` times its gain per picture here (``gain_bits_per_picture``, already priced in
    bits) times the segment's pictures, against the REUSE record's ``reuse_bits``. Summed over at most
    ``horizon`` segments (those that exist: ``later_frames``). The greedy decision (``decay`` = 0)
    credits nothing, so a network must repay its bits within its own segment; with a credit, one that
    almost does can be signalled for the cheap reuse it allows afterwards."""
    total, factor = 0.0, 1.0
    for frames in later_frames[:horizon]:
        factor *= decay
        total += max(0.0, factor * gain_bits_per_picture * frames - reuse_bits)
    return total


def _unit_bytes(payload: bytes) -> int:
    """A framed unit's size: kind (1) + size (2) + payload + crc16 (2)."""
    return 5 + len(payload)


def _record_bytes(rec: Record, hash_type: HashType, ref: QuantizedNetwork | None) -> int:
    return _unit_bytes(record_payload(rec, hash_type, ref))


def encode(input_path: str, output_base: str | None, config: EncoderConfig, *, size: str | None = None,
           fps: str | None = None, bitdepth: int | None = None, progress: ProgressFn | None = None,
           source: VideoSource | None = None) -> EncodeReport:
    """Encode ``input_path`` and write ``output_base``.hevc and, unless ``config.embed`` carries the side
    stream as SEI inside it, ``output_base``.nlf (nothing is written when ``output_base`` is None). An
    embedding encode removes an ``output_base``.nlf left by an earlier encode (with a warning)."""
    t0 = time.perf_counter()
    TrainConfig = train_config_class()  # torch is needed from here on
    tcfg = config.train if config.train is not None else TrainConfig()
    outputs = [] if output_base is None else \
        [str(output_base) + ".hevc"] + ([] if config.embed else [str(output_base) + ".nlf"])
    for out in outputs:  # before hours of work
        check_output(out, inputs=(input_path if source is None else None,))
    backend = get_backend(config.codec, **dict(config.backend_options))
    ok, why = backend.availability()
    if not ok:
        from .errors import BackendUnavailableError

        raise BackendUnavailableError(why)
    if config.coding.mode == "ldb" and config.codec == "x265":
        from .backends.x265 import x265_params

        x265_params(config.coding)  # raises the explanatory error before any work
    from .kernels import get_kernel

    kernel = get_kernel(config.kernel)
    with contextlib.ExitStack() as stack:
        src = source if source is not None else stack.enter_context(open_video(input_path, size, fps, bitdepth))
        workdir = stack.enter_context(_workdir(config.keep_tmp))
        if not src.random_access:
            src = spool(src, workdir, config.coding.frames)
        fmt = src.fmt
        n = len(src) if config.coding.frames is None else min(config.coding.frames, len(src))
        if config.coding.frames is not None and config.coding.frames > len(src):
            raise UsageError(f"{src.origin}: {config.coding.frames} frames requested, the input has {len(src)}")
        coding = replace(config.coding, frames=n)
        segments = split(n, coding.mode, coding.intra_period, config.ld_gop)  # before any work: checks them

        def backend_progress(done: int, total: int) -> None:
            if progress:
                progress("encode", done, total, f"{backend.name} encoding")

        result = backend.encode(src, coding, workdir, backend_progress)
        recon = result.recon
        header = StreamHeader(fmt.width, fmt.height, fmt.bitdepth, n, fmt.fps, coding.mode, config.arch_y,
                              config.arch_uv, config.hash_type, picture_crc(recon[0].planes, fmt.bitdepth))
        records: list[Record] = []
        decisions: dict[int, dict[Group, GroupDecision]] = {}
        states = {Group.Y: _GroupState(), Group.UV: _GroupState()}
        low_delay = coding.mode in ("ldb", "ldp")
        train_seconds = 0.0
        bits_per_frame = sum(result.frame_bits) / n
        for k, seg in enumerate(segments):
            decisions[seg.index] = {}
            later = tuple(s.count for s in segments[k + 1:])  # for the low-delay credit of later reuse
            for group in (Group.Y, Group.UV):
                dec, rec = _encode_group(src, recon, seg, group, fmt, config, tcfg, kernel, bits_per_frame,
                                         states[group], low_delay, progress, len(segments), later)
                records.append(rec)
                decisions[seg.index][group] = dec
                train_seconds += dec.train_seconds
        # every decision is known: a run of OFF records of a group is one record; when nothing is
        # filtered there is no side stream at all (the plain stream decodes to the same pictures)
        merged, heads = merge_off_runs(records)
        side = SideStream(header, tuple(merged)) if any(r.type is not RecordType.OFF for r in merged) else None
        unit_bytes = [_unit_bytes(p) for p in side.record_payloads()] if side is not None else []
        for rec, head in zip(records, heads):
            decisions[rec.segment][rec.group].side_bytes = unit_bytes[head] if side is not None and head is not None else 0
        side_bytes = side.to_bytes() if side is not None else b""
        hevc_bytes = result.bitstream.stat().st_size
        embedded = None
        if config.embed and side is not None:  # one file; its real size is the rate: side_bytes = embedded - plain
            from .sei import embed as embed_sei

            embedded = embed_sei(result.bitstream.read_bytes(), side, origin=str(result.bitstream))
        if outputs:  # published together: both files or neither
            with atomic_outputs(*outputs[:1 if side is None else 2]) as handles:
                if embedded is not None:
                    handles[0].write(embedded)
                else:
                    with open(result.bitstream, "rb") as inp:
                        shutil.copyfileobj(inp, handles[0])
                    if len(handles) > 1:
                        handles[1].write(side_bytes)
            stale = Path(str(output_base) + ".nlf")
            if (config.embed or side is None) and stale.is_file():  # of an earlier encode, whose BASE.hevc is gone
                stale.unlink()
                log.warning("removed %s, the side stream of an earlier encode to the same name (%s)", stale,
                            "this stream carries its records inside" if side is not None else
                            "this encode filters no picture: it has no side stream")
        report = _report(fmt, coding, config, result, segments, decisions,
                         len(side_bytes) if embedded is None else len(embedded) - hevc_bytes, hevc_bytes,
                         time.perf_counter() - t0, train_seconds, kernel.name, output_base, workdir)
        if side is None:
            if report["outputs"]:
                report["outputs"]["side"] = None
        elif embedded is not None:
            report.update(embedded=True, sidecar_bytes=len(side_bytes), file_bytes=len(embedded))
            if report["outputs"]:
                report["outputs"]["side"] = f"in-band SEI of {report['outputs']['hevc']}"
    return EncodeReport(report)


def train_config_class() -> type:
    """:class:`hevc_ext.train.TrainConfig`; importing the trainer needs torch, and without it this is a
    MissingDependencyError that says how to install it."""
    try:
        from .train import TrainConfig
    except ModuleNotFoundError as exc:
        if exc.name != "torch":
            raise
        from .errors import MissingDependencyError

        raise MissingDependencyError(
            "encoding trains the filter with PyTorch, which is not installed: pip install 'hevc-nlf[train]' "
            "(or a CPU build: pip install torch --index-url https://download.pytorch.org/whl/cpu); "
            "decoding works without it") from None
    return TrainConfig


def _cheapest(config: EncoderConfig, group: Group, fmt: VideoFormat) -> int:
    """Parameters of the group's smallest network among the packings the encoder tries."""
    return min(config.arch(group).parameter_count(group, p) for p in config.packings(group, fmt.width, fmt.height))


def _credit_on(config: EncoderConfig, low_delay: bool, later_frames: tuple[int, ...], state: _GroupState) -> bool:
    """Whether a new network is credited with its reuse in later segments (only a group's first one)."""
    return (low_delay and config.reuse_decay > 0 and config.reuse_horizon > 0 and bool(later_frames)
            and state.reference is None)


def _hopeless(config: EncoderConfig, group: Group, fmt: VideoFormat, frames: int, worth: float,
              credited: tuple[int, ...] = ()) -> bool:
    """No network can pay for itself in a segment of ``frames`` pictures: the value of removing
    SKIP_SSE_FRACTION of every picture's SSE (``worth`` bits per unit of relative SSE per picture), with
    the credit for reuse in the ``credited`` later segments, is below SKIP_BITS_PER_PARAM bits for each
    parameter of the cheapest network."""
    per_picture = SKIP_SSE_FRACTION[group] * worth
    value = per_picture * frames + reference_credit(per_picture, 0.0, credited, config.reuse_decay,
                                                    config.reuse_horizon)
    return SKIP_BITS_PER_PARAM * _cheapest(config, group, fmt) > value


def _encode_group(src: VideoSource, recon: VideoSource, seg: Segment, group: Group, fmt: VideoFormat,
                  config: EncoderConfig, tcfg: Any, kernel: Any, bits_per_frame: float, state: _GroupState,
                  low_delay: bool, progress: ProgressFn | None, n_segments: int,
                  later_frames: tuple[int, ...] = ()) -> tuple[GroupDecision, Record]:
    from .train import SegmentData, train

    measure = _Measure(src, recon, seg, group, fmt.bitdepth, config.hash_type, kernel)
    base = dict(group=group, segment=seg.index, first_frame=seg.start, frame_count=seg.count)
    hash_type = config.hash_type
    label = f"segment {seg.index + 1}/{n_segments} {group.label}"
    cands: list[_Candidate] = []

    off = Record(RecordType.OFF, **base)
    cands.append(_Candidate(RecordType.OFF, None, None, _record_bytes(off, hash_type, None), measure.before,
                            b"", "off"))
    if state.reference is not None and low_delay:
        errs, digest = measure.run(state.reference_int)
        rec = Record(RecordType.REUSE, output_hash=digest, **base)
        cands.append(_Candidate(RecordType.REUSE, state.reference, state.reference_int,
                                _record_bytes(rec, hash_type, state.reference), errs, digest, "reuse"))
    trained: dict[Packing, Any] = {}
    train_seconds = 0.0
    before = sum(sum(f) for f in measure.before)
    free_bits = config.lambda_scale == 0  # side bits cost nothing: the largest SSE reduction wins
    worth = 0.0 if free_bits else bits_per_relative_sse(bits_per_frame, config.rd_slope_db) / config.lambda_scale
    hopeless = not free_bits and _hopeless(config, group, fmt, seg.count, worth,
                                           later_frames if _credit_on(config, low_delay, later_frames, state) else ())
    if hopeless:
        log.info("%s: not trained: a network of ~%d bits would need to remove more than %d%% of the SSE of "
                 "every picture to pay for itself", label, SKIP_BITS_PER_PARAM * _cheapest(config, group, fmt),
                 100 * SKIP_SSE_FRACTION[group])
    if config.filter_enabled and not hopeless:
        data = SegmentData(group, [_group_planes(src[i], group) for i in seg.frames],
                           [_group_planes(recon[i], group) for i in seg.frames], fmt.bitdepth)
        for packing in config.packings(group, fmt.width, fmt.height):
            prev = state.reference_train if (low_delay and state.reference_train is not None and
                                              state.reference_train.net.packing == packing) else None

            def train_progress(done: int, total: int, packing: Packing = packing) -> None:
                if progress:
                    progress("train", done, total, f"{label} {packing}")

            tr = train(data, config.arch(group), packing, tcfg, init=prev.net if prev else None,
                       previous=prev.normalised() if prev else None, progress=train_progress)
            train_seconds += tr.seconds
            trained[packing] = tr
            from .quant import quantize, quantize_anchored, refine

            qcfgs = list(config.quant_candidates)
            ref = state.reference if low_delay else None
            if ref is not None and ref.packing == packing and ref.config not in qcfgs:
                qcfgs.append(ref.config)
            # GPTQ rounding + bias correction on the calibration crops (quant.refine)
            qnets = [(refine(tr.float_net, quantize(tr.float_net, config.arch(group), qc, tr.act_max), tr.calibration),
                      (RecordType.NEW, RecordType.NEW_DIFF), "") for qc in qcfgs]
            if ref is not None and ref.packing == packing:
                # low delay: the update quantized with the reference's steps and plain rounding, so that
                # only the integers of weights that moved change and difference coding is cheap
                anchored = refine(tr.float_net, quantize_anchored(tr.float_net, ref), tr.calibration,
                                  keep_steps=True, rounding=False)
                qnets.append((anchored, (RecordType.NEW_DIFF,), " anchored"))
            for qnet, rtypes, tag in qnets:
                qc = qnet.config
                intnet = derive(qnet, fmt.bitdepth)
                if progress:
                    progress("measure", len(cands), 0, f"{label} {packing} b_w={qc.weight_bits}{tag}")
                errs, digest = measure.run(intnet)
                for rtype in rtypes:
                    if rtype is RecordType.NEW_DIFF and not (ref is not None and qnet.same_layout(ref)):
                        continue
                    rec = Record(rtype, output_hash=digest, network=qnet, **base)
                    nbytes = _record_bytes(rec, hash_type, ref)
                    cands.append(_Candidate(rtype, qnet, intnet, nbytes, errs, digest,
                                            f"{rtype.name.lower()} {packing} w{qc.weight_bits}b{qc.bias_bits}"
                                            f"s{qc.scale_bits}{tag}"))

    def gain_of(c: _Candidate) -> float:
        """Σ over pictures of the relative SSE reduction, averaged over the group's planes (so it can be
        positive while the summed SSE rises, or the reverse: pictures and planes weigh alike)."""
        return sum((b[p] - a[p]) / b[p] for b, a in zip(measure.before, c.sse) for p in range(group.planes)
                   if b[p] > 0) / group.planes

    # only for a group's first network: once there is a reference, refreshing it is decided greedily (with
    # the 110 % rule); crediting fresh networks against a stale reference made the encoder refresh every
    # GoP on credit that later refreshes never let it collect (docs/results.md)
    credit_on = not free_bits and _credit_on(config, low_delay, later_frames, state)
    if credit_on:  # the price of a REUSE record in a later segment (its header grows by a bit or two; ignored)
        reuse_bits = 8 * _record_bytes(Record(RecordType.REUSE, output_hash=bytes(hash_type.size), **base),
                                       hash_type, None)

    def credit(c: _Candidate) -> float:
        """Low delay, a group's first network: what ``c``'s network (if it is one) is expected to be worth
        in the following segments."""
        if not credit_on or c.rtype is not RecordType.NEW:
            return 0.0
        return reference_credit(worth * gain_of(c) / seg.count, reuse_bits, later_frames,
                                config.reuse_decay, config.reuse_horizon)

    def cost(c: _Candidate) -> float:
        """Side bits minus what the SSE reduction is worth in bits (mean over the group's planes), minus
        (low delay, ``reuse_decay`` > 0, a group's first network) what reusing it later is expected to be
        worth."""
        gain = gain_of(c)
        if free_bits:
            return -gain + 1e-12 * c.payload_bytes
        return 8 * c.payload_bytes - worth * gain - credit(c)

    allowed = list(cands)
    reuse = next((c for c in cands if c.rtype is RecordType.REUSE), None)
    if reuse is not None:
        gain_reuse = before - reuse.total_sse
        if gain_reuse > 0:  # paper §4.3: new parameters only if their gain exceeds 110 % of reuse
            allowed = [c for c in cands if c.rtype not in (RecordType.NEW, RecordType.NEW_DIFF)
                       or before - c.total_sse > config.reuse_factor * gain_reuse]
    best = min(allowed, key=cost)
    rec = Record(best.rtype, output_hash=best.digest if best.rtype is not RecordType.OFF else b"",
                 network=best.network if best.rtype in (RecordType.NEW, RecordType.NEW_DIFF) else None, **base)
    if best.rtype in (RecordType.NEW, RecordType.NEW_DIFF):
        state.reference = best.network
        state.reference_int = best.intnet
        state.reference_train = trained[best.network.packing]
    decision = GroupDecision(
        group, best.rtype.name.lower(), str(best.network.packing) if best.network else None,
        {"weight_bits": best.network.config.weight_bits, "bias_bits": best.network.config.bias_bits,
         "scale_bits": best.network.config.scale_bits} if best.network else None,
        best.payload_bytes, [sum(f) for f in measure.before], [sum(f) for f in best.sse],
        [{"label": c.label, "bytes": c.payload_bytes, "sse": c.total_sse, "gain": gain_of(c),
          "cost": round(cost(c), 1), "credit": round(credit(c), 1), "allowed": c in allowed} for c in cands],
        train_seconds)
    decision.per_plane_after = best.sse  # type: ignore[attr-defined]
    decision.per_plane_before = measure.before  # type: ignore[attr-defined]
    log.info("%s: %s (%d bytes; SSE %d → %d)", label, best.label, best.payload_bytes, before, best.total_sse)
    return decision, rec


def _report(fmt: VideoFormat, coding: CodingConfig, config: EncoderConfig, result: Any, segments: list[Segment],
            decisions: dict[int, dict[Group, GroupDecision]], side_bytes: int, hevc_bytes: int,
            seconds: float, train_seconds: float, kernel_name: str, output_base: str | None,
            workdir: Path) -> dict:
    n = coding.frames or 0
    ysize = fmt.width * fmt.height
    csize = ysize // 4
    acc_b = PsnrAccumulator(fmt.bitdepth, (ysize, csize, csize))
    acc_a = PsnrAccumulator(fmt.bitdepth, (ysize, csize, csize))
    seg_rows = []
    macs = {"y": 0.0, "uv": 0.0}
    for seg in segments:
        d = decisions[seg.index]
        yb, ya = d[Group.Y].per_plane_before, d[Group.Y].per_plane_after  # type: ignore[attr-defined]
        cb, ca = d[Group.UV].per_plane_before, d[Group.UV].per_plane_after  # type: ignore[attr-defined]
        for k in range(seg.count):
            acc_b.add([yb[k][0], cb[k][0], cb[k][1]])
            acc_a.add([ya[k][0], ca[k][0], ca[k][1]])
        rows_b = acc_b.mean(range(seg.start, seg.start + seg.count))
        rows_a = acc_a.mean(range(seg.start, seg.start + seg.count))
        seg_rows.append({
            "index": seg.index, "first_frame": seg.start, "frames": seg.count,
            "hevc_bytes": sum(result.frame_bits[seg.start:seg.start + seg.count]) // 8,
            "psnr_before": rows_b, "psnr_after": rows_a,
            "groups": {g.label: {"decision": dec.decision, "packing": dec.packing, "quant": dec.config,
                                 "side_bytes": dec.side_bytes, "train_seconds": round(dec.train_seconds, 2),
                                 "candidates": dec.candidates}
                       for g, dec in d.items()},
            "side_bytes": sum(dec.side_bytes for dec in d.values()),
        })
        for g, dec in d.items():
            if dec.packing is not None:
                macs[g.label] = max(macs[g.label], config.arch(g).mac_per_pixel(g, Packing.parse(dec.packing)))
    pb, pa = acc_b.mean(), acc_a.mean()
    total_bits_before = hevc_bytes * 8
    total_bits_after = (hevc_bytes + side_bytes) * 8
    return {
        "input": {"width": fmt.width, "height": fmt.height, "bitdepth": fmt.bitdepth, "fps": float(fmt.fps)},
        "codec": result.backend, "codec_version": result.version, "mode": coding.mode, "qp": coding.qp,
        "intra_period": coding.intra_period, "ld_gop": config.ld_gop, "frames": n,
        "psnr_before": pb, "psnr_after": pa,
        "psnr_gain": {k: pa[k] - pb[k] for k in pb},
        "yuv_psnr_before": acc_b.yuv_psnr(), "yuv_psnr_after": acc_a.yuv_psnr(),
        "hevc_bytes": hevc_bytes, "side_bytes": side_bytes,
        "kbps_before": kbps(total_bits_before, n, fmt.fps), "kbps_after": kbps(total_bits_after, n, fmt.fps),
        "mac_per_pixel": macs["y"] + macs["uv"], "mac_per_pixel_groups": macs,
        "encode_seconds": round(seconds, 2), "backend_seconds": round(result.seconds, 2),
        "train_seconds": round(train_seconds, 2), "kernel": kernel_name,
        "hash": config.hash_type.name.lower(),
        "commands": [format_command(c) for c in result.commands],
        # those commands name files in the working directory, which outlives the run only with keep_tmp
        "workdir": {"path": str(workdir), "kept": config.keep_tmp},
        "backend_summary": result.summary,
        "per_frame": {"psnr_before": acc_b.per_frame(), "psnr_after": acc_a.per_frame(),
                      "hevc_bits": list(result.frame_bits)},
        "segments": seg_rows,
        "outputs": {"hevc": str(output_base) + ".hevc", "side": str(output_base) + ".nlf"} if output_base else None,
    }


# ------------------------------------------------------------------------------------------- decoder
@dataclass
class DecodeReport:
    frames: int
    filtered_records: int
    verified_records: int
    seconds: float
    kernel: str
    width: int = 0
    height: int = 0
    bitdepth: int = 0
    side_stream: str = ""  # what was applied: the sidecar's path, EMBEDDED, or "" (none)


#: DecodeReport.side_stream when the records came from SEI messages in the stream
EMBEDDED = "embedded SEI"


def _update_hash(hasher: PictureHash, planes: list[np.ndarray]) -> None:
    for p in planes:
        hasher.update(p)


class FrameFilter:
    """Applies a side stream's records to decoded pictures in display order and verifies the hashes.

    Shared by the file decoder and the streaming :class:`hevc_ext.Decoder`: push pictures with
    :meth:`process`, call :meth:`finish` at the end.
    """

    def __init__(self, side: SideStream | None, kernel: Any, origin: str, *, hash_in_thread: bool = False,
                 more_records: bool = False) -> None:
        """``more_records``: ``side`` holds the records received so far, the caller appends the others to
        :attr:`records` as they arrive (the streaming decoder); :meth:`finish` checks the coverage.
        ``hash_in_thread``: hash each filtered picture in a worker thread (hashlib and zlib release the
        GIL) while the caller writes it and decodes the next one; only for callers that do not modify
        the returned pictures before the next :meth:`process` or :meth:`finish` call."""
        self.side, self.kernel, self.origin = side, kernel, origin
        self.index = 0
        self.records = {g: [] for g in (Group.Y, Group.UV)}
        self.filtered = 0
        self.verified = 0
        self._nets: dict[Group, tuple[Any, IntNetwork]] = {}  # per group: the network in use, derived
        self._hash: dict[Group, PictureHash | None] = {Group.Y: None, Group.UV: None}
        self._pos = {Group.Y: 0, Group.UV: 0}
        self._hash_async = hash_in_thread  # one picture in flight at most
        self._hasher: ThreadPoolExecutor | None = None
        self._in_flight: list[Future] = []
        if side is not None:
            side.check_consistency(complete=not more_records)
            for g in (Group.Y, Group.UV):
                self.records[g] = side.records_by_group(g)

    def _record(self, group: Group, frame: int) -> Record | None:
        recs = self.records[group]
        pos = self._pos[group]
        while pos < len(recs) and frame >= recs[pos].first_frame + recs[pos].frame_count:
            pos += 1
        if pos > 64:  # records behind the picture are done with (bounded memory); the last one stays for finish()
            del recs[:pos - 1]
            pos = 1
        self._pos[group] = pos
        if pos < len(recs) and recs[pos].first_frame <= frame:
            return recs[pos]
        return None

    def _intnet(self, rec: Record, bitdepth: int) -> IntNetwork:
        """The kernel constants of ``rec``'s network, derived once per network (a low-delay REUSE record
        carries the previous record's network object): only the group's current one is kept, so a long
        stream's memory does not grow with its networks."""
        held = self._nets.get(rec.group)
        if held is None or held[0] is not rec.network:
            held = (rec.network, derive(rec.network, bitdepth))  # type: ignore[arg-type]
            self._nets[rec.group] = held
        return held[1]

    def _hash_planes(self, hasher: PictureHash, planes: list[np.ndarray]) -> Future | None:
        """Feed ``planes`` to ``hasher``: in the worker thread (returns its future) or here (None)."""
        if not self._hash_async:
            _update_hash(hasher, planes)
            return None
        if self._hasher is None:
            self._hasher = ThreadPoolExecutor(1, thread_name_prefix="hevc-nlf-hash")
        fut = self._hasher.submit(_update_hash, hasher, planes)
        self._in_flight.append(fut)
        return fut

    def _wait_hashing(self) -> None:
        for fut in self._in_flight:
            fut.result()
        self._in_flight = []

    def process(self, frame: Frame, bitdepth: int) -> Frame:
        self._wait_hashing()  # the previous picture's (bounded memory)
        i = self.index
        self.index += 1
        side = self.side
        if side is None:
            return frame
        h = side.header
        if i == 0:
            check_stream_matches(h, frame.y.shape[1], frame.y.shape[0], bitdepth, self.origin)
            crc = picture_crc(frame.planes, bitdepth) if h.first_picture_crc is not None else None
            if crc is not None and crc != h.first_picture_crc:
                raise MismatchError(f"{self.origin}: the first decoded picture does not match the side stream "
                                    f"(CRC {crc:08x}, expected {h.first_picture_crc:08x}): "
                                    f"the side stream belongs to another encode, or the HEVC stream is damaged")
        planes = list(frame.planes)
        for group in (Group.Y, Group.UV):
            rec = self._record(group, i)
            if rec is None:
                continue
            if rec.type is not RecordType.OFF:
                out = self.kernel.filter_planes(_group_planes(frame, group), self._intnet(rec, bitdepth), bitdepth)
                for idx, p in zip(group.plane_indices, out):
                    planes[idx] = p
                if h.hash_type is not HashType.NONE:
                    if i == rec.first_frame:
                        self._hash[group] = PictureHash(h.hash_type, bitdepth)
                    hasher = self._hash[group]
                    hashed = self._hash_planes(hasher, out)  # type: ignore[arg-type]
                    if i == rec.first_frame + rec.frame_count - 1:
                        if hashed is not None:
                            hashed.result()
                        digest = hasher.digest()  # type: ignore[union-attr]
                        if digest != rec.output_hash:
                            raise MismatchError(
                                f"{self.origin}: frames {rec.first_frame}..{i} ({group.label}): the filtered "
                                f"pictures do not match the side stream's {h.hash_type.name} "
                                f"({digest.hex()} != {rec.output_hash.hex()}); the side stream belongs to "
                                f"another encode, or the HEVC stream or the side stream is damaged")
                        self.verified += 1
                if i == rec.first_frame + rec.frame_count - 1:
                    self.filtered += 1
        return Frame(*planes)

    def close(self) -> None:
        """Stop the hashing thread (process() starts it again if needed)."""
        if self._hasher is not None:
            self._in_flight = []
            self._hasher.shutdown(wait=True)
            self._hasher = None

    def finish(self) -> None:
        self._wait_hashing()
        self.close()
        if self.side is not None:
            # the header's count (0 when it was written while streaming) and what each group's records
            # cover: frames 0.. without a gap (check_consistency, or the streaming Decoder as they arrive)
            counts = [self.side.header.frame_count] if self.side.header.frame_count else []
            counts += [recs[-1].first_frame + recs[-1].frame_count if recs else 0 for recs in self.records.values()]
            for total in counts:
                if self.index != total:
                    raise MismatchError(f"{self.origin}: the HEVC stream has {self.index} pictures, the side "
                                        f"stream describes {total}: the HEVC stream is truncated or damaged, or the "
                                        f"side stream belongs to another encode")


def read_side_stream(path: str) -> SideStream:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SideStreamError(f"{path}: cannot read side stream: {exc.strerror}") from None
    return SideStream.from_bytes(data, path)


def decode(stream_path: str, output: str, side_path: str | None = None, *, kernel: str = "auto",
           y4m: bool | None = None, progress: ProgressFn | None = None, fps: Any = None,
           side_path_found: bool = False) -> DecodeReport:
    """Decode ``stream_path`` (+ side stream) to ``output`` (.yuv, .y4m or ``-`` for Y4M on stdout; an
    existing device such as /dev/null is written as raw YUV unless ``y4m``).

    The side stream is ``side_path`` if given, else the records embedded in the stream, if any.
    ``side_path_found``: ``side_path`` was not named by the user but found beside the stream; then a
    stream with records of its own keeps them and the file is ignored, with a warning (it is left over
    from another encode to the same name)."""
    from fractions import Fraction

    from .kernels import get_kernel

    t0 = time.perf_counter()
    if stream_path == "-":
        raise UsageError("decode reads its stream from a file, not standard input (the streaming API, "
                         "hevc_ext.Decoder, takes a stream in chunks)")
    check_input(stream_path, "an HEVC stream")
    if side_path:
        check_input(side_path, "a side stream (.nlf)")
    check_output(output, inputs=(stream_path, side_path))
    if y4m is None and not written_in_place(output) and Path(output).suffix.lower() not in (".yuv", ".y4m"):
        raise UsageError(f"{output}: the decoded pictures are written as .yuv or .y4m (or - for Y4M on stdout), "
                         f"not {Path(output).suffix or 'a name without suffix'}")
    rate = parse_fps(fps) if fps is not None else None
    side = read_side_stream(side_path) if side_path else None
    from .container import read_annexb
    from .sei import extract, strip

    raw = read_annexb(stream_path)  # .hevc or any container av demuxes
    if side is not None and side_path_found:
        from .sei import has_embedded

        if has_embedded(raw):
            log.warning("%s: ignoring %s found beside it: the stream carries its own side stream (SEI); "
                        "--sidecar %s applies the file instead", stream_path, side_path, side_path)
            side, side_path = None, None
    stream_data, embedded = (strip(raw, stream_path), None) if side is not None else extract(raw, stream_path)
    side = side if side is not None else embedded  # in-band SEI records (docs/sei.md), if any
    k = get_kernel(kernel)
    # the writer only reads the pictures: their hashing can overlap the output and the next decode
    origin = f"{stream_path} with {side_path}" if side_path else stream_path
    filt = FrameFilter(side, k, origin, hash_in_thread=True)
    as_y4m = y4m if y4m is not None else (output == "-" or is_y4m_name(output))
    if rate is None:
        rate = side.header.fps if side else Fraction(25)
    decoder = HevcDecoder(stream_path)
    writer = None
    fmt = None
    with contextlib.closing(filt), atomic_output(output) as handle:
        for frame in decode_frames(stream_data, decoder):
            out = filt.process(frame, decoder.bitdepth or 8)  # the first picture's checks come before any output
            if writer is None:
                h, w = frame.y.shape
                fmt = VideoFormat(w, h, rate, decoder.bitdepth or 8)
                writer = VideoWriter(handle, fmt, y4m=as_y4m)
            writer.write(out)
            if progress:
                progress("decode", filt.index, side.header.frame_count if side else 0, "decoding")
        if writer is None:
            from .errors import InputFormatError

            raise InputFormatError(f"{stream_path}: no pictures decoded (not an HEVC elementary stream?)")
        filt.finish()
    return DecodeReport(filt.index, filt.filtered, filt.verified, time.perf_counter() - t0, k.name,
                        fmt.width, fmt.height, fmt.bitdepth, side_path or (EMBEDDED if side is not None else ""))
