"""``hevc-nlf eval`` and ``hevc-nlf bdrate``: the paper's evaluation (BD-rate per class and channel
against the backend alone, complexity ratios) and the comparison of two finished runs.

Registered on the main parser by :mod:`hevc_ext.cli_extra`. This module parses and prints; the work is
in :mod:`hevc_ext.evaluate`.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

from .errors import BackendUnavailableError, UsageError
from .files import check_output_folder

log = logging.getLogger("hevc_ext.cli")


def _list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UsageError(f"--{what}: expected a comma-separated list, got {text!r}")
    return items


def _qps(text: str) -> list[int]:
    try:
        return [int(q) for q in _list(text, "qps")]
    except ValueError:
        raise UsageError(f"--qps: expected integers like 22,27,32,37, got {text!r}") from None


def _overrides(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        name, sep, cls = item.partition("=")
        if not sep or not name.strip() or not cls.strip():
            raise UsageError(f"--class-override: expected NAME=CLASS (e.g. Cars=D), got {item!r}")
        out[name.strip()] = cls.strip()
    return out


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class _JobProgress:
    """One line on stderr per finished job: jobs done/total, cached, failed, ETA."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stderr

    def __call__(self, ev: Any) -> None:
        head = f"[{_duration(ev.elapsed):>6}] eval: {ev.done}/{ev.total} jobs"
        extra = []
        if ev.cached:
            extra.append(f"{ev.cached} cached")
        if ev.failed:
            extra.append(f"{ev.failed} failed")
        if extra:
            head += f" ({', '.join(extra)})"
        if ev.job_id is None:
            text = head + (", nothing to run" if ev.done == ev.total else ", starting")
        else:
            text = (head + f", ETA {_duration(ev.eta_seconds)}; {ev.job_id} {ev.status}"
                    + (f" in {ev.seconds:.1f} s" if ev.seconds is not None else "")
                    + (f": {ev.message}" if ev.message else ""))
        self.stream.write(text + "\n")
        self.stream.flush()


def _command_line(args: argparse.Namespace, parser: argparse.ArgumentParser, name: str) -> str:
    """The command as a user would type it: positional values and every option not at its default."""
    parts = ["hevc-nlf", name]
    for action in parser._actions:  # noqa: SLF001 - argparse has no public listing
        if action.dest in ("help", "func", "verbose", "quiet") or not hasattr(args, action.dest):
            continue
        value = getattr(args, action.dest)
        if not action.option_strings:
            parts += [str(v) for v in (value if isinstance(value, list) else [value])]
            continue
        if value == action.default or value is None:
            continue
        opt = max(action.option_strings, key=len)
        if isinstance(action, argparse._StoreTrueAction):  # noqa: SLF001
            parts.append(opt)
        elif isinstance(value, list):
            for v in value:
                parts += [opt, str(v)]
        else:
            parts += [opt, str(value)]
    return shlex.join(parts)


def _check_backend(codec: str) -> str:
    from .backends import get_backend

    try:
        backend = get_backend(codec)
    except ImportError as exc:
        raise BackendUnavailableError(f"codec {codec!r} is not available in this build: {exc}") from None
    ok, why = backend.availability()
    if not ok:
        raise BackendUnavailableError(f"codec {codec}: {why}")
    return backend.version()


