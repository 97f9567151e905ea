#!/usr/bin/env python3
"""How much of the filter's gain the side stream costs: from a finished `hevc-nlf eval` results
directory, per sequence and mode, the BD-rate (Y, U, V) of the filter against the backend alone

* with the side stream in the rate (what `hevc-nlf eval` reports), and
* without it (the gain of the filter alone, as if its parameters were free),

the side stream's share of the total rate at each QP, and the luma/chroma PSNR gains. Class means of
both BD-rates are printed last (the mean over the class's sequences, as the paper's tables).

    python tools/side_info.py RESULTS_DIR [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import toolmain  # noqa: E402  (the repository first on sys.path)

from hevc_ext.bdrate import bd_rate  # noqa: E402
from hevc_ext.errors import NlfError  # noqa: E402

PLANES = "yuv"


def _bd(a_rate, a_psnr, t_rate, t_psnr) -> float | None:
    try:
        return bd_rate(a_rate, a_psnr, t_rate, t_psnr)
    except (NlfError, ValueError):
        return None


def _f(v: float | None, fmt: str = "{:+.2f}") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results")
    ap.add_argument("--json", help="also write the figures as JSON")
    args = ap.parse_args()
    files = [f for f in sorted((Path(args.results) / "jobs").glob("*.json")) if not f.name.endswith(".error.json")]
    curves: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for f in files:
        j = json.loads(f.read_text())
        if j.get("status") == "ok":
            curves[(j["class"], j["sequence"], j["mode"])].append(j)
    if not curves:
        print(f"{args.results}: no finished jobs", file=sys.stderr)
        return 1
    rows, by_class = [], defaultdict(lambda: defaultdict(list))
    print("| class | sequence | mode | BD Y / U / V with side (%) | BD Y / U / V without side (%) | "
          "side share of rate per QP (%) | ΔY dB per QP |")
    print("|---|---|---|---|---|---|---|")
    for (cls, seq, mode), jobs in sorted(curves.items()):
        jobs.sort(key=lambda j: j["qp"])
        if len(jobs) < 4:
            continue
        before = [j["kbps_before"] for j in jobs]
        after = [j["kbps_after"] for j in jobs]
        with_side = {p: _bd(before, [j["psnr_before"][p] for j in jobs], after, [j["psnr_after"][p] for j in jobs])
                     for p in PLANES}
        no_side = {p: _bd(before, [j["psnr_before"][p] for j in jobs], before, [j["psnr_after"][p] for j in jobs])
                   for p in PLANES}
        share = [100.0 * j["side_bytes"] / (j["hevc_bytes"] + j["side_bytes"]) for j in jobs]
        dy = [j["psnr_after"]["y"] - j["psnr_before"]["y"] for j in jobs]
        print(f"| {cls} | {seq} | {mode} | {' / '.join(_f(with_side[p]) for p in PLANES)} | "
              f"{' / '.join(_f(no_side[p]) for p in PLANES)} | {' '.join(f'{s:.1f}' for s in share)} | "
              f"{' '.join(f'{d:+.2f}' for d in dy)} |")
        rows.append({"class": cls, "sequence": seq, "mode": mode, "qps": [j["qp"] for j in jobs],
                     "bd_with_side": with_side, "bd_without_side": no_side, "side_share_percent": share,
                     "delta_psnr_y": dy})
        for p in PLANES:
            by_class[(cls, mode)][f"with_{p}"].append(with_side[p])
            by_class[(cls, mode)][f"without_{p}"].append(no_side[p])

    def mean(v: list[float | None]) -> float | None:
        v = [x for x in v if x is not None]
        return sum(v) / len(v) if v else None

    print("\n| class | mode | BD Y / U / V with side (%) | BD Y / U / V without side (%) |")
    print("|---|---|---|---|")
    classes = []
    for (cls, mode), d in sorted(by_class.items()):
        w = {p: mean(d[f"with_{p}"]) for p in PLANES}
        wo = {p: mean(d[f"without_{p}"]) for p in PLANES}
        print(f"| {cls} | {mode} | {' / '.join(_f(w[p]) for p in PLANES)} | {' / '.join(_f(wo[p]) for p in PLANES)} |")
        classes.append({"class": cls, "mode": mode, "bd_with_side": w, "bd_without_side": wo})
    if args.json:
        toolmain.write_json(args.json, {"sequences": rows, "classes": classes}, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(toolmain.run(main))
