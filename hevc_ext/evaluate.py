"""Evaluation the way the paper reports it (Tables 3–16): BD-rate per channel against the backend alone,
averaged per HEVC class, for each coding mode, plus MAC/pixel and encoder/decoder time ratios.

The work is cut into **jobs**, one per (sequence, mode, QP). A job is a small, JSON-serialisable
:class:`JobSpec`; :func:`run_job` turns it into a result dict (JSON too) without any shared state, so a
process pool here — or a cluster engine later — can run them anywhere. One job is one
:func:`hevc_ext.pipeline.encode` call, which yields both RD points of that QP:

* the **anchor** (backend alone): rate = HEVC bytes · 8, PSNR = the backend's reconstruction;
* the **test** (backend + filter): rate = (HEVC bytes + side-stream bytes) · 8, PSNR after filtering.

PSNRs are averaged per picture the HM way (:mod:`hevc_ext.metrics`). After the encode, the job decodes
its own output twice with :func:`hevc_ext.pipeline.decode` — with and without the side stream — for
the decoder time ratio.

:func:`run_jobs` runs a list of specs with a resume cache: each finished job is written atomically to
``RESULTS_DIR/jobs/<job_id>.json`` together with the hash of its spec; a job whose file exists with the
same hash and status ``ok`` is not run again. :func:`summarise` aggregates results into per-sequence and
per-class BD-rates (via :mod:`hevc_ext.bdrate`), complexity figures and notes; :func:`write_outputs`
writes the tables (Markdown, CSV, JSON) and RD plots. The file formats are described in ``docs/eval.md``.

Library code: logs, never prints.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import dataclasses
import datetime as _dt
import hashlib
import io
import json
import logging
import math
import multiprocessing
import numbers
import os
import platform
import re
import signal
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from .bdrate import MIN_POINTS, bd_rate, plain_number
from .errors import InputFormatError, UsageError

__all__ = [
    "CHANNELS", "CTC_QPS", "MODES", "EvalSettings", "JobSpec", "JobEvent", "RunOutcome", "BdValue",
    "SequenceBd", "ClassCell", "ClassBd", "Curve", "Summary", "plan_jobs", "encoder_config", "run_job",
    "run_job_file", "run_jobs", "result_row", "load_run", "curves", "compare", "class_averages",
    "complexity", "summarise", "write_outputs", "write_plots", "class_table_md", "sequence_table_md",
    "rd_points_md", "complexity_md", "summary_markdown",
]

log = logging.getLogger("hevc_ext.evaluate")

CHANNELS: tuple[str, ...] = ("y", "u", "v")
MODES: tuple[str, ...] = ("ra", "ldb", "ldp")
CTC_QPS: tuple[int, ...] = (22, 27, 32, 37)
#: Bump when the meaning of a job (and so of a cached result) changes: old cache entries then miss.
SPEC_VERSION = 1
RESULT_FORMAT = "hevc-nlf-eval-job"
RUN_FORMAT = "hevc-nlf-eval"
RUN_FORMAT_VERSION = 1
#: Spec fields that change how a job runs but not what it computes; left out of the spec hash.
EXECUTION_FIELDS = ("path", "kernel", "threads", "measure_decode", "decode_repeats")
#: Pseudo-class of the row that averages over every sequence.
ALL = "All"
_CLASS_ORDER = ("A", "B", "C", "D", "E", "F")


# =========================================================================================== job specs
#: Settings added after SPEC_VERSION 1 whose unset value (None) means what the encoder did before.
_LATER_SETTINGS = ("finetune_iterations", "rd_slope", "reuse_decay", "reuse_horizon")
#: Training defaults (TrainConfig's; repeated here so that planning needs no torch) and the cost of one
#: training step in samples, for scheduling and the ETA.
DEFAULT_ITERATIONS = 600
DEFAULT_FINETUNE_ITERATIONS = 200
STEP_COST = 25_000

@dataclass(frozen=True)
class EvalSettings:
    """Everything of an encode that is the same for every job of an evaluation (hashed into each job)."""

    codec: str = "x265"
    intra_period: int = 32
    ld_gop: int = 5
    pack: str = "default"
    pack_uv: str | None = None
    layers: int = 5
    filters: int = 12
    uv_layers: int | None = None
    uv_filters: int | None = None
    iterations: int | None = None  # None: TrainConfig's default
    finetune_iterations: int | None = None  # low delay, from the previous GoP's network; None: the default
    batch: int | None = None
    patch: int | None = None
    lr: float | None = None
    seed: int | None = None
    weight_bits: str | None = None  # "8,6,5": candidate weight bit widths
    hash: str = "md5"
    lambda_scale: float = 1.0
    rd_slope: float | None = None  # None: EncoderConfig's default
    reuse_decay: float | None = None  # low delay credit for later reuse; None: EncoderConfig's default
    reuse_horizon: int | None = None
    filter_enabled: bool = True

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EvalSettings":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise InputFormatError(f"job spec: unknown settings {', '.join(sorted(unknown))}")
        return cls(**dict(data))


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


@dataclass(frozen=True)
class JobSpec:
    """One (sequence, mode, QP) encode of an evaluation. Serialisable with :meth:`to_dict`."""

    sequence: str
    cls: str
    path: str
    width: int
    height: int
    fps: str  # "25" or "30000:1001"
    bitdepth: int
    frames: int
    mode: str
    qp: int
    settings: EvalSettings = EvalSettings()
    kernel: str = "auto"
    threads: int = 0  # torch threads for training; 0: torch's default
    measure_decode: bool = True
    decode_repeats: int = 3

    @property
    def job_id(self) -> str:
        """File-name friendly and unique within an evaluation: ``<sequence>_<mode>_qp<QP>``."""
        return f"{_safe(self.sequence)}_{self.mode}_qp{self.qp}"

    @property
    def cost(self) -> int:
        """A rough relative cost, used to schedule big jobs first and for the ETA: the samples to code
        plus the training steps, each counted as :data:`STEP_COST` samples (measured on 2 cores: one step
        of one network ≈ 30 ms, coding + filtering + decisions ≈ 1.4 µs per luma sample)."""
        s = self.settings
        iterations = s.iterations if s.iterations is not None else DEFAULT_ITERATIONS
        if self.mode == "ra":
            steps = -(-self.frames // s.intra_period) * iterations
        else:
            finetune = s.finetune_iterations if s.finetune_iterations is not None else DEFAULT_FINETUNE_ITERATIONS
            steps = iterations + (-(-self.frames // s.ld_gop) - 1) * finetune
        return self.width * self.height * self.frames + (2 * steps * STEP_COST if s.filter_enabled else 0)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["class"] = d.pop("cls")
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "JobSpec":
        d = dict(data)
        try:
            d["cls"] = d.pop("class")
            d["settings"] = EvalSettings.from_dict(d.get("settings") or {})
            names = {f.name for f in dataclasses.fields(cls)}
            unknown = set(d) - names
            if unknown:
                raise InputFormatError(f"job spec: unknown fields {', '.join(sorted(unknown))}")
            return cls(**d)
        except (KeyError, TypeError) as exc:
            raise InputFormatError(f"job spec: missing or bad field ({exc})") from None

    @property
    def spec_hash(self) -> str:
        """SHA-256 (first 20 hex digits) of what determines the result: the sequence by name, format
        and frame count (not by path, so a cache moves with its files), mode, QP and every setting."""
        d = self.to_dict()
        for name in EXECUTION_FIELDS:
            d.pop(name, None)
        for name in _LATER_SETTINGS:  # hashed only when set, so that earlier caches stay valid
            if d["settings"].get(name) is None:
                d["settings"].pop(name, None)
        d["spec_version"] = SPEC_VERSION
        text = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:20]


def _fps_text(fps: Fraction) -> str:
    return str(fps.numerator) if fps.denominator == 1 else f"{fps.numerator}:{fps.denominator}"


def plan_jobs(sequences: Sequence[Any], modes: Sequence[str], qps: Sequence[int], settings: EvalSettings, *,
              frames: int | None = None, kernel: str = "auto", threads: int = 0, measure_decode: bool = True,
              decode_repeats: int = 3) -> tuple[list[JobSpec], list[str]]:
    """Job specs for every (sequence, mode, QP), and notes on combinations that are not run.

    ``sequences`` are :class:`hevc_ext.catalog.SequenceInfo`. ``frames`` caps each sequence's frame
    count (min(frames, available)). ``ldb`` with x265 is not run (x265 cannot code low-delay B); a note
    says so instead. An unknown ``settings.codec`` (one the backend registry does not list) is a
    :class:`UsageError`; a known codec that is not installed here (HM not found) can still be planned.
    """
    from .backends import check_codec

    check_codec(settings.codec)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise UsageError(f"modes: expected some of {', '.join(MODES)}, got {', '.join(modes) or 'none'}")
    if len(set(modes)) != len(modes):
        raise UsageError(f"modes: {', '.join(modes)} names a mode twice")
    if not qps or len(set(qps)) != len(qps) or any(not 0 <= q <= 51 for q in qps):
        raise UsageError(f"qps: expected distinct QPs in 0..51, got {', '.join(map(str, qps)) or 'none'}")
    if frames is not None and frames < 1:
        raise UsageError(f"frames must be positive, got {frames}")
    if len(qps) < MIN_POINTS:
        log.warning("%d QPs given; BD-rates need at least %d RD points per curve and will be n/a",
                    len(qps), MIN_POINTS)
    notes: list[str] = []
    run_modes = list(modes)
    if settings.codec == "x265" and "ldb" in run_modes:
        run_modes.remove("ldb")
        notes.append("LDB not run: x265 cannot code low-delay B pictures (both reference lists in the past); "
                     "use --codec hm for LDB, or LDP with x265.")
        log.warning("skipping ldb: x265 cannot code low-delay B; use --codec hm for ldb")
    specs: list[JobSpec] = []
    seen: dict[str, str] = {}
    for seq in sequences:
        key = _safe(seq.name).lower()
        if key in seen:
            raise UsageError(f"two files describe the sequence {seq.name!r}: {seen[key]} and {seq.path}; "
                             f"keep one of them in the sequence directory")
        seen[key] = str(seq.path)
        n = seq.frames if frames is None else min(frames, seq.frames)
        for mode in run_modes:
            for qp in qps:
                specs.append(JobSpec(
                    sequence=seq.name, cls=seq.cls, path=str(Path(seq.path).absolute()), width=seq.width,
                    height=seq.height, fps=_fps_text(Fraction(seq.fps)), bitdepth=seq.bitdepth, frames=n,
                    mode=mode, qp=int(qp), settings=settings, kernel=kernel, threads=threads,
                    measure_decode=measure_decode, decode_repeats=decode_repeats))
    return specs, notes


# ============================================================================================ one job
def encoder_config(spec: JobSpec) -> Any:
    """The :class:`hevc_ext.pipeline.EncoderConfig` of a job (as ``hevc-nlf encode`` would build it)."""
    from .arch import Architecture
    from .backends import CodingConfig
    from .pipeline import DEFAULT_QUANT_CANDIDATES, EncoderConfig, given, parse_packing
    from .quant import QuantConfig
    from .sidecar import HashType
    from .train import TrainConfig

    s = spec.settings
    train_kw = {k: getattr(s, k) for k in ("iterations", "finetune_iterations", "batch", "patch", "lr", "seed")
                if getattr(s, k) is not None}
    if spec.threads:
        train_kw["threads"] = spec.threads
    quant = DEFAULT_QUANT_CANDIDATES
    if s.weight_bits:
        try:
            bits = [int(b) for b in s.weight_bits.split(",")]
        except ValueError:
            raise UsageError(f"weight bits: expected a list like 8,6,5, got {s.weight_bits!r}") from None
        quant = tuple(QuantConfig(weight_bits=b, bias_bits=10 if b >= 7 else 8, scale_bits=4 if b >= 6 else 2)
                      for b in bits)
    try:
        hash_type = HashType[s.hash.upper()]
    except KeyError:
        raise UsageError(f"unknown picture hash {s.hash!r}: expected md5, crc32 or none") from None
    return EncoderConfig(
        coding=CodingConfig(spec.mode, spec.qp, s.intra_period, spec.frames), codec=s.codec, ld_gop=s.ld_gop,
        arch_y=Architecture(s.layers, s.filters),
        arch_uv=Architecture(s.uv_layers or s.layers, s.uv_filters or s.filters),
        packing=parse_packing(s.pack), packing_uv=parse_packing(s.pack_uv) if s.pack_uv else None,
        train=TrainConfig(**train_kw), quant_candidates=quant, hash_type=hash_type, kernel=spec.kernel,
        lambda_scale=s.lambda_scale, filter_enabled=s.filter_enabled,
        **given(rd_slope_db=s.rd_slope, reuse_decay=s.reuse_decay, reuse_horizon=s.reuse_horizon))


def _time_decodes(hevc: Path, side: Path, workdir: Path, kernel: str, repeats: int) -> dict[str, Any]:
    """Wall time of the plain av decode and of the decode with the side stream (filter + hash checks),
    each the minimum over ``repeats`` runs, alternating; after one untimed warm-up decode of each kind
    (the first decode in a process pays for loading the decoder and the kernel)."""
    from .pipeline import decode

    side_path = str(side) if side.is_file() else None  # none when the encode filters no picture
    decode(str(hevc), str(workdir / "plain.yuv"), None, kernel=kernel)
    decode(str(hevc), str(workdir / "filtered.yuv"), side_path, kernel=kernel)
    plain: list[float] = []
    filtered: list[float] = []
    verified = applied = 0
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        decode(str(hevc), str(workdir / "plain.yuv"), None, kernel=kernel)
        plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        rep = decode(str(hevc), str(workdir / "filtered.yuv"), side_path, kernel=kernel)
        filtered.append(time.perf_counter() - t)
        verified, applied = rep.verified_records, rep.filtered_records
        decode_kernel = rep.kernel
    return {"decode_seconds": round(min(filtered), 4), "decode_plain_seconds": round(min(plain), 4),
            "decode_records_applied": applied, "decode_records_verified": verified, "decode_kernel": decode_kernel}


def run_job(spec: JobSpec | Mapping[str, Any]) -> dict[str, Any]:
    """Run one job: encode (backend + filter) and, if ``spec.measure_decode``, time the decodes.

    Returns the result dict that :func:`run_jobs` stores as ``jobs/<job_id>.json``. Raises the
    pipeline's errors (:class:`~hevc_ext.errors.NlfError`) on failure. Needs nothing but the spec.
    """
    from . import __version__
    from .pipeline import encode

    if not isinstance(spec, JobSpec):
        spec = JobSpec.from_dict(spec)
    config = encoder_config(spec)
    raw = not spec.path.lower().endswith(".y4m")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"hevc-nlf-job-{spec.job_id}-") as tmp:
        work = Path(tmp)
        base = work / "stream"
        report = encode(spec.path, str(base), config, size=f"{spec.width}x{spec.height}" if raw else None,
                        fps=spec.fps if raw else None, bitdepth=spec.bitdepth if raw else None)
        d = report.data
        timing: dict[str, Any] = {"decode_seconds": None, "decode_plain_seconds": None}
        if spec.measure_decode:
            timing = _time_decodes(Path(str(base) + ".hevc"), Path(str(base) + ".nlf"), work, spec.kernel,
                                   spec.decode_repeats)
    segments = [{"index": s["index"], "first_frame": s["first_frame"], "frames": s["frames"],
                 "side_bytes": s["side_bytes"],
                 "decisions": {g: v["decision"] for g, v in s["groups"].items()},
                 "packings": {g: v["packing"] for g, v in s["groups"].items()}} for s in d["segments"]]
    return {
        "format": RESULT_FORMAT, "version": SPEC_VERSION, "status": "ok", "job_id": spec.job_id,
        "spec_hash": spec.spec_hash, "spec": spec.to_dict(),
        "sequence": spec.sequence, "class": spec.cls, "mode": spec.mode, "qp": spec.qp, "frames": d["frames"],
        "width": spec.width, "height": spec.height, "fps": d["input"]["fps"],
        "kbps_before": d["kbps_before"], "kbps_after": d["kbps_after"],
        "psnr_before": d["psnr_before"], "psnr_after": d["psnr_after"],
        "yuv_psnr_before": d["yuv_psnr_before"], "yuv_psnr_after": d["yuv_psnr_after"],
        "hevc_bytes": d["hevc_bytes"], "side_bytes": d["side_bytes"],
        "mac_per_pixel": d["mac_per_pixel"], "encode_seconds": d["encode_seconds"],
        "backend_seconds": d["backend_seconds"], "train_seconds": d["train_seconds"], **timing,
        "job_seconds": round(time.perf_counter() - t0, 3),
        "codec": d["codec"], "codec_version": d["codec_version"], "kernel": d["kernel"],
        "commands": d["commands"], "segments": segments,
        "backend_summary": d.get("backend_summary"),
        "host": platform.node(), "hevc_nlf_version": __version__,
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _write_json_atomic(path: Path, data: Any) -> None:
    _write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def run_job_file(spec_path: str | os.PathLike[str], result_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Cluster entry point: read a spec JSON file, run it, write the result JSON atomically."""
    try:
        data = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputFormatError(f"{spec_path}: cannot read the job spec: {exc}") from None
    result = run_job(JobSpec.from_dict(data))
    _write_json_atomic(Path(result_path), result)
    return result