def cmd_eval(args: argparse.Namespace) -> int:
    from . import evaluate as ev
    from .catalog import find_sequences

    out = Path(args.output)
    check_output_folder(out, "the results", inputs=[args.sequences])
    classes = _list(args.classes, "classes") if args.classes else None
    modes = [m.lower() for m in _list(args.modes, "modes")]
    qps = _qps(args.qps)
    seqs = find_sequences(args.sequences, classes=classes, class_overrides=_overrides(args.class_override))
    settings = ev.EvalSettings(
        codec=args.codec, intra_period=args.intra_period, ld_gop=args.gop, pack=args.pack, pack_uv=args.pack_uv,
        layers=args.layers, filters=args.filters, uv_layers=args.uv_layers, uv_filters=args.uv_filters,
        iterations=args.iterations, finetune_iterations=args.finetune_iterations, batch=args.batch,
        patch=args.patch, lr=args.lr, seed=args.seed,
        weight_bits=args.weight_bits, hash=args.hash, lambda_scale=args.lambda_scale,
        rd_slope=args.rd_slope, reuse_decay=args.reuse_decay, reuse_horizon=args.reuse_horizon,
        filter_enabled=not args.no_filter)
    specs, notes = ev.plan_jobs(seqs, modes, qps, settings, frames=args.frames, kernel=args.kernel,
                                threads=args.threads, measure_decode=not args.no_decode_timing,
                                decode_repeats=args.decode_repeats)
    if not specs:
        raise UsageError("nothing to run: " + " ".join(notes))
    ev.encoder_config(specs[0])  # validates the filter options before any work
    # a codec that cannot run here (HM not found) fails before anything is written; a dry run still plans
    version = None if args.dry_run else _check_backend(args.codec)
    command = _command_line(args, args._parser, "eval")
    plan = {"format": "hevc-nlf-eval-plan", "version": 1, "command": command,
            "jobs": [{"job_id": s.job_id, "spec_hash": s.spec_hash, "spec": s.to_dict()} for s in specs]}
    out.mkdir(parents=True, exist_ok=True)
    ev._write_json_atomic(out / "plan.json", plan)  # noqa: SLF001 - same package
    quiet = args.json or args.quiet
    if args.dry_run:
        cached = sum(1 for s in specs if ev.cached_result(out, s) is not None)
        if args.json:
            print(json.dumps(plan, indent=2))
        else:
            print(f"{len(specs)} jobs ({cached} cached) for {len(seqs)} sequences; plan in {out / 'plan.json'}")
            for s in specs:
                state = "cached" if ev.cached_result(out, s) is not None else "to run"
                print(f"  {s.job_id:40s} class {s.cls} {s.width}x{s.height} {s.frames} frames  {state}")
            for n in notes:
                print(f"note: {n}")
        return 0
    if not quiet:
        sys.stderr.write(f"hevc-nlf eval: {len(seqs)} sequences × {len(specs) // len(seqs)} (mode, QP) = "
                         f"{len(specs)} jobs with {version}, {args.jobs} worker(s); results in {out}\n")
        for n in notes:
            sys.stderr.write(f"hevc-nlf eval: note: {n}\n")
    t0 = time.perf_counter()
    outcome = ev.run_jobs(specs, out, jobs=args.jobs, progress=None if quiet else _JobProgress(), force=args.force)
    wall = time.perf_counter() - t0
    meta = {"command": command, "codec": args.codec, "codec_version": version, "modes": modes, "qps": qps,
            "frames_cap": args.frames, "sequences": [{"name": s.name, "class": s.cls, "file": s.path.name,
                                                       "size": f"{s.width}x{s.height}", "frames": s.frames}
                                                      for s in seqs],
            "jobs_total": len(specs), "jobs_run": outcome.ran, "jobs_cached": outcome.cached,
            "wall_seconds": round(wall, 2), "workers": args.jobs,
            "job_seconds_total": round(sum(float(r.get("job_seconds") or 0) for r in outcome.results), 2)}
    summary = ev.summarise(outcome.results, notes=notes, failures=outcome.failures, modes=modes,
                           method=args.bd_method, meta=meta)
    files = ev.write_outputs(out, summary, plots=not args.no_plots)
    if args.json:
        print(json.dumps(summary.to_json(), indent=2))
    else:
        fn = ev._Footnotes()  # noqa: SLF001
        print(f"BD-rate of backend + filter vs {version} alone ({args.bd_method}; rate incl. side stream):")
        print(ev.class_table_md(summary, fn))
        if summary.complexity:
            print()
            print(ev.complexity_md([r for r in summary.complexity if r["class"] == ev.ALL]))
        if fn.items:
            print()
            print("n/a:\n" + fn.markdown())
        for n in summary.notes:
            print(f"note: {n}")
        print(f"\n{len(specs)} jobs ({outcome.cached} cached, {outcome.ran} run, {len(outcome.failures)} failed) "
              f"in {wall:.1f} s; wrote {files['report.md']} and {len(files) - 1} more files in {out}")
    if outcome.failures:
        sys.stderr.write(f"hevc-nlf eval: {len(outcome.failures)} job(s) failed; details in "
                         f"{out / 'jobs'}/*.error.json; run the same command again to retry them\n")
        return 1
    return 0


