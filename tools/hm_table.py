#!/usr/bin/env python3
"""Print the "HM SUMMARY vs our figures" table of docs/hm.md from a finished `hevc-nlf eval --codec hm`
results directory (one row per job: HM's SUMMARY rate and PSNR, ours from the files, the filter's
gains, side bytes, the rate including the side stream, and times).

    python tools/hm_table.py RESULTS_DIR [--sequence NAME]

Also prints the largest |ours - HM| differences over all jobs (rate in kbps, PSNR in dB).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import toolmain

MODES = {"ra": 0, "ldb": 1, "ldp": 2}


def _fmt3(d: dict, prefix: str = "psnr_", nd: int = 4) -> str:
    return " / ".join(f"{d[f'{prefix}{p}']:.{nd}f}" for p in "yuv")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="results directory of `hevc-nlf eval --codec hm`")
    ap.add_argument("--sequence", help="only this sequence")
    args = ap.parse_args()
    files = sorted((Path(args.results) / "jobs").glob("*.json"))
    jobs = [j for j in (json.loads(f.read_text()) for f in files if not f.name.endswith(".error.json"))
            if j.get("codec") == "hm" and (args.sequence is None or j["sequence"] == args.sequence)]
    if not jobs:
        print(f"{args.results}: no finished HM jobs", file=sys.stderr)
        return 1
    jobs.sort(key=lambda j: (j["sequence"], MODES.get(j["mode"], 9), j["qp"]))
    print("| sequence | mode | QP | HM SUMMARY kbps | HM PSNR Y / U / V | our kbps (file) | our PSNR Y / U / V "
          "(before) | after filter Y / U / V | gain Y / U / V (dB) | side bytes | kbps incl. side | "
          "encode s (HM s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    worst = {"kbps": 0.0, "psnr": 0.0, "per_picture": 0.0}
    for j in jobs:
        bs = j.get("backend_summary") or {}
        hm, ours, diff = bs.get("hm_summary", {}).get("all"), bs.get("ours"), bs.get("ours_minus_hm") or {}
        if hm is None or ours is None:
            print(f"{j['job_id']}: no HM summary in the job result (run with this version of hevc-nlf)",
                  file=sys.stderr)
            return 1
        gain = {p: j["psnr_after"][p] - j["psnr_before"][p] for p in "yuv"}
        print(f"| {j['sequence']} | {j['mode']} | {j['qp']} | {hm['kbps']:.4f} | {_fmt3(hm)} | {ours['kbps']:.4f} | "
              f"{_fmt3(j['psnr_before'], '')} | {_fmt3(j['psnr_after'], '')} | "
              f"{' / '.join(f'{gain[p]:+.3f}' for p in 'yuv')} | {j['side_bytes']} | {j['kbps_after']:.2f} | "
              f"{j['encode_seconds']:.0f} ({bs.get('hm_seconds', 0):.0f}) |")
        worst["kbps"] = max(worst["kbps"], abs(diff.get("kbps") or 0.0))
        worst["psnr"] = max([worst["psnr"]] + [abs(diff.get(f"psnr_{p}") or 0.0) for p in "yuv"])
        worst["per_picture"] = max(worst["per_picture"], diff.get("per_picture_psnr_max_abs") or 0.0)
    checks = {str((j.get("backend_summary") or {}).get("decoder_check", {}).get("result")) for j in jobs}
    print(f"\n{len(jobs)} jobs; largest |ours - HM|: rate {worst['kbps']:.4f} kbps, sequence PSNR "
          f"{worst['psnr']:.4f} dB, per-picture PSNR {worst['per_picture']:.5f} dB; decoder checks: "
          f"{', '.join(sorted(checks))}")
    return 0


if __name__ == "__main__":
    sys.exit(toolmain.run(main))