# ============================================================================================== runner
@dataclass(frozen=True)
class JobEvent:
    """Progress of :func:`run_jobs`: sent once at the start (``job_id`` None) and after every job."""

    done: int  #: jobs finished, cached ones included
    total: int
    cached: int
    failed: int
    elapsed: float
    eta_seconds: float | None  #: None until a job has run in this session
    job_id: str | None = None
    status: str = ""  #: "ok" | "failed" | "" (start)
    seconds: float | None = None  #: wall time of that job
    message: str = ""


@dataclass
class RunOutcome:
    results: list[dict[str, Any]]  #: successful results, in the order of the specs
    failures: list[dict[str, Any]]  #: {"job_id", "error", "type"}
    ran: int
    cached: int
    seconds: float


def job_path(results_dir: Path, spec: JobSpec) -> Path:
    return Path(results_dir) / "jobs" / f"{spec.job_id}.json"


def cached_result(results_dir: Path, spec: JobSpec) -> dict[str, Any] | None:
    """The stored result of ``spec`` if it exists, finished ok, and its spec hash matches."""
    path = job_path(results_dir, spec)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable cached result, running the job again (%s)", path, exc)
        return None
    if not isinstance(data, dict) or data.get("status") != "ok" or data.get("spec_hash") != spec.spec_hash:
        log.info("%s: cached result is for another spec; running the job again", path)
        return None
    return data


