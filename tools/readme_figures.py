#!/usr/bin/env python3
"""Regenerate the figures table of README.md: real encodes of BasketballPass (the one true CTC clip
among ../shared/sequences) with the x265 backend at the default settings.

    python tools/readme_figures.py [--sequences DIR] [--out FILE.json] [--update-readme]

Prints a Markdown table (PSNR HM-style: mean of per-picture PSNR; rate = HEVC + side stream), writes
the raw reports as JSON and, with --update-readme, replaces the table between the
``<!-- figures:begin -->`` and ``<!-- figures:end -->`` markers of README.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import toolmain  # noqa: E402  (the repository first on sys.path)

REPO = toolmain.REPO

from hevc_ext.backends import CodingConfig  # noqa: E402
from hevc_ext.pipeline import EncoderConfig, encode  # noqa: E402

RUNS = [("ra", 32, 5), ("ra", 37, 5), ("ldp", 32, 4), ("ldp", 37, 4)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", default=str(REPO.parent / "shared" / "sequences"))
    ap.add_argument("--frames", type=int, default=33)
    ap.add_argument("--out", default="readme_figures.json")
    ap.add_argument("--update-readme", action="store_true", help="rewrite the table in README.md")
    args = ap.parse_args()
    clip = Path(args.sequences) / "BasketballPass_416x240_50.yuv"
    if not clip.is_file():
        print(f"{clip} not found", file=sys.stderr)
        return 1
    rows, reports = [], []
    for mode, qp, gop in RUNS:
        t = time.perf_counter()
        rep = encode(str(clip), None, EncoderConfig(coding=CodingConfig(mode, qp, frames=args.frames), ld_gop=gop)).data
        reports.append(rep)
        g = rep["psnr_gain"]
        per_seg = " ".join(f"{s['side_bytes']}" for s in rep["segments"])
        rows.append(f"| {mode} | {qp} | {gop if mode != 'ra' else 32} | {rep['kbps_before']:.1f} | "
                    f"{rep['kbps_after']:.1f} | {rep['psnr_before']['y']:.3f} | {g['y']:+.3f} | {g['u']:+.3f} | "
                    f"{g['v']:+.3f} | {rep['side_bytes']} ({per_seg}) | {time.perf_counter() - t:.0f} |")
        print(rows[-1], flush=True)
    table = "\n".join([
        "| mode | QP | segment | kbps HEVC | kbps + side | Y PSNR | ΔY dB | ΔU dB | ΔV dB | side bytes (per segment) | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|", *rows])
    print("\n" + table)
    toolmain.write_json(args.out, reports, indent=1)
    if args.update_readme:
        readme = REPO / "README.md"
        text = readme.read_text(encoding="utf-8")
        begin, end = "<!-- figures:begin -->", "<!-- figures:end -->"
        if begin not in text or end not in text:
            print(f"{readme}: markers {begin} / {end} not found", file=sys.stderr)
            return 1
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        with toolmain.atomic_output(readme) as f:
            f.write(f"{head}{begin}\n{table}\n{end}{tail}".encode("utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(toolmain.run(main))
