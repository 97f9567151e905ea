#!/usr/bin/env python3
"""Benchmark one training step: PyTorch autograd vs the C++ training engine (hevc_ext.trainkernel).

For each configuration (Y 1x1, Y 2x2, UV 1x1 by default) and thread count, times the forward +
backward of one batch (default 64 patches of 48x48 plus 2 zero lines, as train.py builds them) with
both paths in the same process, alternating them, and reports the minimum and median ms/step and
the speedup (torch min / engine min). The cores may be shared: the minimum is the figure to compare.

    PYTHONPATH=. python tools/bench_train.py [--threads 2 1] [--repeats 15] [--json] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import toolmain  # the repository first on sys.path
from hevc_ext import machine
from hevc_ext.arch import Architecture, Group, Packing
from hevc_ext.model import NlfNet, pack, unpack
from hevc_ext.trainkernel import TrainEngine, available

CONFIGS = {"Y1x1": (Group.Y, Packing(1, 1)), "Y2x2": (Group.Y, Packing(2, 2)), "UV1x1": (Group.UV, Packing(1, 1)),
           "Y1x2": (Group.Y, Packing(1, 2)), "UV2x2": (Group.UV, Packing(2, 2))}


def _batch(group: Group, packing: Packing, batch: int, patch: int, zl: int, rng: np.random.Generator):
    g = group.planes
    zl_h = zl + (-zl) % packing.ph
    zl_w = zl + (-zl) % packing.pw
    x = torch.from_numpy(rng.integers(0, 256, (batch, g, patch, patch)).astype(np.float32)).sub_(128).div_(128)
    x = F.pad(x, (0, zl_w, 0, zl_h))
    target = torch.from_numpy(rng.normal(0, 1, (batch, g, patch, patch)).astype(np.float32))
    return x, target


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def bench_one(name: str, threads: int, args) -> dict:
    group, packing = CONFIGS[name]
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    arch = Architecture(args.layers, args.filters)
    net_t = NlfNet(arch, group, packing)
    net_e = NlfNet(arch, group, packing)
    net_e.load_state_dict(net_t.state_dict())
    net_t.train()
    net_e.train()
    x, target = _batch(group, packing, args.batch, args.patch, args.zero_lines, rng)
    g = group.planes
    p = args.patch
    x_np, t_np = x.numpy(), target.numpy()
    torch.set_num_threads(threads)
    engine = TrainEngine(net_e, threads=threads)

    def torch_step():
        y = unpack(net_t(pack(x, packing)), g, packing)[..., :p, :p]
        loss = F.mse_loss(y, target)
        net_t.zero_grad(set_to_none=True)
        loss.backward()
        return float(loss.detach())

    def engine_step():
        return engine.forward_backward(x_np, t_np)

    lt, le = torch_step(), engine_step()  # warm-up (and one check of agreement)
    tt: list[float] = []
    te: list[float] = []
    for _ in range(args.rounds):  # alternate, so that both see the same machine load
        tt += _time(torch_step, args.repeats)
        te += _time(engine_step, args.repeats)
    engine.close()
    return {
        "config": name, "threads": threads, "batch": args.batch, "patch": p, "zero_lines": args.zero_lines,
        "layers": args.layers, "filters": args.filters, "isa": engine.isa_name,
        "torch_ms_min": min(tt), "torch_ms_median": statistics.median(tt),
        "engine_ms_min": min(te), "engine_ms_median": statistics.median(te),
        "speedup_min": min(tt) / min(te), "speedup_median": statistics.median(tt) / statistics.median(te),
        "loss_torch": lt, "loss_engine": le,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["Y1x1", "Y2x2", "UV1x1"], choices=sorted(CONFIGS))
    ap.add_argument("--threads", nargs="+", type=int, default=[2, 1])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--patch", type=int, default=48)
    ap.add_argument("--zero-lines", type=int, default=2)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--filters", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per round and path")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (torch, engine)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--out", help="also write the JSON results to this file")
    args = ap.parse_args(argv)

    ok, why = available()
    if not ok:
        print(f"C++ training engine unavailable: {why}", file=sys.stderr)
        return 1
    results = [bench_one(name, th, args) for th in args.threads for name in args.configs]
    doc = {"machine": machine.summary(), "torch": torch.__version__, "engine": why,
           "results": results}
    if args.out:
        toolmain.write_json(args.out, doc)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"engine: {why}")
    print(f"{'config':8} {'thr':>3} {'torch ms (min/med)':>20} {'engine ms (min/med)':>20} {'speedup (min/med)':>18}")
    for r in results:
        print(f"{r['config']:8} {r['threads']:3d} {r['torch_ms_min']:9.1f} /{r['torch_ms_median']:8.1f} "
              f"{r['engine_ms_min']:9.2f} /{r['engine_ms_median']:8.2f} {r['speedup_min']:8.1f}x /{r['speedup_median']:6.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(toolmain.run(main))