def _error_record(spec: JobSpec, exc: BaseException) -> dict[str, Any]:
    return {"job_id": spec.job_id, "sequence": spec.sequence, "mode": spec.mode, "qp": spec.qp,
            "type": type(exc).__name__, "error": str(exc) or type(exc).__name__,
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))}


class _WorkerStop(BaseException):
    """Raised in a pool worker by SIGTERM (the parent stopping it), to unwind its job."""


_worker_busy = False


def _worker_init() -> None:
    """Pool workers leave Ctrl-C to the parent (which stops them) and turn SIGTERM into an exception, so
    that a stopped job removes its temporary files on the way out."""

    def stop(signum: int, frame: Any) -> None:
        if not _worker_busy:
            os._exit(128 + signum)
        raise _WorkerStop()

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, stop)


def _worker_call(runner: Callable[[JobSpec], dict[str, Any]], spec: JobSpec) -> dict[str, Any]:
    global _worker_busy
    _worker_busy = True
    try:
        return runner(spec)
    except _WorkerStop:
        os._exit(128 + signal.SIGTERM)  # after the job's clean-up, without reporting back
    finally:
        _worker_busy = False


def _stop_workers(pool: cf.ProcessPoolExecutor, grace: float = 10.0) -> None:
    """Interrupted: shut the pool down and stop its workers now (their jobs clean up and exit), instead
    of letting them run their jobs to the end; one that does not stop within ``grace`` seconds is killed."""
    procs = [p for p in (getattr(pool, "_processes", None) or {}).values() if p.is_alive()]  # before shutdown
    manager = getattr(pool, "_executor_manager_thread", None)  # it reaps the workers too
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
    if manager is not None:  # gone once it has seen the workers end: none of them is left running
        manager.join(grace)


