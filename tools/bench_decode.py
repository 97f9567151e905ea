#!/usr/bin/env python3
"""End-to-end decoder benchmark (a script, not a test): what the filter costs a user of
``hevc-nlf decode``.

Encodes a clip once (x265, a short training run, a small RD multiplier so that both channel groups
are filtered), then times ``hevc_ext.pipeline.decode`` in interleaved rounds with the side stream
(decode + filter + hash verification + write) and without it (the plain decode + write), and prints
ms per picture for each and their ratio. It also times the file decoder's old order, with the hash
verification inline instead of in its worker thread.

    python tools/bench_decode.py [--clip PATH] [--frames N] [--rounds R] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import toolmain  # noqa: E402  (the repository first on sys.path)

from hevc_ext import machine, pipeline  # noqa: E402
from hevc_ext.backends import CodingConfig  # noqa: E402
from hevc_ext.train import TrainConfig  # noqa: E402

DEFAULT_CLIP = Path("/work/shared/sequences/StreetTree_1920x1080_25.yuv")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--clip", type=Path, default=DEFAULT_CLIP, help="raw .yuv named Name_WxH_fps.yuv")
    ap.add_argument("--frames", type=int, default=8, help="pictures to encode and decode")
    ap.add_argument("--rounds", type=int, default=12, help="interleaved timing rounds (median)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON results to this file")
    args = ap.parse_args(argv)
    if not args.clip.is_file():
        print(f"bench_decode: {args.clip}: no such clip (--clip)", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        base = Path(tmp) / "s"
        cfg = pipeline.EncoderConfig(coding=CodingConfig("ra", 32, intra_period=args.frames, frames=args.frames),
                                     train=TrainConfig(iterations=60), lambda_scale=1e-3)
        rep = pipeline.encode(str(args.clip), str(base), cfg).data
        hevc, side, out = f"{base}.hevc", f"{base}.nlf", str(Path(tmp) / "o.yuv")
        init = pipeline.FrameFilter.__init__

        def inline_hash(self, *a, **kw):  # type: ignore[no-untyped-def]
            init(self, *a, **kw)
            self._hash_async = False

        def run(mode: str) -> float:
            pipeline.FrameFilter.__init__ = inline_hash if mode == "inline hash" else init  # type: ignore[method-assign]
            t0 = time.perf_counter()
            r = pipeline.decode(hevc, out, None if mode == "plain" else side)
            ms = (time.perf_counter() - t0) * 1e3 / r.frames
            pipeline.FrameFilter.__init__ = init  # type: ignore[method-assign]
            return ms

        modes = ("plain", "filtered", "inline hash")
        for m in modes:
            run(m)  # warm up (kernel load, page cache)
        times: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(args.rounds):
            for m in modes:
                time.sleep(0.02)
                times[m].append(run(m))
    med = {m: statistics.median(v) for m, v in times.items()}
    res = {
        "clip": args.clip.name, "frames": args.frames, "rounds": args.rounds, "cpus": os.cpu_count(),
        "machine": machine.summary(),
        "filtered_groups": {g: d["decision"] for seg in rep["segments"] for g, d in seg["groups"].items()},
        "hash": rep.get("hash"),
        "ms_per_picture": {m: round(v, 2) for m, v in med.items()},
        "ms_per_picture_best": {m: round(min(v), 2) for m, v in times.items()},
        "filtered_over_plain": round(med["filtered"] / med["plain"], 3),
        "inline_over_threaded_hash": round(med["inline hash"] / med["filtered"], 3),
    }
    print(f"{args.clip.name}, {args.frames} pictures, {args.rounds} interleaved rounds, {os.cpu_count()} CPUs; "
          f"filtered groups {res['filtered_groups']}, hash {res['hash']}")
    for m in modes:
        print(f"  {m:12s} {med[m]:7.2f} ms/picture (best {min(times[m]):.2f})")
    print(f"  filtered / plain = {res['filtered_over_plain']:.2f}; hash inline / in its thread = "
          f"{res['inline_over_threaded_hash']:.2f}")
    if args.out:
        toolmain.write_json(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(toolmain.run(main))
