"""The ``hevc-nlf`` command line: the only place that parses argv, prints, or exits."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .errors import NlfError, UsageError

log = logging.getLogger("hevc_ext.cli")


# ------------------------------------------------------------------------------------------ progress
class ProgressPrinter:
    """One status line on stderr: rewritten in place on a terminal, throttled lines otherwise."""

    def __init__(self, stream: Any = None, enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last = 0.0
        self._width = 0
        self._start = time.perf_counter()

    def __call__(self, stage: str, done: int, total: int, message: str) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        final = total and done >= total
        if not final and now - self._last < (0.2 if self.tty else 5.0):
            return
        self._last = now
        pct = f" {done}/{total}" if total else ""
        text = f"[{now - self._start:6.1f}s] {stage}: {message}{pct}"
        if self.tty:
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (also used by the scripts under tools/)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress, no summary and no log output below errors (--json still prints its object)")


def _add_input_format(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("raw input format (default: from the name Name_WxH_fps.yuv)")
    g.add_argument("--size", metavar="WxH", help="frame size of a raw .yuv input")
    g.add_argument("--fps", metavar="F", help="frame rate (e.g. 50, 30000:1001)")
    g.add_argument("--bitdepth", type=int, choices=(8, 10, 12), help="sample bit depth of a raw input (default 8)")


def _add_filter_options(p: argparse.ArgumentParser) -> None:
    from .pipeline import EncoderConfig  # for the defaults in the help texts

    g = p.add_argument_group("filter")
    g.add_argument("--pack", default="default", metavar="P",
                   help="luma pixel packing: default (paper: 2x2 for >=2560x1600, 1x2 for 1080p, else 1x1), "
                        "auto (trained and chosen per segment by RD cost), 1x1, 1x2, 2x1, 2x2 (default: %(default)s)")
    g.add_argument("--pack-uv", default=None, metavar="P",
                   help="chroma pixel packing (default: 1x1, or auto with --pack auto)")
    g.add_argument("--layers", type=positive_int, default=5, help="layers of both networks (default: %(default)s)")
    g.add_argument("--filters", type=positive_int, default=12, help="filters per layer (default: %(default)s)")
    g.add_argument("--uv-layers", type=positive_int, default=None, help="layers of the chroma network")
    g.add_argument("--uv-filters", type=positive_int, default=None, help="filters of the chroma network")
    g.add_argument("--iterations", type=_nonneg_int, default=None, help="training steps per network (default 600)")
    g.add_argument("--finetune-iterations", type=_nonneg_int, default=None,
                   help="low delay: steps when starting from the previous GoP's network (default 200)")
    g.add_argument("--batch", type=positive_int, default=None, help="patches per batch (default 64)")
    g.add_argument("--patch", type=positive_int, default=None, help="patch size (default 48)")
    g.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 0.02)")
    g.add_argument("--seed", type=int, default=None, help="training seed (default 1234)")
    g.add_argument("--weight-bits", default=None, metavar="LIST",
                   help="candidate weight bit widths b_w, e.g. 8,6,5 (the encoder picks per record by RD cost)")
    g.add_argument("--hash", choices=("md5", "crc32", "none"), default="md5",
                   help="hash of the filtered pictures carried by each record (default: %(default)s)")
    g.add_argument("--no-filter", action="store_true", help="encode only: every record 'off' (anchor runs)")
    g.add_argument("--lambda-scale", type=float, default=1.0,
                   help="price of side bits in the encoder's decisions relative to BD-consistent (default 1)")
    g.add_argument("--reuse-decay", type=float, default=None, metavar="R",
                   help="low delay: credit a group's first network with the expected worth of reusing it in "
                        "later GoPs, its gain decaying by R per GoP (0: greedy, each GoP pays for itself; default: "
                        f"{EncoderConfig.reuse_decay})")
    g.add_argument("--reuse-horizon", type=_nonneg_int, default=None, metavar="N",
                   help=f"low delay: ... over at most N later GoPs (default: {EncoderConfig.reuse_horizon})")
    g.add_argument("--rd-slope", type=float, default=None, metavar="DB",
                   help="the backend's RD slope in dB per doubling of the rate, which converts PSNR gains "
                        f"into bits for the decisions (default: {EncoderConfig.rd_slope_db})")
    g.add_argument("--threads", type=_nonneg_int, default=0, help="torch threads for training (0: torch default)")


def _add_coding_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("coding")
    g.add_argument("--mode", default="ra", help="ra (random access), ldb (low-delay B), ldp (low-delay P) "
                                                 "(default: %(default)s)")
    g.add_argument("--codec", default="x265", help="x265 (built into av; default) or hm (HEVC_NLF_HM_DIR)")
    g.add_argument("--qp", type=int, default=32, help="quantization parameter (default: %(default)s)")
    g.add_argument("--frames", type=positive_int, default=None, help="frames to encode (default: all)")
    g.add_argument("--intra-period", type=positive_int, default=32,
                   help="random access: pictures between intra pictures = filter segment length (default 32)")
    g.add_argument("--gop", type=positive_int, default=5,
                   help="low delay: pictures per filter GoP, 1..64 (the paper: 1..5) (default: %(default)s)")
    g.add_argument("--kernel", default="auto", choices=("auto", "cuda", "cpu", "reference"),
                   help="filter implementation (default: %(default)s)")
    g.add_argument("--keep-tmp", action="store_true", help="keep the working directory (logs, recon)")


def _encoder_config(args: argparse.Namespace) -> Any:
    from .arch import Architecture
    from .backends import CodingConfig
    from .pipeline import DEFAULT_QUANT_CANDIDATES, EncoderConfig, given, parse_packing
    from .quant import QuantConfig
    from .sidecar import HashType

    coding = CodingConfig(args.mode, args.qp, args.intra_period, args.frames)
    train_kw = {k: getattr(args, k) for k in ("iterations", "finetune_iterations", "batch", "patch", "lr", "seed")
                if getattr(args, k, None) is not None}
    if args.threads:
        train_kw["threads"] = args.threads
    from .pipeline import train_config_class

    tcfg = train_config_class()(**train_kw)
    quant = DEFAULT_QUANT_CANDIDATES
    if args.weight_bits:
        try:
            bits = [int(b) for b in args.weight_bits.split(",")]
        except ValueError:
            raise UsageError(f"--weight-bits: expected a list like 8,6,5, got {args.weight_bits!r}") from None
        quant = tuple(QuantConfig(weight_bits=b, bias_bits=10 if b >= 7 else 8, scale_bits=4 if b >= 6 else 2)
                      for b in bits)
    return EncoderConfig(
        coding=coding, codec=args.codec, ld_gop=args.gop,
        arch_y=Architecture(args.layers, args.filters),
        arch_uv=Architecture(args.uv_layers or args.layers, args.uv_filters or args.filters),
        packing=parse_packing(args.pack), packing_uv=parse_packing(args.pack_uv) if args.pack_uv else None,
        train=tcfg, quant_candidates=quant, hash_type=HashType[args.hash.upper()], kernel=args.kernel,
        lambda_scale=args.lambda_scale, filter_enabled=not args.no_filter,
        **given(rd_slope_db=args.rd_slope, reuse_decay=args.reuse_decay, reuse_horizon=args.reuse_horizon),
        keep_tmp=args.keep_tmp,
        embed=getattr(args, "embed", False))


def _default_base(input_path: str) -> str:
    if input_path == "-":
        return "stdin_nlf"
    return Path(input_path).with_suffix("").name


def _output_base(output: str | None, input_path: str) -> str:
    """BASE of ``encode -o``: a trailing ``.hevc`` or ``.nlf`` names the stream or the side stream, so
    ``-o clip.hevc`` writes clip.hevc and clip.nlf (not clip.hevc.hevc)."""
    if not output:
        return _default_base(input_path)
    p = Path(output)
    return str(p.with_suffix("")) if p.suffix.lower() in (".hevc", ".nlf") else output


def cmd_encode(args: argparse.Namespace) -> int:
    from .pipeline import encode

    config = _encoder_config(args)
    base = _output_base(args.output, args.input)
    progress = ProgressPrinter(enabled=not (args.json or args.quiet))
    try:
        report = encode(args.input, base, config, size=args.size, fps=args.fps, bitdepth=args.bitdepth,
                        progress=progress)
    finally:
        progress.close()
    data = report.data
    if not args.per_frame:
        data = {k: v for k, v in data.items() if k != "per_frame"}
        for seg in data["segments"]:
            for g in seg["groups"].values():
                g.pop("candidates", None)
    if args.json:
        print(json.dumps(data, indent=2))
    elif not args.quiet:
        _print_encode_summary(report)
    return 0


def _print_encode_summary(report: Any) -> None:
    d = report.data
    print(f"{d['codec_version']} {d['mode']} QP {d['qp']}: {report.summary_line()}")
    print(f"  rate {d['kbps_before']:.2f} kbps → {d['kbps_after']:.2f} kbps with side information; "
          f"{d['mac_per_pixel']:.0f} MAC/pixel; {d['encode_seconds']:.1f} s "
          f"(backend {d['backend_seconds']:.1f} s, training {d['train_seconds']:.1f} s)")
    for seg in d["segments"]:
        parts = []
        for name, g in seg["groups"].items():
            detail = f"{g['decision']}" + (f" {g['packing']} b_w={g['quant']['weight_bits']}" if g["quant"] else "")
            parts.append(f"{name}: {detail} ({g['side_bytes']} B)")
        pb, pa = seg["psnr_before"], seg["psnr_after"]
        print(f"  segment {seg['index']} frames {seg['first_frame']}..{seg['first_frame'] + seg['frames'] - 1}: "
              + ", ".join(parts)
              + f"; ΔPSNR {pa['y'] - pb['y']:+.3f}/{pa['u'] - pb['u']:+.3f}/{pa['v'] - pb['v']:+.3f}")
    if d.get("outputs") and d["outputs"]["side"] is None:
        print(f"  wrote {d['outputs']['hevc']}, no side stream: no picture is filtered (the plain stream is "
              f"the result)")
    elif d.get("outputs"):
        side = "its side stream in-band (SEI)" if d.get("embedded") else d["outputs"]["side"]
        print(f"  wrote {d['outputs']['hevc']} and {side}")
    for c in d.get("commands", []):
        print(f"  backend command: {c}")
    workdir = d.get("workdir")
    if d.get("commands") and workdir and not workdir["kept"]:
        print(f"  (the command's files were in {workdir['path']}, removed at the end; --keep-tmp keeps them)")


def decode_sidecar(stream: str, sidecar: str | None, no_sidecar: bool) -> str | None:
    """The side stream `decode` applies: ``--sidecar``, else STREAM's name with the suffix .nlf when
    that file exists (what ``encode -o BASE`` writes beside BASE.hevc), unless ``--no-sidecar``."""
    if sidecar is not None or no_sidecar:
        return sidecar
    beside = Path(stream).with_suffix(".nlf")
    return str(beside) if beside.is_file() and beside != Path(stream) else None


def cmd_decode(args: argparse.Namespace) -> int:
    from .pipeline import decode

    progress = ProgressPrinter(enabled=not (args.json or args.quiet or args.output == "-"))
    sidecar = decode_sidecar(args.stream, args.sidecar, args.no_sidecar)
    if sidecar is not None and args.sidecar is None:
        log.info("side stream %s (found next to the stream; --no-sidecar decodes without it)", sidecar)
    try:
        rep = decode(args.stream, args.output, sidecar, kernel=args.kernel, progress=progress, fps=args.fps,
                     side_path_found=args.sidecar is None)
    finally:
        progress.close()
    info = {"frames": rep.frames, "width": rep.width, "height": rep.height, "bitdepth": rep.bitdepth,
            "records_applied": rep.filtered_records, "records_verified": rep.verified_records,
            "kernel": rep.kernel, "sidecar": sidecar if rep.side_stream == sidecar else None,
            "side_stream": rep.side_stream or None, "seconds": round(rep.seconds, 3), "output": args.output}
    if args.json:
        (sys.stderr if args.output == "-" else sys.stdout).write(json.dumps(info, indent=2) + "\n")
    elif args.output != "-" and not args.quiet:
        side = f"side stream {rep.side_stream}" if rep.side_stream else "no side stream"
        print(f"decoded {rep.frames} pictures {rep.width}x{rep.height} {rep.bitdepth}-bit with the {rep.kernel} "
              f"kernel ({side}); {rep.verified_records} records verified; wrote {args.output} ({rep.seconds:.2f} s)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    data = collect_info()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"hevc-nlf {data['version']} (python {data['python']})")
    m = data["machine"]
    print(f"  machine      {m['cpu']}, {m['cpus']} CPUs, {m['os']}")
    for name, ver in data["packages"].items():
        print(f"  {name:12s} {ver}")
    print("backends:")
    for name, b in data["backends"].items():
        state = "available" if b["available"] else "unavailable"
        print(f"  {name:12s} {state}: {b['detail']}" + (f" [{b['version']}]" if b.get("version") else ""))
    print("kernels:")
    kr = data["kernels"]
    for name, k in kr.get("kernels", {}).items():
        where = f" ({k['path']})" if k.get("available") and k.get("path") else ""
        print(f"  {name:12s} {'available' if k.get('available') else 'unavailable'}: {k.get('reason', '')}{where}")
    print(f"  active: {kr.get('active')}")
    tr = data["training"]
    print("training engine (encoder):")
    print(f"  {'cpu':12s} {'available' if tr['available'] else 'unavailable'}: {tr['reason']}")
    print(f"  active: {tr['active']}")
    return 0


def collect_info() -> dict:
    import platform

    import av
    import numpy

    from . import machine
    from .backends import BACKENDS, get_backend
    from .kernels import kernel_report

    packages: dict[str, str] = {"numpy": numpy.__version__, "av": av.__version__}
    try:
        import constriction  # noqa: F401
        from importlib.metadata import version

        packages["constriction"] = version("constriction")
    except Exception:  # pragma: no cover - constriction is a dependency
        packages["constriction"] = "missing"
    try:
        import torch

        packages["torch"] = torch.__version__
    except ImportError:
        packages["torch"] = "not installed (needed for encoding only)"
    packages["ffmpeg"] = ".".join(str(v) for v in av.library_versions.get("libavcodec", ())) + " (libavcodec)"
    backends = {}
    for name in BACKENDS:
        try:
            b = get_backend(name)
            ok, why = b.availability()
            backends[name] = {"available": ok, "detail": why, "version": b.version() if ok else None}
        except NlfError as exc:
            backends[name] = {"available": False, "detail": str(exc), "version": None}
    return {"version": __version__, "python": platform.python_version(), "platform": platform.platform(),
            "machine": machine.describe(),
            "packages": packages, "backends": backends, "kernels": kernel_report(), "training": _training_report()}


def _training_report() -> dict[str, object]:
    """The encoder's training engine: the C++ one (what ``TrainConfig(engine="auto")`` takes) or PyTorch's autograd."""
    try:
        from . import trainkernel  # imports torch
    except ImportError as exc:
        return {"available": False, "reason": f"cannot import torch ({exc}): needed for encoding only",
                "active": None}
    ok, why = trainkernel.available()
    return {"available": ok, "reason": why, "active": "cpu" if ok else "torch"}


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hevc-nlf", description="Online-trained CNN filter for HEVC "
                                     "(Klopp, Chen & Chien): encode, decode, evaluate.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=f"hevc-nlf {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("encode", help="encode a video and train its filter",
                       description="Encode INPUT with an HEVC backend, train the filter per segment, and "
                                   "write BASE.hevc and BASE.nlf (the side stream).")
    p.add_argument("input", help="raw .yuv (Name_WxH_fps.yuv), .y4m, or - (Y4M on stdin)")
    p.add_argument("-o", "--output", metavar="BASE",
                   help="output base name; a trailing .hevc or .nlf is dropped (default: the input file's name "
                        "without its suffix, in the current folder; stdin_nlf for -)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the figures")
    p.add_argument("--per-frame", action="store_true", help="include per-frame figures and candidates in --json")
    p.add_argument("--embed", action="store_true",
                   help="carry the side stream as SEI NAL units inside BASE.hevc instead of writing BASE.nlf")
    _add_coding_options(p)
    _add_filter_options(p)
    _add_input_format(p)
    _add_common(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", help="decode a stream and apply its filter",
                       description="Decode STREAM, rebuild the integer filters from the side stream, filter, "
                                   "verify the hashes and write the pictures.")
    p.add_argument("stream", help="HEVC stream: elementary (.hevc) or any container av demuxes (.mp4, .mkv)")
    side = p.add_mutually_exclusive_group()
    side.add_argument("--sidecar", metavar="FILE",
                      help="side stream (.nlf) (default: STREAM's name with .nlf when that file exists, else the "
                           "records embedded in STREAM, if any)")
    side.add_argument("--no-sidecar", action="store_true",
                      help="do not look for a .nlf beside STREAM (records embedded in STREAM still apply)")
    p.add_argument("-o", "--output", required=True, help="output .yuv, .y4m, or - (Y4M on stdout)")
    p.add_argument("--kernel", default="auto", choices=("auto", "cuda", "cpu", "reference"),
                   help="filter implementation (default: %(default)s; auto: CUDA, else C++, else the reference)")
    p.add_argument("--fps", help="frame rate written to Y4M output (default: from the side stream, else 25)")
    p.add_argument("--json", action="store_true", help="print a JSON summary (to stderr when -o -)")
    _add_common(p)
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("info", help="versions, backends and kernels available here")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    _add_common(p)
    p.set_defaults(func=cmd_info)

    from . import cli_extra

    cli_extra.register(sub, _add_common)
    return parser


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=level, format="hevc-nlf: %(levelname)s: %(message)s", stream=sys.stderr)
    logging.getLogger("hevc_ext").setLevel(level)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``): unwinds like Ctrl-C, so that temporary files are removed."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(getattr(args, "verbose", 0), getattr(args, "quiet", False))
    previous = None
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return int(args.func(args) or 0)
    except NlfError as exc:
        sys.stderr.write(f"hevc-nlf: error: {exc}\n")
        return exc.exit_code
    except _Terminated:
        sys.stderr.write("hevc-nlf: terminated\n")
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        sys.stderr.write("hevc-nlf: interrupted\n")
        return 130
    except BrokenPipeError:
        # the reader of our stdout went away (e.g. `| head`); not an error of ours
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        except OSError:
            pass
        return 141
    except OSError as exc:  # a file-system failure no check foresaw (disk full...): one line, no traceback
        where = f"{exc.filename}: " if exc.filename else ""
        sys.stderr.write(f"hevc-nlf: error: {where}{exc.strerror or exc}\n")
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