def cmd_bdrate(args: argparse.Namespace) -> int:
    from . import evaluate as ev

    if len(args.runs) not in (1, 2):
        raise UsageError("bdrate: give one run (filter vs backend inside it) or two runs A B (B vs A)")
    if args.output:
        check_output_folder(args.output, "bdrate's tables")
    if len(args.runs) == 1:
        summary = ev.self_comparison(ev.load_run(args.runs[0]), method=args.method)
    else:
        a, b = ev.load_run(args.runs[0]), ev.load_run(args.runs[1])
        summary = ev.compare_runs(a, b, anchor_curve=args.a_curve, test_curve=args.b_curve, method=args.method)
    if args.output:
        ev.write_outputs(args.output, summary, plots=False)
    if args.json:
        print(json.dumps(summary.to_json(), indent=2))
        return 0
    fn = ev._Footnotes()  # noqa: SLF001
    print(f"BD-rate of {summary.test_label} vs {summary.anchor_label} ({summary.method}; negative = saving)")
    print()
    print(ev.class_table_md(summary, fn))
    print()
    print(ev.sequence_table_md(summary, fn))
    if fn.items:
        print()
        print("n/a:\n" + fn.markdown())
    for n in summary.notes:
        print(f"note: {n}")
    if args.output:
        print(f"\nwrote the tables to {args.output}")
    return 0


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]",
             add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    from .cli import _add_filter_options, positive_int

    p = sub.add_parser(
        "eval", help="BD-rate evaluation over a folder of sequences (the paper's tables)",
        description="Encode every (sequence, mode, QP) with the backend and the filter, as independent "
                    "cached jobs, and write per-sequence and per-class BD-rate tables (filter vs backend "
                    "alone; rate includes the side stream), RD plots, MAC/pixel and time ratios. Running "
                    "the same command again resumes: finished jobs are not encoded again.")
    g = p.add_argument_group("evaluation")
    g.add_argument("--sequences", required=True, metavar="DIR", help="folder of .yuv/.y4m sequences")
    g.add_argument("--classes", metavar="LIST", help="only these HEVC classes, e.g. A,B,C,D,E (default: all)")
    g.add_argument("--class-override", action="append", metavar="NAME=CLASS",
                   help="put a sequence in a class (repeatable)")
    g.add_argument("--modes", default="ra,ldb,ldp", metavar="LIST", help="coding modes; ldb is skipped with x265 (default: %(default)s)")
    g.add_argument("--qps", default="22,27,32,37", metavar="LIST", help="QPs, 4 for a BD-rate (default: %(default)s)")
    g.add_argument("--codec", default="x265", help="x265 or hm (default: %(default)s)")
    g.add_argument("--frames", type=positive_int, default=None, metavar="N",
                   help="frames per sequence: min(N, available) (default: all)")
    g.add_argument("--intra-period", type=positive_int, default=32, help="random access intra period (default: %(default)s)")
    g.add_argument("--gop", type=positive_int, default=5, help="low delay filter GoP, 1..64 pictures (the paper: 1..5; default 5)")
    g.add_argument("--kernel", default="auto", choices=("auto", "cuda", "cpu", "reference"),
                   help="filter implementation (default: %(default)s)")
    g.add_argument("-j", "--jobs", type=positive_int, default=1, help="parallel jobs (processes) (default: %(default)s)")
    g.add_argument("-o", "--output", required=True, metavar="RESULTS_DIR", help="results directory (the cache)")
    g.add_argument("--force", action="store_true", help="run every job again, ignoring cached results")
    g.add_argument("--dry-run", action="store_true", help="write plan.json and list the jobs; run nothing")
    g.add_argument("--no-decode-timing", action="store_true", help="skip the decode timing of each job (a warm-up and --decode-repeats timed decodes, plain and filtered)")
    g.add_argument("--decode-repeats", type=positive_int, default=3,
                   help="timed decodes per job of each kind, plain and filtered; the minimum is kept (default: %(default)s)")
    g.add_argument("--no-plots", action="store_true", help="no RD plots")
    g.add_argument("--bd-method", default="pchip", choices=("pchip", "cubic"), help="BD interpolation (default: %(default)s)")
    g.add_argument("--json", action="store_true", help="print the BD-rate summary as JSON; no progress")
    _add_filter_options(p)
    add_common(p)
    p.set_defaults(func=cmd_eval, _parser=p)

    p = sub.add_parser(
        "bdrate", help="BD-rate of one finished run against another",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="BD-rate of run B against run A per sequence, mode and channel, with class averages. "
                    "A run is an eval results directory, its results.json or results.csv, or a CSV with "
                    "the columns sequence,class,mode,qp,kbps,psnr_y,psnr_u,psnr_v. With one run: filter vs "
                    "backend inside that run (its tables again).")
    p.add_argument("runs", nargs="+", metavar="RUN", help="A [B]")
    p.add_argument("--a-curve", default="after", choices=("after", "before"),
                   help="curve of an eval run A: after = backend + filter (rate with side stream), before = backend")
    p.add_argument("--b-curve", default="after", choices=("after", "before"), help="curve of an eval run B")
    p.add_argument("--method", default="pchip", choices=("pchip", "cubic"), help="BD interpolation")
    p.add_argument("-o", "--output", metavar="DIR", help="also write the tables (md, csv, json) here")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_common(p)
    p.set_defaults(func=cmd_bdrate, _parser=p)
