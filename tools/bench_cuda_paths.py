"""Compare the CUDA fast kernel with the generic one on planes in GPU memory (needs a CUDA device and
PyTorch with CUDA).

Same library, same process, interleaved rounds: ``HEVC_NLF_CUDA_GENERIC=1`` in the environment selects
the generic kernel for the calls made while it is set. Per size: the time of one frame, Y then UV,
until both are written (Python, plan, launch and one synchronisation per frame), the time per frame
when ``--inner`` frames are queued back to back with one synchronisation at the end (the throughput of a
GPU pipeline: the fast kernel's calls return once queued), the kernels' own device time (PyTorch profiler),
their ratio generic / fast, and whether the two kernels wrote the same pictures. Networks are random
ones in the ranges the encoder signals (the fast kernel's domain); content is random.

    python3 tools/bench_cuda_paths.py --out cuda_paths.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

import toolmain  # noqa: E402  (the repository first on sys.path)

from hevc_ext import kernels, reference  # noqa: E402
from hevc_ext.arch import Architecture, Group, Packing  # noqa: E402
from hevc_ext.quant import QuantConfig  # noqa: E402

SIZES = ((64, 64, Packing(1, 1)), (416, 240, Packing(1, 1)), (1920, 1080, Packing(1, 2)), (3840, 2160, Packing(2, 2)))


def use_generic(on: bool) -> None:
    if on:
        os.environ["HEVC_NLF_CUDA_GENERIC"] = "1"
    else:
        os.environ.pop("HEVC_NLF_CUDA_GENERIC", None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=9, help="interleaved rounds (median)")
    ap.add_argument("--inner", type=int, default=20, help="frames per round")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = ap.parse_args(argv)
    import torch
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        print("no CUDA device for PyTorch", file=sys.stderr)
        return 2
    kern = kernels.get_kernel("cuda")
    rng = np.random.default_rng(1)
    ranges = {"weight_max": QuantConfig().wmax, "mult_bits": QuantConfig().scale_bits}
    rows = []
    for w, h, pk in SIZES:
        ny = reference.random_network(rng, Group.Y, pk, Architecture(), **ranges)
        nuv = reference.random_network(rng, Group.UV, Packing(1, 1), Architecture(), **ranges)
        paths = {kernels.cuda_kernel_path(ny, 8), kernels.cuda_kernel_path(nuv, 8)}
        ins = [torch.randint(0, 256, s, dtype=torch.uint8, device="cuda") for s in ((h, w), (h // 2, w // 2), (h // 2, w // 2))]
        outs = [torch.empty_like(t) for t in ins]

        def queue() -> None:  # one frame, Y then UV, queued on the current stream
            kern.filter_device(ins[:1], outs[:1], ny, 8)  # type: ignore[attr-defined]
            kern.filter_device(ins[1:], outs[1:], nuv, 8)  # type: ignore[attr-defined]

        def frame() -> None:  # one frame until its pictures are written
            queue()
            torch.cuda.synchronize()

        results = []
        for generic in (False, True):
            use_generic(generic)
            for o in outs:
                o.fill_(7)
            frame()
            torch.cuda.synchronize()
            results.append([o.clone() for o in outs])
        same = all(torch.equal(a, b) for a, b in zip(*results))
        def ms_per_frame(fn: Callable[[], None]) -> float:  # ``--inner`` frames, then one synchronisation
            t0 = time.perf_counter()
            for _ in range(args.inner):
                fn()
            torch.cuda.synchronize()
            return (time.perf_counter() - t0) * 1e3 / args.inner

        calls: dict[bool, list[float]] = {False: [], True: []}
        queued: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeat):
            for generic in (False, True):
                use_generic(generic)
                frame()
                calls[generic].append(ms_per_frame(frame))
                queued[generic].append(ms_per_frame(queue))
        device: dict[bool, float] = {}
        for generic in (False, True):
            use_generic(generic)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(args.inner):
                    frame()
                torch.cuda.synchronize()
            us = sum(getattr(e, "device_time_total", 0.0) for e in prof.key_averages() if "nlf_" in e.key)
            device[generic] = us / args.inner / 1e3
        use_generic(False)
        row: dict[str, Any] = {
            "size": f"{w}x{h}", "packing_y": str(pk), "fast_kernel_taken": paths == {"fast"},
            "fast_call_ms": round(statistics.median(calls[False]), 4), "fast_kernels_ms": round(device[False], 4),
            "fast_queued_ms": round(statistics.median(queued[False]), 4),
            "generic_call_ms": round(statistics.median(calls[True]), 4), "generic_kernels_ms": round(device[True], 4),
            "generic_queued_ms": round(statistics.median(queued[True]), 4),
            "same_output": same,
        }
        row["kernels_ratio"] = round(row["generic_kernels_ms"] / max(row["fast_kernels_ms"], 1e-9), 2)
        rows.append(row)
        print(f"{row['size']:>10} fast: call {row['fast_call_ms']:.4f} ms, queued {row['fast_queued_ms']:.4f} ms, "
              f"kernels {row['fast_kernels_ms']:.4f} ms | generic: call {row['generic_call_ms']:.4f} ms, "
              f"queued {row['generic_queued_ms']:.4f} ms, kernels {row['generic_kernels_ms']:.4f} ms | "
              f"kernels generic/fast {row['kernels_ratio']:.2f}x | same output {same}", flush=True)
    res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}
    if args.out:
        toolmain.write_json(args.out, res, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(toolmain.run(main))
