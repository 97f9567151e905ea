"""``hevc-nlf extract | strip | transcode``: the in-band side stream (docs/sei.md) on the command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from .cli import ProgressPrinter, _add_coding_options, _add_filter_options, _add_input_format, _encoder_config
from .errors import UsageError


def _read_stream(path: str) -> bytes:
    from .container import read_annexb
    from .errors import InputFormatError
    from .files import check_input

    if path == "-":
        data = sys.stdin.buffer.read()
    else:
        check_input(path, "an HEVC stream")
        data = read_annexb(path)
    if not data:
        raise InputFormatError(f"{'<stdin>' if path == '-' else path}: empty, expected an HEVC stream")
    return data


def cmd_extract(args: argparse.Namespace) -> int:
    from .files import atomic_outputs, check_output
    from .sei import parse_units, scan

    for out in (args.output, args.stripped):
        if out is not None:
            check_output(out, inputs=(args.stream,))
    if args.stripped and args.stripped == args.output:
        raise UsageError(f"{args.stripped}: --stripped needs a name of its own, not the sidecar's")
    found = scan(_read_stream(args.stream), args.stream)
    if not found.units:
        raise UsageError(f"{args.stream}: carries no hevc-nlf records (encode with --embed)")
    side = parse_units(found.units, args.stream, found.pictures)  # validate before writing anything
    sidecar = found.sidecar_bytes()
    with atomic_outputs(args.output, *([args.stripped] if args.stripped else [])) as handles:  # all or none
        handles[0].write(sidecar)
        if args.stripped:
            handles[1].write(found.plain)
    if args.output != "-" and not args.quiet:
        print(f"{args.stream}: {len(side.records)} records for {found.pictures} pictures; wrote {args.output} "
              f"({len(sidecar)} bytes)" + (f" and {args.stripped} ({len(found.plain)} bytes)" if args.stripped else ""))
    return 0


def cmd_strip(args: argparse.Namespace) -> int:
    from .files import atomic_output, check_output
    from .sei import strip

    check_output(args.output, inputs=(args.stream,))
    data = _read_stream(args.stream)
    plain = strip(data, args.stream)
    with atomic_output(args.output) as f:
        f.write(plain)
    if args.output != "-" and not args.quiet:
        print(f"{args.stream}: removed {len(data) - len(plain)} bytes of hevc-nlf SEI; wrote {args.output} "
              f"({len(plain)} bytes)")
    return 0


def cmd_transcode(args: argparse.Namespace) -> int:
    from .container import container_for, mux, open_input
    from .files import atomic_output, check_output
    from .pipeline import _workdir, encode

    container = container_for(args.output, args.container)
    check_output(args.output, inputs=(args.input,))
    if args.output == "-" and container == "mp4":
        raise UsageError("MP4 cannot be written to a pipe (it needs seeking); use --container mkv or hevc")
    config = replace(_encoder_config(args), embed=True)
    progress = ProgressPrinter(enabled=not (args.json or args.quiet))
    t0 = time.perf_counter()
    try:
        with open_input(args.input, args.size, args.fps, args.bitdepth) as source, \
                _workdir(args.keep_tmp) as work:
            report = encode(args.input, str(work / "out"), config, progress=progress, source=source)
            stream = (work / "out.hevc").read_bytes()
            progress("mux", 0, 1, f"writing {container}")
            with atomic_output(args.output) as handle:
                packets = mux(stream, handle, container, source.fmt.fps)
            progress("mux", 1, 1, f"writing {container}")
    finally:
        progress.close()
    data: dict[str, Any] = {k: v for k, v in report.data.items() if k not in ("per_frame", "segments", "outputs")}
    data.update(output=args.output, container=container, packets=packets,
                output_bytes=Path(args.output).stat().st_size if args.output != "-" else None,
                seconds=round(time.perf_counter() - t0, 2))
    out = sys.stderr if args.output == "-" else sys.stdout
    if args.json:
        out.write(json.dumps(data, indent=2) + "\n")
    elif not args.quiet:
        pb, pa = data["psnr_before"], data["psnr_after"]
        out.write(f"{args.input} → {args.output} ({container}): {data['frames']} frames {data['mode']} QP "
                  f"{data['qp']}, {data['hevc_bytes']} + {data['side_bytes']} bytes of in-band SEI "
                  + (f"(sidecar would be {data['sidecar_bytes']}); " if "sidecar_bytes" in data else
                     "(no picture filtered: none); ") + f"PSNR Y {pb['y']:.3f} → {pa['y']:.3f} dB, "
                  f"U {pb['u']:.3f} → {pa['u']:.3f}, V {pb['v']:.3f} → {pa['v']:.3f}; {data['seconds']:.1f} s\n")
    return 0


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]",
             add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("extract", help="write the side stream embedded in a stream as a sidecar file",
                       description="Check the hevc-nlf SEI records of STREAM (.hevc, MP4, MKV...) and write them "
                                   "as a sidecar (.nlf), byte-identical to what `encode` without --embed writes.")
    p.add_argument("stream", help="HEVC stream or container with embedded records (- : stdin)")
    p.add_argument("-o", "--output", required=True, help="sidecar file to write (- : stdout)")
    p.add_argument("--stripped", metavar="OUT", help="also write the plain stream (without the SEI) here")
    add_common(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("strip", help="remove the embedded hevc-nlf SEI from a stream",
                       description="Write STREAM without its hevc-nlf SEI NAL units, as an Annex-B elementary "
                                   "stream. The records are not checked, so this also recovers the plain "
                                   "pictures of a stream whose records are damaged.")
    p.add_argument("stream", help="HEVC stream or container (- : stdin)")
    p.add_argument("-o", "--output", required=True, help="plain .hevc to write (- : stdout)")
    add_common(p)
    p.set_defaults(func=cmd_strip)

    p = sub.add_parser("transcode", help="decode anything, encode with the filter, embed, mux",
                       description="Decode INPUT (any video av reads, raw .yuv, .y4m, or - for Y4M on stdin), "
                                   "encode it with the chosen backend, train the filter, embed the side stream "
                                   "as SEI and write OUTPUT as MP4, MKV or an HEVC elementary stream.")
    p.add_argument("input", help="input video: a container/stream av decodes, .yuv, .y4m, or - (Y4M on stdin)")
    p.add_argument("output", help="output .mp4, .mkv or .hevc (- : stdout, hevc or mkv)")
    p.add_argument("--container", default="auto", choices=("auto", "mp4", "mkv", "hevc"),
                   help="output container (default: from the output suffix; hevc for -)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the figures")
    _add_coding_options(p)
    _add_filter_options(p)
    _add_input_format(p)
    add_common(p)
    p.set_defaults(func=cmd_transcode)
