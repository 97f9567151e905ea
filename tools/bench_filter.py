#!/usr/bin/env python3
"""Benchmark of the filter kernels (a script, not a test): ms per frame (Y+UV), GMAC/s, and ratios
measured in the same run against PyTorch eager and the numpy reference; plus the decode time of the
same 1080p frame with PyAV, the target the CPU kernel should not exceed.

Per resolution the paper's default 5-layer, 12-filter networks with its packings are filtered:
luma 1x1 below 1080p, 1x2 at 1080p, 2x2 at >= 2560x1600; chroma 1x1 (4:2:0). Content is a random
frame of the matching clip under /work/shared/sequences (or --sequences) when there is one, else
random samples; the networks are reference.random_network, not trained filters: by default
(--networks signalled) with the ranges the encoder signals with its default QuantConfig (6-bit
weights, 4-bit scale significands), with --networks wide the wider ranges of the unit tests
(±127 weights, 8-bit multipliers). The CPU kernel picks its requantisation per layer from these
ranges (see requant_forms in the output); the work per pixel is otherwise the same.

* kernel: hevc_ext.kernels (cpu; also cuda when a device is present). Times include packing, all
  layers, unpacking, the residual add and clipping, and (cuda) the host<->device copies.
* torch: an equivalent nn.Module (pw/dw Conv2d + ReLU, float32, channels_last, torch.no_grad,
  torch.set_num_threads = --threads) on pre-packed inputs: the network alone, nothing else.
* reference: reference.filter_planes, only up to --reference-max-pixels (it is slow).
* bitexact: the kernel's output equals the reference's on the real content (at the sizes up to
  --reference-max-pixels and at 1920x1080).
* decode_ms_1080p: PyAV decode time per frame of an HEVC stream of the 1080p clip encoded with
  libx265 at QP 32 (--decode-frames frames; synthetic content if the clip is missing).

Rounds of kernel/torch timing are interleaved and the median is reported, so that a busy machine
affects both sides of a ratio alike. Each round starts after a pause (--settle-ms, default 20 ms):
torch's OpenMP workers keep spinning for a few milliseconds after each parallel region, and a kernel
call started at once shares the cores with them (measured on 2 cores: the 1080p call took 18.0 ms
right after torch, 11.4 ms after a 5 ms pause, 12.8 ms with no torch in the process). ``--json`` prints one JSON object; ``--out FILE`` writes it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

import toolmain  # noqa: E402  (the repository first on sys.path)

from hevc_ext import kernels, machine, reference  # noqa: E402
from hevc_ext.arch import Architecture, Group  # noqa: E402
from hevc_ext.pipeline import default_packing  # noqa: E402
from hevc_ext.quant import QuantConfig  # noqa: E402

CPU_SIZES = ((416, 240), (832, 480), (1280, 720), (1920, 1080), (2560, 1600))
GPU_SIZES = CPU_SIZES + ((3840, 2160),)
CLIPS = {  # resolution -> clip (cropped when larger)
    (416, 240): "BasketballPass_416x240_50.yuv",
    (832, 480): "Railway_852x480_30.yuv",
    (1280, 720): "TwoPeopleDesk_1280x720_30.yuv",
    (1920, 1080): "StreetTree_1920x1080_25.yuv",
    (2560, 1600): "CrowdRunCrop_2560x1600_50.yuv",
}


NETWORK_RANGES = {  # random_network keyword arguments per --networks choice
    # the default QuantConfig: its largest weight; multipliers of S significand bits after layer 1
    "signalled": {"weight_max": QuantConfig().wmax, "mult_bits": QuantConfig().scale_bits},
    "wide": {"weight_max": 127, "mult_bits": 8},
}


@dataclass
class Frame:
    y: np.ndarray
    u: np.ndarray
    v: np.ndarray
    source: str


def load_frame(seqdir: Path, width: int, height: int, rng: np.random.Generator) -> Frame:
    name = CLIPS.get((width, height))
    path = seqdir / name if name else None
    if path is not None and path.is_file():
        cw, ch = (int(t) for t in path.stem.split("_")[1].split("x"))
        fsize = cw * ch * 3 // 2
        frames = path.stat().st_size // fsize
        k = int(rng.integers(0, frames))
        raw = np.fromfile(path, dtype=np.uint8, count=fsize, offset=k * fsize)
        y = raw[: cw * ch].reshape(ch, cw)[:height, :width]
        u = raw[cw * ch: cw * ch * 5 // 4].reshape(ch // 2, cw // 2)[: height // 2, : width // 2]
        v = raw[cw * ch * 5 // 4:].reshape(ch // 2, cw // 2)[: height // 2, : width // 2]
        return Frame(np.ascontiguousarray(y), np.ascontiguousarray(u), np.ascontiguousarray(v), f"{name}#{k}")
    y = rng.integers(0, 256, (height, width), dtype=np.uint8)
    u = rng.integers(0, 256, (height // 2, width // 2), dtype=np.uint8)
    v = rng.integers(0, 256, (height // 2, width // 2), dtype=np.uint8)
    return Frame(y, u, v, "random")


def torch_module(net: reference.IntNetwork):  # type: ignore[no-untyped-def]
    import torch.nn as nn

    mods: list[nn.Module] = []
    for layer in net.layers:
        if layer.kind == "pw":
            mods.append(nn.Conv2d(layer.cin, layer.cout, 1, bias=True))
        else:
            mods.append(nn.Conv2d(layer.cin, layer.cout, 3, padding=1, groups=layer.cin, bias=True))
        if layer.relu:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods).eval()


def mean_ms(fn: Callable[[], Any], calls: int) -> float:
    """Mean wall time of ``calls`` back-to-back calls, in ms (each call returns only when its work is done)."""
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) * 1e3 / calls


def decode_ms_1080p(seqdir: Path, frames: int, threads: int) -> tuple[float, float, str]:
    import av

    w, h = 1920, 1080
    path = seqdir / CLIPS[(w, h)]
    rng = np.random.default_rng(1)
    if path.is_file():
        raw = np.fromfile(path, dtype=np.uint8)
        n = min(frames, raw.size // (w * h * 3 // 2))
        content = f"{path.name}, {n} frames"
    else:
        n = frames
        raw = rng.integers(0, 256, n * w * h * 3 // 2, dtype=np.uint8)
        content = f"random, {n} frames"
    buf = io.BytesIO()
    out = av.open(buf, "w", format="hevc")
    st = out.add_stream("libx265", rate=25)
    st.width, st.height, st.pix_fmt = w, h, "yuv420p"
    st.options = {"x265-params": "qp=32:log-level=error"}
    fs = w * h * 3 // 2
    for i in range(n):
        f = raw[i * fs:(i + 1) * fs]
        fr = av.VideoFrame(w, h, "yuv420p")
        fr.planes[0].update(f[: w * h])
        fr.planes[1].update(f[w * h: w * h * 5 // 4])
        fr.planes[2].update(f[w * h * 5 // 4:])
        for p in st.encode(fr):
            out.mux(p)
    for p in st.encode():
        out.mux(p)
    out.close()
    data = buf.getvalue()
    per_frame = []
    for _ in range(5):
        c = av.open(io.BytesIO(data), format="hevc")
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        s.thread_count = threads
        t0 = time.perf_counter()
        k = sum(1 for _ in c.decode(video=0))
        per_frame.append((time.perf_counter() - t0) * 1e3 / max(k, 1))
        c.close()
    return statistics.median(per_frame), min(per_frame), f"libx265 QP 32, {content}, {len(data)} bytes, av {av.__version__}"


def bench_size(width: int, height: int, kern: kernels.Kernel, args: argparse.Namespace, seqdir: Path,
               rng: np.random.Generator, torch_ok: bool) -> dict[str, Any]:
    arch = Architecture()
    pk_y, pk_uv = default_packing(width, height, Group.Y), default_packing(width, height, Group.UV)
    ranges = NETWORK_RANGES[args.networks]
    net_y = reference.random_network(rng, Group.Y, pk_y, arch, **ranges)
    net_uv = reference.random_network(rng, Group.UV, pk_uv, arch, **ranges)
    frame = load_frame(seqdir, width, height, rng)
    macs = width * height * (arch.mac_per_pixel(Group.Y, pk_y) + arch.mac_per_pixel(Group.UV, pk_uv))

    def run_kernel() -> list[np.ndarray]:
        return kern.filter_planes([frame.y], net_y, 8) + kern.filter_planes([frame.u, frame.v], net_uv, 8)

    run_kernel()  # warm up (thread start, page faults)
    rounds = max(3, args.repeat)
    kernel_times: list[float] = []
    torch_times: list[float] = []
    if torch_ok:
        import torch

        # cuDNN eager when measuring the CUDA kernel on a CUDA build of torch, else CPU eager
        dev = "cuda" if kern.name == "cuda" and torch.cuda.is_available() else "cpu"
        if dev == "cuda":
            torch.backends.cudnn.benchmark = True
        ty = torch_module(net_y).to(dev, memory_format=torch.channels_last)
        tuv = torch_module(net_uv).to(dev, memory_format=torch.channels_last)
        xy = torch.from_numpy(reference.pad_and_pack([frame.y], pk_y).astype(np.float32))[None]
        xuv = torch.from_numpy(reference.pad_and_pack([frame.u, frame.v], pk_uv).astype(np.float32))[None]
        xy = xy.to(dev).contiguous(memory_format=torch.channels_last)
        xuv = xuv.to(dev).contiguous(memory_format=torch.channels_last)

        def run_torch() -> None:
            with torch.no_grad():
                ty(xy)
                tuv(xuv)
            if dev == "cuda":
                torch.cuda.synchronize()

        run_torch()
        row_torch_device = dev
    # CUDA: also the kernel on planes already in GPU memory (no PCIe copies), like torch's input
    run_device: Callable[[], None] | None = None
    want = None
    if kern.name == "cuda" and torch_ok and row_torch_device == "cuda":
        dev_in = [torch.from_numpy(p).to("cuda") for p in (frame.y, frame.u, frame.v)]
        dev_out = [torch.empty_like(p) for p in dev_in]

        def filter_on_device() -> None:  # queued on the current stream; done at the synchronisation, like run_torch
            kern.filter_device(dev_in[:1], dev_out[:1], net_y, 8)  # type: ignore[attr-defined]
            kern.filter_device(dev_in[1:], dev_out[1:], net_uv, 8)  # type: ignore[attr-defined]
            torch.cuda.synchronize()

        run_device = filter_on_device
        run_device()
        want = reference.filter_planes([frame.y], net_y, 8) + reference.filter_planes([frame.u, frame.v], net_uv, 8) \
            if width * height <= 1920 * 1080 else None
    inner = args.inner if kern.name == "cuda" else 1  # calls per round on the GPU (short calls)
    device_times: list[float] = []
    def settle() -> None:  # let the other contender's idle threads stop spinning (see the module text)
        time.sleep(args.settle_ms / 1e3)

    for _ in range(rounds):  # interleaved rounds
        settle()
        kernel_times.append(mean_ms(run_kernel, inner))
        if torch_ok:
            settle()
            torch_times.append(mean_ms(run_torch, inner))
        if run_device is not None:
            settle()
            device_times.append(mean_ms(run_device, inner))
    kernel_ms = statistics.median(kernel_times)
    best_ms = min(kernel_times)
    row: dict[str, Any] = {
        "size": f"{width}x{height}", "content": frame.source, "packing_y": str(pk_y), "packing_uv": str(pk_uv),
        "mac_per_frame": int(macs), "kernel_ms": round(kernel_ms, 3), "kernel_ms_best": round(best_ms, 3),
        "gmacs": round(macs / kernel_ms / 1e6, 2), "fps": round(1e3 / kernel_ms, 1),
    }
    if isinstance(kern, kernels.CpuKernel):
        row["requant_forms"] = {"y": kern.requant_forms(net_y, 8), "uv": kern.requant_forms(net_uv, 8)}
    if torch_ok:
        row["torch_ms"] = round(statistics.median(torch_times), 2)
        row["torch_ms_best"] = round(min(torch_times), 2)
        row["torch_device"] = row_torch_device
        row["speedup_vs_torch"] = round(row["torch_ms"] / kernel_ms, 2)
    if device_times:
        dms = statistics.median(device_times)
        row["kernel_device_ms"] = round(dms, 4)
        row["kernel_device_ms_best"] = round(min(device_times), 4)
        row["fps_device"] = round(1e3 / dms, 1)
        row["gmacs_device"] = round(macs / dms / 1e6, 1)
        if torch_ok:
            row["speedup_vs_torch_device"] = round(row["torch_ms"] / dms, 2)
        if want is not None:
            row["bitexact_device"] = all(np.array_equal(o.cpu().numpy(), w) for o, w in zip(dev_out, want))
    if width * height <= args.reference_max_pixels or (width, height) == (1920, 1080):
        t0 = time.perf_counter()
        want = reference.filter_planes([frame.y], net_y, 8) + reference.filter_planes([frame.u, frame.v], net_uv, 8)
        ref_ms = (time.perf_counter() - t0) * 1e3
        got = run_kernel()
        row["bitexact"] = all(np.array_equal(a, b) for a, b in zip(got, want))
        if width * height <= args.reference_max_pixels:
            row["reference_ms"] = round(ref_ms, 1)
            row["speedup_vs_reference"] = round(ref_ms / kernel_ms, 1)
    return row


def print_table(res: dict[str, Any]) -> None:
    print(f"# {res['kernel']} kernel ({res.get('isa', '')}), {res['threads']} threads, {res['networks']} networks, "
          f"{res['machine']}; "
          f"load average {res['loadavg_before'][0]} before, {res['loadavg_after'][0]} after")
    head = f"{'size':>10} {'Y/UV pack':>9} {'ms/frame':>9} {'(best)':>7} {'fps':>7} {'GMAC/s':>7} {'torch ms':>9} " \
           f"{'(best)':>7} {'x torch':>8} {'ref ms':>8} {'x ref':>7} {'bitexact':>8}"
    print(head)
    for r in res["rows"]:
        print(f"{r['size']:>10} {r['packing_y'] + '/' + r['packing_uv']:>9} {r['kernel_ms']:>9.2f} {r['kernel_ms_best']:>7.2f} "
              f"{r['fps']:>7.1f} {r['gmacs']:>7.1f} {r.get('torch_ms', float('nan')):>9.1f} "
              f"{r.get('torch_ms_best', float('nan')):>7.1f} {r.get('speedup_vs_torch', float('nan')):>8.1f} "
              f"{r.get('reference_ms', float('nan')):>8.0f} {r.get('speedup_vs_reference', float('nan')):>7.0f} "
              f"{str(r.get('bitexact', '-')):>8}")
    dev_rows = [r for r in res["rows"] if "kernel_device_ms" in r]
    if dev_rows:
        print(f"# planes already in GPU memory ({res.get('gpu')}): no host<->device copies")
        print(f"{'size':>10} {'ms/frame':>9} {'(best)':>8} {'fps':>9} {'GMAC/s':>8} {'x torch':>8} {'bitexact':>8}")
        for r in dev_rows:
            print(f"{r['size']:>10} {r['kernel_device_ms']:>9.3f} {r['kernel_device_ms_best']:>8.3f} {r['fps_device']:>9.1f} "
                  f"{r['gmacs_device']:>8.1f} {r.get('speedup_vs_torch_device', float('nan')):>8.2f} "
                  f"{str(r.get('bitexact_device', '-')):>8}")
    if res.get("decode_ms_1080p") is not None:
        line = (f"decode (PyAV) 1080p: {res['decode_ms_1080p']:.2f} ms/frame (best {res['decode_ms_1080p_best']:.2f}; "
                f"{res['decode_detail']})")
        if res.get("filter_ms_1080p") is not None:
            line += (f"\nfilter 1080p Y+UV: {res['filter_ms_1080p']:.2f} ms/frame (best {res['filter_ms_1080p_best']:.2f})"
                     f" -> filter/decode = {res['filter_ms_1080p'] / res['decode_ms_1080p']:.2f} (medians), "
                     f"{res['filter_ms_1080p_best'] / res['decode_ms_1080p_best']:.2f} (best rounds)")
        print(line)
    print("medians of interleaved rounds (best round in parentheses); reference: numpy definition, timed only "
          "up to the size limit (slow); torch: the network alone on pre-packed float32 input")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--kernel", default="auto", choices=("auto", "cpu", "cuda"), help="kernel to measure")
    ap.add_argument("--threads", type=toolmain.positive_int, default=os.cpu_count() or 1, help="CPU threads (kernel, torch, decoder)")
    ap.add_argument("--sizes", type=toolmain.frame_sizes, default=None, help="comma-separated WxH list (default: the standard set)")
    ap.add_argument("--repeat", type=toolmain.positive_int, default=7, help="timing rounds per size (median)")
    ap.add_argument("--inner", type=toolmain.positive_int, default=20, help="CUDA: calls per timing round (their mean)")
    ap.add_argument("--settle-ms", type=float, default=20.0,
                    help="pause before each timed round, so that no contender's spinning threads remain")
    ap.add_argument("--reference-max-pixels", type=int, default=832 * 480,
                    help="time the numpy reference only up to this many luma samples")
    ap.add_argument("--decode-frames", type=toolmain.positive_int, default=8, help="frames encoded for the decode timing")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    ap.add_argument("--no-decode", action="store_true", help="skip the PyAV decode timing")
    ap.add_argument("--sequences", type=Path, default=Path("/work/shared/sequences"), help="clips directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--networks", choices=tuple(NETWORK_RANGES), default="signalled",
                    help="parameter ranges of the random networks: those the encoder signals by default, or "
                         "the wider ones of the unit tests")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON results to this file")
    args = ap.parse_args(argv)

    name = args.kernel
    if name == "auto":
        name = "cuda" if kernels.cuda_driver_device_count() > 0 else "cpu"
    kern = kernels.get_kernel(name, threads=args.threads)
    torch_ok = not args.no_torch
    if torch_ok:
        try:
            import torch

            torch.set_num_threads(args.threads)
        except ImportError:
            torch_ok = False
    sizes = args.sizes or (GPU_SIZES if name == "cuda" else CPU_SIZES)
    rng = np.random.default_rng(args.seed)
    res: dict[str, Any] = {
        "kernel": kern.name, "isa": getattr(kern, "isa_name", None), "threads": args.threads,
        "networks": args.networks, "settle_ms": args.settle_ms,
        "machine": machine.summary(),
        "torch": __import__("torch").__version__ if torch_ok else None, "rows": [],
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
    }
    for w, h in sizes:
        res["rows"].append(bench_size(w, h, kern, args, args.sequences, rng, torch_ok))
    if not args.no_decode:
        res["decode_ms_1080p"], res["decode_ms_1080p_best"], res["decode_detail"] = decode_ms_1080p(
            args.sequences, args.decode_frames, args.threads)
    else:
        res["decode_ms_1080p"] = None
    hd = next((r for r in res["rows"] if r["size"] == "1920x1080"), None)
    res["filter_ms_1080p"] = hd["kernel_ms"] if hd else None
    res["filter_ms_1080p_best"] = hd["kernel_ms_best"] if hd else None
    res["gmacs_1080p"] = hd["gmacs"] if hd else None
    res["speedup_vs_torch_1080p"] = hd.get("speedup_vs_torch") if hd else None
    res["bitexact"] = all(r[k] for r in res["rows"] for k in ("bitexact", "bitexact_device") if k in r)
    uhd = next((r for r in res["rows"] if r["size"] == "3840x2160"), None)
    if kern.name == "cuda":
        res["speedup_vs_torch_device_1080p"] = hd.get("speedup_vs_torch_device") if hd else None
        res["fps_2160p_device"] = uhd.get("fps_device") if uhd else None
        res["fps_2160p_host"] = uhd.get("fps") if uhd else None
        res["speedup_vs_torch_device_2160p"] = uhd.get("speedup_vs_torch_device") if uhd else None
        res["gpu"] = __import__("torch").cuda.get_device_name(0) if torch_ok else None
    res["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    if args.out:
        toolmain.write_json(args.out, res)
    if args.json:
        print(json.dumps(res))
    else:
        print_table(res)
    return 0


if __name__ == "__main__":
    sys.exit(toolmain.run(main))