def run_jobs(specs: Sequence[JobSpec], results_dir: str | os.PathLike[str], *, jobs: int = 1,
             runner: Callable[[JobSpec], dict[str, Any]] = run_job,
             progress: Callable[[JobEvent], None] | None = None, force: bool = False) -> RunOutcome:
    """Run every spec whose result is not cached yet; store results in ``results_dir/jobs/``.

    ``jobs`` > 1 runs them in a process pool (spawned workers; ``runner`` must then be picklable, i.e. a
    module-level function); with ``jobs`` > 1 a spec with ``threads`` 0 trains with one torch thread per
    worker, to avoid oversubscription (threads do not enter the spec hash). A failed job is recorded in
    ``jobs/<job_id>.error.json`` and in the outcome's ``failures``, and does not stop the others.
    """
    if jobs < 1:
        raise UsageError(f"jobs must be positive, got {jobs}")
    root = Path(results_dir)
    (root / "jobs").mkdir(parents=True, exist_ok=True)
    ids = [s.job_id for s in specs]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise UsageError(f"duplicate job ids: {', '.join(dup[:5])}")
    t0 = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    pending: list[JobSpec] = []
    for spec in specs:
        hit = None if force else cached_result(root, spec)
        if hit is not None:
            results[spec.job_id] = hit
        else:
            pending.append(spec)
    cached = len(results)
    total = len(specs)
    if jobs > 1:
        pending = [dataclasses.replace(s, threads=1) if s.threads == 0 else s for s in pending]
    pending.sort(key=lambda s: -s.cost)  # biggest first: a better-balanced pool
    failures: list[dict[str, Any]] = []
    state = {"done_cost": 0, "left_cost": sum(s.cost for s in pending)}
    log.info("%d jobs: %d cached, %d to run with %d worker(s)", total, cached, len(pending), jobs)

    def emit(spec: JobSpec | None, status: str, seconds: float | None, message: str = "") -> None:
        if progress is None:
            return
        elapsed = time.perf_counter() - t0
        eta = None
        if state["done_cost"] > 0:
            eta = elapsed * state["left_cost"] / state["done_cost"]
        elif not pending:
            eta = 0.0
        progress(JobEvent(len(results) + len(failures), total, cached, len(failures), elapsed, eta,
                          spec.job_id if spec else None, status, seconds, message))

    def finish(spec: JobSpec, result: dict[str, Any] | None, exc: BaseException | None, seconds: float) -> None:
        state["done_cost"] += spec.cost
        state["left_cost"] -= spec.cost
        err_path = root / "jobs" / f"{spec.job_id}.error.json"
        if exc is None and result is not None:
            result = dict(result)
            result.setdefault("spec_hash", spec.spec_hash)
            result.setdefault("status", "ok")
            _write_json_atomic(job_path(root, spec), result)
            if err_path.exists():
                err_path.unlink()
            results[spec.job_id] = result
            emit(spec, "ok", seconds)
        else:
            rec = _error_record(spec, exc if exc is not None else RuntimeError("runner returned nothing"))
            _write_json_atomic(err_path, rec)
            failures.append(rec)
            log.error("job %s failed: %s", spec.job_id, rec["error"])
            emit(spec, "failed", seconds, rec["error"])

    emit(None, "", None)
    if jobs == 1 or len(pending) <= 1:
        for spec in pending:
            t = time.perf_counter()
            try:
                res = runner(spec)
            except Exception as exc:  # a failed job is recorded; the others go on
                finish(spec, None, exc, time.perf_counter() - t)
            else:
                finish(spec, res, None, time.perf_counter() - t)
    else:
        ctx = multiprocessing.get_context("spawn")  # torch and fork do not mix
        pool = cf.ProcessPoolExecutor(max_workers=min(jobs, len(pending)), mp_context=ctx, initializer=_worker_init)
        try:
            started = time.perf_counter()
            futures = {pool.submit(_worker_call, runner, spec): spec for spec in pending}
            for fut in cf.as_completed(futures):
                spec = futures[fut]
                try:
                    res = fut.result()
                except Exception as exc:
                    finish(spec, None, exc, time.perf_counter() - started)
                else:
                    secs = res.get("job_seconds") if isinstance(res, dict) else None
                    finish(spec, res, None, secs if secs is not None else time.perf_counter() - started)
        except BaseException:  # interrupted: finished jobs are stored, running ones are stopped
            _stop_workers(pool)
            raise
        else:
            pool.shutdown(wait=True)
    ordered = [results[s.job_id] for s in specs if s.job_id in results]
    return RunOutcome(ordered, failures, len(pending), cached, time.perf_counter() - t0)


# ======================================================================================== result rows
#: Columns of ``results.csv`` / the rows of ``results.json``: one row per (sequence, mode, QP).
ROW_FIELDS: tuple[str, ...] = (
    "sequence", "class", "mode", "qp", "frames", "width", "height", "fps",
    "kbps_before", "psnr_before_y", "psnr_before_u", "psnr_before_v",
    "kbps_after", "psnr_after_y", "psnr_after_u", "psnr_after_v",
    "hevc_bytes", "side_bytes", "mac_per_pixel",
    "encode_seconds", "backend_seconds", "train_seconds", "decode_seconds", "decode_plain_seconds",
    "codec_version",
)
#: The minimal CSV that ``hevc-nlf bdrate`` accepts (one curve per row set).
SIMPLE_FIELDS: tuple[str, ...] = ("sequence", "class", "mode", "qp", "kbps", "psnr_y", "psnr_u", "psnr_v")


def result_row(result: Mapping[str, Any]) -> dict[str, Any]:
    """The flat ``results.json`` / ``results.csv`` row of one job result."""
    row: dict[str, Any] = {}
    for name in ROW_FIELDS:
        if name.startswith("psnr_before_") or name.startswith("psnr_after_"):
            which, ch = name.rsplit("_", 1)
            row[name] = result[which][ch]
        else:
            row[name] = result.get(name)
    return row


@dataclass(frozen=True)
class RunData:
    """Rows of one run, as loaded by :func:`load_run`. ``kind``: ``eval`` (rows with before/after) or
    ``simple`` (one curve: kbps, psnr_y/u/v)."""

    rows: list[dict[str, Any]]
    kind: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict)


def _shown(value: Any) -> str:
    """A value of an input file as the user wrote it: text verbatim, numbers plainly (``-5``, ``nan``)."""
    if isinstance(value, str):
        return value if value and value == value.strip() else repr(value)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return plain_number(value)
    try:
        return json.dumps(value)  # true, null, a list...: as the JSON file has it
    except (TypeError, ValueError):
        return repr(value)


def _number(value: Any, what: str, where: str) -> float:
    """``value`` as a float; ``where`` is the file and row (``runs.csv line 4``)."""
    if isinstance(value, bool):
        raise InputFormatError(f"{where}: {what} must be a number, got {_shown(value)}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputFormatError(f"{where}: {what} must be a number, got {_shown(value)}") from None


def _rd_value(value: Any, what: str, where: str, positive: bool) -> float:
    """A rate (``positive``: > 0) or PSNR of an RD point: a finite number, else an InputFormatError."""
    x = _number(value, what, where)
    if not math.isfinite(x) or (positive and x <= 0):
        raise InputFormatError(f"{where}: {what} must be a {'positive ' if positive else ''}finite number, "
                               f"got {_shown(value)}")
    return x


def _normalise_rows(rows: Iterable[tuple[str, Mapping[str, Any]]], kind: str, origin: str) -> list[dict[str, Any]]:
    """Validated rows of a run. ``rows``: (where, row) pairs, where = the row's place in ``origin``
    (``line 4`` of a CSV, ``row 3`` of a JSON run). Rates must be positive and finite, PSNRs finite, the
    QP an integer; anything else is an :class:`InputFormatError` naming the file, the row and the field."""
    need = ("sequence", "mode", "qp") + (("kbps_before", "kbps_after") + tuple(
        f"psnr_{w}_{c}" for w in ("before", "after") for c in CHANNELS) if kind == "eval"
        else ("kbps",) + tuple(f"psnr_{c}" for c in CHANNELS))
    out = []
    first: dict[tuple[str, str, int], str] = {}
    for place, row in rows:
        where = f"{origin} {place}"
        if not isinstance(row, Mapping):
            raise InputFormatError(f"{where}: expected an object with the fields {', '.join(need)}, "
                                   f"got {type(row).__name__}")
        missing = [k for k in need if row.get(k) is None or (isinstance(row.get(k), str) and not row[k].strip())]
        if missing:
            raise InputFormatError(f"{where}: missing {', '.join(missing)}")
        r = dict(row)
        r["sequence"] = str(r["sequence"])
        r["class"] = str(r.get("class") or "?").strip().upper() or "?"
        r["mode"] = str(r["mode"]).strip().lower()
        qp = _number(r["qp"], "qp", where)
        if not math.isfinite(qp) or qp != int(qp):
            raise InputFormatError(f"{where}: qp must be an integer, got {_shown(r['qp'])}")
        r["qp"] = int(qp)
        for k in need[3:]:
            r[k] = _rd_value(r[k], k, where, positive=k.startswith("kbps"))
        key = (r["sequence"], r["mode"], r["qp"])
        if key in first:
            raise InputFormatError(f"{where}: a second row for sequence {key[0]} mode {key[1]} QP {key[2]} "
                                   f"(the first is {first[key]})")
        first[key] = place
        out.append(r)
    return out


def load_run(path: str | os.PathLike[str]) -> RunData:
    """Rows of a finished run: a results directory, its ``results.json``, its ``results.csv``, or a CSV with
    the columns ``sequence,class,mode,qp,kbps,psnr_y,psnr_u,psnr_v``."""
    p = Path(path)
    if p.is_dir():
        if (p / "results.json").is_file():
            p = p / "results.json"
        else:
            raise InputFormatError(f"{p}: no results.json in this directory (not an eval results directory?)")
    if not p.is_file():
        raise InputFormatError(f"{p}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputFormatError(f"{p}: not a text file (expected an eval results.json or a CSV of rate and "
                               f"PSNR rows)") from None
    except OSError as exc:
        raise InputFormatError(f"{p}: cannot read: {exc.strerror or exc}") from None
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InputFormatError(f"{p}: not valid JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != RUN_FORMAT or not isinstance(data.get("rows"), list):
            raise InputFormatError(f"{p}: not an hevc-nlf eval results file (expected format {RUN_FORMAT!r} "
                                   f"with a list of rows)")
        meta = {k: v for k, v in data.items() if k != "rows"}
        rows = [(f"row {i}", row) for i, row in enumerate(data["rows"], start=1)]
        return RunData(_normalise_rows(rows, "eval", str(p)), "eval", str(p), meta)
    reader = csv.DictReader(io.StringIO(text))
    try:
        header = list(reader.fieldnames or ())
        cols = set(header)
        if {"kbps_before", "kbps_after"} <= cols:
            kind = "eval"
        elif set(SIMPLE_FIELDS) - {"class"} <= cols:
            kind = "simple"
        else:
            raise InputFormatError(f"{p}: expected the CSV columns {','.join(SIMPLE_FIELDS)} (or an eval "
                                   f"results.csv); found {','.join(header)}")
        rows = []
        for row in reader:  # reader.line_num: the file line the row ends on (the header is line 1)
            if None in row:
                raise InputFormatError(f"{p} line {reader.line_num}: {len(header) + len(row[None])} fields, "
                                       f"the header has {len(header)}")
            rows.append((f"line {reader.line_num}", row))
    except csv.Error as exc:
        raise InputFormatError(f"{p} line {reader.line_num}: not valid CSV ({exc})") from None
    return RunData(_normalise_rows(rows, kind, str(p)), kind, str(p))


# ============================================================================================ BD-rates
@dataclass(frozen=True)
class Curve:
    """The RD points of one (sequence, mode), sorted by QP."""

    sequence: str
    cls: str
    mode: str
    qps: tuple[int, ...]
    kbps: tuple[float, ...]
    psnr: dict[str, tuple[float, ...]]


def curves(rows: Sequence[Mapping[str, Any]], which: str | None) -> dict[tuple[str, str], Curve]:
    """Curves per (sequence, mode). ``which``: ``before`` (anchor) / ``after`` (test) for eval rows,
    None for simple rows (kbps, psnr_y/u/v)."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["sequence"], r["mode"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["qp"])
        rate = "kbps" if which is None else f"kbps_{which}"
        ps = {c: tuple(float(r[f"psnr_{c}" if which is None else f"psnr_{which}_{c}"]) for r in rs) for c in CHANNELS}
        out[key] = Curve(key[0], rs[0].get("class", "?"), key[1], tuple(int(r["qp"]) for r in rs),
                         tuple(float(r[rate]) for r in rs), ps)
    return out


@dataclass(frozen=True)
class BdValue:
    value: float | None  #: percent; None when undefined
    reason: str | None = None  #: why undefined


@dataclass(frozen=True)
class SequenceBd:
    sequence: str
    cls: str
    mode: str
    qps: tuple[int, ...]
    values: dict[str, BdValue]


def _select(curve: Curve, qps: Sequence[int]) -> tuple[list[float], dict[str, list[float]]]:
    idx = [curve.qps.index(q) for q in qps]
    return [curve.kbps[i] for i in idx], {c: [curve.psnr[c][i] for i in idx] for c in CHANNELS}


def compare(anchor: Mapping[tuple[str, str], Curve], test: Mapping[tuple[str, str], Curve],
            method: str = "pchip") -> tuple[list[SequenceBd], list[str]]:
    """BD-rate (percent, negative = saving) of ``test`` against ``anchor`` per (sequence, mode, channel),
    on the QPs both curves have. Undefined values (fewer than 4 common QPs, a non-monotonic curve, no
    overlap) become :class:`BdValue` with a reason instead of an error. Returns the values and notes
    about (sequence, mode) pairs present on one side only."""
    notes: list[str] = []
    out: list[SequenceBd] = []
    for key in sorted(set(anchor) - set(test)):
        notes.append(f"{key[0]} {key[1].upper()}: only in the anchor run; not compared")
    for key in sorted(set(test) - set(anchor)):
        notes.append(f"{key[0]} {key[1].upper()}: only in the test run; not compared")
    for key in sorted(set(anchor) & set(test)):
        a, t = anchor[key], test[key]
        cls = a.cls if a.cls not in ("", "?") else t.cls
        if t.cls not in ("", "?") and a.cls not in ("", "?") and a.cls != t.cls:
            notes.append(f"{key[0]}: class {a.cls} in the anchor run, {t.cls} in the test run; using {a.cls}")
        common = sorted(set(a.qps) & set(t.qps))
        if set(a.qps) != set(t.qps):
            notes.append(f"{key[0]} {key[1].upper()}: QPs differ (anchor {list(a.qps)}, test {list(t.qps)}); "
                         f"using the common QPs {common}")
        values: dict[str, BdValue] = {}
        if len(common) < MIN_POINTS:
            why = f"{len(common)} QP{'s' if len(common) != 1 else ''} (BD-rate needs {MIN_POINTS})"
            values = {c: BdValue(None, why) for c in CHANNELS}
        else:
            ar, ap = _select(a, common)
            tr, tp = _select(t, common)
            for c in CHANNELS:
                try:
                    values[c] = BdValue(bd_rate(ar, ap[c], tr, tp[c], method=method))
                except UsageError as exc:
                    values[c] = BdValue(None, str(exc))
        out.append(SequenceBd(key[0], cls, key[1], tuple(common), values))
    return out, notes


@dataclass(frozen=True)
class ClassCell:
    mean: float | None  #: mean BD-rate over the sequences with a value
    count: int  #: sequences with a value
    total: int  #: sequences of the class (in that mode)
    reasons: tuple[str, ...] = ()  #: "<sequence>: <reason>" for those without


@dataclass(frozen=True)
class ClassBd:
    cls: str  #: class letter, or "All" (every sequence)
    mode: str
    values: dict[str, ClassCell]


def _class_key(cls: str) -> tuple[int, str]:
    if cls == ALL:
        return (len(_CLASS_ORDER) + 1, cls)
    return (_CLASS_ORDER.index(cls) if cls in _CLASS_ORDER else len(_CLASS_ORDER), cls)


def _mode_key(mode: str) -> tuple[int, str]:
    return (MODES.index(mode) if mode in MODES else len(MODES), mode)


def class_averages(seq_bds: Sequence[SequenceBd]) -> list[ClassBd]:
    """Mean BD-rate per (class, mode, channel) over the class's sequences that have a value (the paper's
    class rows), plus an ``All`` row over every sequence. A cell says how many sequences it averages."""
    groups: dict[tuple[str, str], list[SequenceBd]] = {}
    for s in seq_bds:
        groups.setdefault((s.cls, s.mode), []).append(s)
        groups.setdefault((ALL, s.mode), []).append(s)
    out = []
    for (cls, mode), items in sorted(groups.items(), key=lambda kv: (_class_key(kv[0][0]), _mode_key(kv[0][1]))):
        cells = {}
        for c in CHANNELS:
            vals = [s.values[c].value for s in items if s.values[c].value is not None]
            reasons = tuple(f"{s.sequence}: {s.values[c].reason}" for s in items if s.values[c].value is None)
            cells[c] = ClassCell(float(sum(vals) / len(vals)) if vals else None, len(vals), len(items), reasons)
        out.append(ClassBd(cls, mode, cells))
    return out


# ========================================================================================= complexity
def _num_or_none(value: Any) -> float | None:
    """A number from a JSON value or a CSV cell ("" and None: no value)."""
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def complexity(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per (class, mode) and per mode over all classes: mean and max MAC/pixel, the encoder time ratio
    T'/T = Σ encode_seconds / Σ backend_seconds (whole encode with training over the backend alone), the
    decoder time ratio Σ decode_seconds / Σ decode_plain_seconds (decode with side stream and filter
    over the plain av decode), and the summed times."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["class"], r["mode"]), []).append(r)
        groups.setdefault((ALL, r["mode"]), []).append(r)
    rows = []
    for (cls, mode), rs in sorted(groups.items(), key=lambda kv: (_class_key(kv[0][0]), _mode_key(kv[0][1]))):
        enc = sum(_num_or_none(r.get("encode_seconds")) or 0.0 for r in rs)
        back = sum(_num_or_none(r.get("backend_seconds")) or 0.0 for r in rs)
        train = sum(_num_or_none(r.get("train_seconds")) or 0.0 for r in rs)
        timed = [r for r in rs if _num_or_none(r.get("decode_seconds")) is not None
                 and _num_or_none(r.get("decode_plain_seconds")) is not None]
        dec = sum(_num_or_none(r["decode_seconds"]) or 0.0 for r in timed)
        plain = sum(_num_or_none(r["decode_plain_seconds"]) or 0.0 for r in timed)
        macs = [_num_or_none(r.get("mac_per_pixel")) or 0.0 for r in rs]
        decisions = [d for r in rs for seg in (r.get("segments") or []) for d in seg.get("decisions", {}).values()]
        rows.append({
            "class": cls, "mode": mode, "jobs": len(rs),
            "mac_per_pixel_mean": sum(macs) / len(macs) if macs else None,
            "mac_per_pixel_max": max(macs) if macs else None,
            "filter_on": (sum(d != "off" for d in decisions) / len(decisions)) if decisions else None,
            "encode_ratio": enc / back if back > 0 else None,
            "decode_ratio": dec / plain if timed and plain > 0 else None,
            "encode_seconds": round(enc, 3), "backend_seconds": round(back, 3), "train_seconds": round(train, 3),
            "decode_seconds": round(dec, 4) if timed else None,
            "decode_plain_seconds": round(plain, 4) if timed else None,
        })
    return rows


# ============================================================================================ summary
@dataclass
class Summary:
    """Everything the tables show. ``rows``: eval rows (or None for a bdrate comparison)."""

    sequences: list[SequenceBd]
    classes: list[ClassBd]
    modes: list[str]
    notes: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] | None = None
    complexity: list[dict[str, Any]] | None = None
    failures: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    anchor_label: str = "backend alone"
    test_label: str = "backend + filter"
    method: str = "pchip"

    def to_json(self) -> dict[str, Any]:
        def cell(v: BdValue) -> dict[str, Any]:
            return {"bd_rate": v.value, "reason": v.reason}

        return {
            "format": "hevc-nlf-bdrate", "version": 1, "method": self.method,
            "anchor": self.anchor_label, "test": self.test_label, "modes": self.modes, **self.meta,
            "sequences": [{"sequence": s.sequence, "class": s.cls, "mode": s.mode, "qps": list(s.qps),
                           **{c: cell(s.values[c]) for c in CHANNELS}} for s in self.sequences],
            "classes": [{"class": k.cls, "mode": k.mode,
                         **{c: {"bd_rate": k.values[c].mean, "sequences": k.values[c].count,
                                "of": k.values[c].total, "missing": list(k.values[c].reasons)}
                            for c in CHANNELS}} for k in self.classes],
            "complexity": self.complexity, "notes": self.notes, "failures": [
                {k: v for k, v in f.items() if k != "traceback"} for f in self.failures],
        }


def summarise(results: Sequence[Mapping[str, Any]], notes: Sequence[str] = (), failures: Sequence[Mapping] = (),
              modes: Sequence[str] | None = None, method: str = "pchip", meta: Mapping[str, Any] | None = None
              ) -> Summary:
    """Aggregate job results (of one eval) into BD-rates of filter vs backend, class averages, complexity."""
    rows = [result_row(r) for r in results]
    norm = _normalise_rows([(f"job {r.get('job_id') or i}", row) for i, (r, row) in enumerate(zip(results, rows), 1)],
                           "eval", "results") if rows else []
    seq_bds, more = compare(curves(norm, "before"), curves(norm, "after"), method)
    present = {r["mode"] for r in rows}
    mode_list = [m for m in (modes or MODES) if m in present] or sorted(present, key=_mode_key)
    all_notes = list(notes) + more
    for f in failures:
        all_notes.append(f"job {f['job_id']} failed ({f.get('type', 'error')}): {f['error']}")
    return Summary(seq_bds, class_averages(seq_bds), mode_list, all_notes, rows, complexity(results),
                   [dict(f) for f in failures], dict(meta or {}), method=method)


# ============================================================================================== tables
def _pct(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}%"


class _Footnotes:
    """Numbers the n/a reasons so cells stay short."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def ref(self, text: str) -> str:
        if text not in self.items:
            self.items.append(text)
        return f"[{self.items.index(text) + 1}]"

    def markdown(self) -> str:
        return "\n".join(f"{i}. {t}" for i, t in enumerate(self.items, start=1))


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "r") -> str:
    esc = [[str(c).replace("|", "\\|") for c in r] for r in rows]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(":---" if i == 0 else ("---:" if align == "r" else "---") for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(lines)


def class_table_md(summary: Summary, notes: _Footnotes | None = None) -> str:
    """Rows = classes (A–E, then All), columns = Y/U/V BD-rate per mode (the paper's layout)."""
    fn = notes or _Footnotes()
    modes = summary.modes
    header = ["Class"] + [f"{m.upper()} {c.upper()}" for m in modes for c in CHANNELS]
    by = {(k.cls, k.mode): k for k in summary.classes}
    classes = sorted({k.cls for k in summary.classes}, key=_class_key)
    if not classes:
        return "(no results)"
    rows = []
    for cls in classes:
        row = [f"HEVC {cls}" if cls != ALL else "All (mean over sequences)"]
        for m in modes:
            k = by.get((cls, m))
            for c in CHANNELS:
                if k is None:
                    row.append("—")
                    continue
                cell = k.values[c]
                text = _pct(cell.mean)
                if cell.count < cell.total:
                    text += f" ({cell.count}/{cell.total})" if cell.mean is not None else ""
                    text += " " + fn.ref("; ".join(cell.reasons))
                row.append(text)
        rows.append(row)
    return _md_table(header, rows)


def sequence_table_md(summary: Summary, notes: _Footnotes | None = None) -> str:
    fn = notes or _Footnotes()
    header = ["Sequence", "Class", "Mode", "QPs"] + [f"BD-rate {c.upper()}" for c in CHANNELS]
    rows = []
    for s in sorted(summary.sequences, key=lambda s: (_class_key(s.cls), s.sequence.casefold(), _mode_key(s.mode))):
        cells = []
        for c in CHANNELS:
            v = s.values[c]
            cells.append(_pct(v.value) if v.value is not None else "n/a " + fn.ref(f"{s.sequence} {s.mode.upper()} "
                                                                                     f"{c.upper()}: {v.reason}"))
        rows.append([s.sequence, s.cls, s.mode.upper(), ",".join(map(str, s.qps))] + cells)
    return _md_table(header, rows)


def rd_points_md(rows: Sequence[Mapping[str, Any]]) -> str:
    header = ["Sequence", "Mode", "QP", "Frames", "Anchor kbps", "PSNR Y", "PSNR U", "PSNR V",
              "Test kbps", "Side B", "PSNR Y", "PSNR U", "PSNR V", "ΔY dB", "ΔU dB", "ΔV dB"]
    out = []
    for r in sorted(rows, key=lambda r: (_class_key(r["class"]), r["sequence"].casefold(), _mode_key(r["mode"]), r["qp"])):
        out.append([r["sequence"], r["mode"].upper(), str(r["qp"]), str(r["frames"]), f"{r['kbps_before']:.2f}",
                    *(f"{r[f'psnr_before_{c}']:.3f}" for c in CHANNELS), f"{r['kbps_after']:.2f}", str(r["side_bytes"]),
                    *(f"{r[f'psnr_after_{c}']:.3f}" for c in CHANNELS),
                    *(f"{r[f'psnr_after_{c}'] - r[f'psnr_before_{c}']:+.3f}" for c in CHANNELS)])
    return _md_table(header, out)


def _ratio(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"


def complexity_md(rows: Sequence[Mapping[str, Any]]) -> str:
    header = ["Class", "Mode", "Jobs", "Filter on", "MAC/pixel (mean)", "MAC/pixel (max)", "Encoder T'/T",
              "Decoder T'/T",
              "Encode s", "Backend s", "Training s", "Decode s", "Plain decode s"]
    out = []
    for r in rows:
        out.append([f"HEVC {r['class']}" if r["class"] != ALL else ALL, r["mode"].upper(), str(r["jobs"]),
                    "n/a" if r.get("filter_on") is None else f"{100 * r['filter_on']:.0f}%",
                    f"{r['mac_per_pixel_mean']:.0f}", f"{r['mac_per_pixel_max']:.0f}", _ratio(r["encode_ratio"]),
                    _ratio(r["decode_ratio"]), f"{r['encode_seconds']:.1f}", f"{r['backend_seconds']:.1f}",
                    f"{r['train_seconds']:.1f}",
                    "n/a" if r["decode_seconds"] is None else f"{r['decode_seconds']:.2f}",
                    "n/a" if r["decode_plain_seconds"] is None else f"{r['decode_plain_seconds']:.2f}"])
    return _md_table(header, out)


def summary_markdown(summary: Summary, title: str = "hevc-nlf evaluation") -> str:
    fn = _Footnotes()
    parts = [f"# {title}", ""]
    if summary.meta.get("command"):
        parts += ["```", str(summary.meta["command"]), "```", ""]
    parts += [f"BD-rate of **{summary.test_label}** against **{summary.anchor_label}** per channel "
              f"({summary.method} interpolation; negative = rate saving). Rates are the total rate of all "
              f"channels" + (" including the side stream" if summary.rows is not None else "")
              + "; PSNR is averaged per picture (HM style).", ""]
    parts += ["## BD-rate per class", "", class_table_md(summary, fn), ""]
    if summary.complexity:
        parts += ["## Complexity", "",
                  "Encoder T'/T = whole encode (backend + training + decisions) / backend alone; decoder "
                  "T'/T = decode with side stream and filter / plain av decode; sums over the jobs of the row. "
                  "Filter on = share of (segment, Y|UV) records that apply a network; MAC/pixel is that of "
                  "the applied networks per job (0 where the filter is off throughout).",
                  "", complexity_md(summary.complexity), ""]
    parts += ["## BD-rate per sequence", "", sequence_table_md(summary, fn), ""]
    if summary.rows:
        parts += ["## RD points", "", "Anchor = backend alone; test = backend + filter (rate includes the side "
                  "stream).", "", rd_points_md(summary.rows), ""]
    if fn.items:
        parts += ["## Footnotes (n/a)", "", fn.markdown(), ""]
    if summary.notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in summary.notes] + [""]
    return "\n".join(parts)


def _csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(["" if v is None else v for v in r])
    return buf.getvalue()


def class_csv(summary: Summary) -> str:
    rows = []
    for k in summary.classes:
        for c in CHANNELS:
            cell = k.values[c]
            rows.append([k.cls, k.mode, c, cell.mean, cell.count, cell.total, "; ".join(cell.reasons)])
    return _csv_text(["class", "mode", "channel", "bd_rate", "sequences", "of", "missing"], rows)


def sequence_csv(summary: Summary) -> str:
    rows = []
    for s in summary.sequences:
        for c in CHANNELS:
            v = s.values[c]
            rows.append([s.sequence, s.cls, s.mode, c, " ".join(map(str, s.qps)), v.value, v.reason or ""])
    return _csv_text(["sequence", "class", "mode", "channel", "qps", "bd_rate", "reason"], rows)


def rows_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    return _csv_text(ROW_FIELDS, ([r.get(k) for k in ROW_FIELDS] for r in rows))


def complexity_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    keys = ["class", "mode", "jobs", "filter_on", "mac_per_pixel_mean", "mac_per_pixel_max", "encode_ratio", "decode_ratio",
            "encode_seconds", "backend_seconds", "train_seconds", "decode_seconds", "decode_plain_seconds"]
    return _csv_text(keys, ([r.get(k) for k in keys] for r in rows))


def _write_text(path: Path, text: str) -> None:
    from .files import atomic_output

    with atomic_output(path) as f:
        f.write(text.encode("utf-8"))


def write_plots(rows: Sequence[Mapping[str, Any]], directory: str | os.PathLike[str]) -> list[Path]:
    """One PNG per (sequence, mode): PSNR Y/U/V over rate, anchor vs test. Needs matplotlib (Agg); without
    it, logs a warning and writes nothing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; skipping the RD plots (pip install matplotlib)")
        return []
    out_dir = Path(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    norm = _normalise_rows([(f"row {i}", r) for i, r in enumerate(rows, 1)], "eval", "rows") if rows else []
    before, after = curves(norm, "before"), curves(norm, "after")
    for key in sorted(before):
        a, t = before[key], after[key]
        fig, axes = plt.subplots(1, 3, figsize=(13, 4))
        for ax, c in zip(axes, CHANNELS):
            ax.plot(a.kbps, a.psnr[c], "o-", label="backend alone")
            ax.plot(t.kbps, t.psnr[c], "s-", label="backend + filter")
            for q, x, y in zip(a.qps, a.kbps, a.psnr[c]):
                ax.annotate(f"QP{q}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
            ax.set_xscale("log")
            ax.set_xlabel("rate (kbps, incl. side stream)")
            ax.set_ylabel(f"PSNR {c.upper()} (dB)")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(loc="lower right", fontsize=8)
        fig.suptitle(f"{a.sequence} (class {a.cls}) {a.mode.upper()}")
        fig.tight_layout()
        path = out_dir / f"{_safe(a.sequence)}_{a.mode}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def write_outputs(results_dir: str | os.PathLike[str], summary: Summary, *, plots: bool = True) -> dict[str, Path]:
    """Write the run's files into ``results_dir`` (layout in docs/eval.md); returns them by role."""
    root = Path(results_dir)
    root.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    if summary.rows is not None:
        run = {"format": RUN_FORMAT, "version": RUN_FORMAT_VERSION, **summary.meta,
               "fields": list(ROW_FIELDS), "rows": summary.rows, "notes": summary.notes,
               "failures": [{k: v for k, v in f.items() if k != "traceback"} for f in summary.failures]}
        files["results.json"] = root / "results.json"
        _write_json_atomic(files["results.json"], run)
        files["results.csv"] = root / "results.csv"
        _write_text(files["results.csv"], rows_csv(summary.rows))
    files["bdrate.json"] = root / "bdrate.json"
    _write_json_atomic(files["bdrate.json"], summary.to_json())
    files["bdrate_classes.csv"] = root / "bdrate_classes.csv"
    _write_text(files["bdrate_classes.csv"], class_csv(summary))
    files["bdrate_sequences.csv"] = root / "bdrate_sequences.csv"
    _write_text(files["bdrate_sequences.csv"], sequence_csv(summary))
    if summary.complexity is not None:
        files["complexity.csv"] = root / "complexity.csv"
        _write_text(files["complexity.csv"], complexity_csv(summary.complexity))
    files["report.md"] = root / "report.md"
    _write_text(files["report.md"], summary_markdown(summary))
    if plots and summary.rows:
        for i, p in enumerate(write_plots(summary.rows, root / "plots")):
            files[f"plot{i}"] = p
    return files


def compare_runs(anchor: RunData, test: RunData, *, anchor_curve: str = "after", test_curve: str = "after",
                 method: str = "pchip") -> Summary:
    """BD-rate of run ``test`` against run ``anchor`` (``hevc-nlf bdrate A B``). For eval runs the curve
    is ``after`` (backend + filter, rate with side stream) or ``before`` (backend alone)."""
    for curve_name in (anchor_curve, test_curve):
        if curve_name not in ("before", "after"):
            raise UsageError(f"curve must be before or after, got {curve_name!r}")
    a = curves(anchor.rows, anchor_curve if anchor.kind == "eval" else None)
    t = curves(test.rows, test_curve if test.kind == "eval" else None)
    seq_bds, notes = compare(a, t, method)
    modes = sorted({s.mode for s in seq_bds}, key=_mode_key)

    def label(run: RunData, which: str) -> str:
        return run.source + (f" ({'backend + filter' if which == 'after' else 'backend alone'})"
                             if run.kind == "eval" else "")

    return Summary(seq_bds, class_averages(seq_bds), modes, notes, None, None,
                   meta={"anchor_source": anchor.source, "test_source": test.source},
                   anchor_label=label(anchor, anchor_curve), test_label=label(test, test_curve), method=method)


def self_comparison(run: RunData, method: str = "pchip") -> Summary:
    """Filter vs backend inside one eval run (recomputes its tables from ``results.json``)."""
    if run.kind != "eval":
        raise UsageError(f"{run.source}: one curve per row; give two runs to compare")
    seq_bds, notes = compare(curves(run.rows, "before"), curves(run.rows, "after"), method)
    modes = sorted({s.mode for s in seq_bds}, key=_mode_key)
    return Summary(seq_bds, class_averages(seq_bds), modes, list(run.meta.get("notes", [])) + notes, None,
                   complexity(run.rows), meta={"source": run.source}, method=method)
