"""The fast kernels against the definition (reference.filter_planes), and the loader's behaviour.

Every comparison is exact (np.array_equal on the output samples, same dtype). CUDA cases run only
where the NVIDIA driver reports a device; elsewhere they are skipped (pytest.skip), but the CUDA
kernel's tiling and indexing are still checked on the host when nvcc is present (test marked slow:
the first run builds the CUDA library, later runs find it in the cache).
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import select
import signal
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hevc_ext import kernels, nativebuild, reference
from hevc_ext.arch import ALL_PACKINGS, Architecture, Group, Packing
from hevc_ext.errors import KernelError, NlfError, UsageError
from hevc_ext.quant import QuantConfig
from hevc_ext.reference import IntLayer, IntNetwork

HAVE_CPU = bool(kernels.cpu_isas())
HAVE_GPU = kernels.cuda_driver_device_count() > 0


def test_native_engines_load_where_required() -> None:
    """Without a C++ kernel the CPU tests skip; where the install builds one (CI sets
    HEVC_NLF_REQUIRE_NATIVE=1), a kernel or training engine that fails to build or load must fail the
    run instead of skipping every test that would have checked it."""
    if os.environ.get("HEVC_NLF_REQUIRE_NATIVE") != "1":
        pytest.skip("HEVC_NLF_REQUIRE_NATIVE is not 1")
    from hevc_ext import trainkernel

    assert kernels.get_kernel("cpu").name == "cpu"  # raises KernelError with the reason
    assert HAVE_CPU
    ok, why = trainkernel.available()
    assert ok, why


def _kernel(name: str) -> kernels.Kernel:
    if name == "cuda" and not HAVE_GPU:
        pytest.skip("no CUDA device")
    if name == "cpu" and not HAVE_CPU:
        pytest.skip("C++ kernel not built")
    return kernels.get_kernel(name, threads=2)


@pytest.fixture(params=["cpu", "cuda"])
def kernel(request: pytest.FixtureRequest) -> kernels.Kernel:
    return _kernel(request.param)


def _planes(rng: np.random.Generator, group: Group, shape: tuple[int, int], bitdepth: int,
            dtype: type | None = None) -> list[np.ndarray]:
    dt = dtype or (np.uint8 if bitdepth == 8 else np.uint16)
    return [rng.integers(0, 1 << bitdepth, size=shape).astype(dt) for _ in range(group.planes)]


def _assert_same(kern: kernels.Kernel, planes: list[np.ndarray], net: IntNetwork, bitdepth: int) -> None:
    want = reference.filter_planes(planes, net, bitdepth)
    got = kern.filter_planes(planes, net, bitdepth)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        if not np.array_equal(g, w):
            bad = np.argwhere(g != w)
            y, x = bad[0]
            raise AssertionError(f"{len(bad)} samples differ, first at {(y, x)}: {g[y, x]} != {w[y, x]}")


# ---------------------------------------------------------------------------------- networks
def _extreme_network(rng: np.random.Generator, group: Group, packing: Packing, arch: Architecture,
                     mode: str) -> IntNetwork:
    """Valid networks that live at the edges: saturating clamps, shifts > 32 (the general 64-bit path),
    shift 0, zero multipliers, full-range weights. Always passes validate()."""
    layers = []
    for i, s in enumerate(arch.shapes(group, packing)):
        taps = s.cin if s.kind == "pw" else 9
        amax = 1 << 15 if i == 0 else reference.ACT_MAX
        if mode == "wide":  # weights as large as the 32-bit accumulator bound allows
            wmax = min(reference.MAX_ABS_WEIGHT, ((1 << 31) - 1) // (amax * taps))
        else:
            wmax = 127
        w = rng.choice([-wmax, wmax, 0, 1, -1], size=s.weight_shape).astype(np.int32)
        acc_max = int(np.abs(w.astype(np.int64)).reshape(s.cout, -1).sum(axis=1).max()) * amax
        cout = s.cout
        if mode == "saturate":  # gain ~2^-5 on accumulators ~2^23: both clamps, varying with the input
            shift = rng.integers(14, 33, size=cout)
            mult = (np.int64(1) << (shift - 5)) + rng.integers(0, 1 << 8, size=cout)
            bias = rng.integers(-(1 << 13), 1 << 13, size=cout) << shift
        elif mode == "general":  # shifts above 32 never take the high-dword form
            shift = rng.integers(33, reference.MAX_SHIFT + 1, size=cout)
            mult = rng.integers(1 << 24, reference.MAX_MULT, size=cout, endpoint=True)
            bias = rng.integers(-reference.MAX_ABS_BIAS, reference.MAX_ABS_BIAS, size=cout, endpoint=True)
        elif mode == "shift0":
            shift = np.zeros(cout, np.int64)
            mult = rng.integers(0, 4, size=cout)
            bias = rng.integers(-40000, 40000, size=cout)
        else:  # "wide" and "mixed": per channel any of the above, and some zero multipliers
            shift = rng.integers(0, reference.MAX_SHIFT + 1, size=cout)
            mult = rng.integers(0, reference.MAX_MULT, size=cout, endpoint=True)
            mult[rng.random(cout) < 0.2] = 0
            bias = rng.integers(-(1 << 40), 1 << 40, size=cout)
        mult = mult.astype(np.int64)
        bias = bias.astype(np.int64)
        # keep t = acc*mult + bias below 2^62 (validate's bound)
        limit = ((1 << 62) - 1 - int(np.abs(bias).max())) // max(acc_max, 1)
        mult = np.minimum(mult, limit).astype(np.int64)
        layers.append(IntLayer(s.kind, w, mult, bias, shift.astype(np.int64), s.relu))
    net = IntNetwork(group, packing, tuple(layers))
    net.validate()
    return net


def _custom_network(rng: np.random.Generator, group: Group, packing: Packing) -> IntNetwork:
    """Not an Architecture: depth-wise first, two point-wise layers in a row, odd channel counts."""
    c0 = group.planes * packing.size
    spec = [("dw", c0, c0), ("pw", c0, 7), ("pw", 7, 5), ("dw", 5, 5), ("dw", 5, 5), ("pw", 5, c0)]
    layers = []
    for i, (kind, cin, cout) in enumerate(spec):
        shape = (cout, cin) if kind == "pw" else (cout, 3, 3)
        last = i == len(spec) - 1
        w = rng.integers(-127, 128, size=shape).astype(np.int32)
        mult = rng.integers(1 << 6, 1 << 8, size=cout).astype(np.int64)
        shift = np.full(cout, 14 if not last else 20, np.int64)
        bias = rng.integers(-(1 << 20), 1 << 20, size=cout).astype(np.int64)
        layers.append(IntLayer(kind, w, mult, bias, shift, not last))
    net = IntNetwork(group, packing, tuple(layers))
    net.validate()
    return net


SIZES = [(1, 1), (1, 7), (2, 2), (3, 5), (5, 3), (16, 16), (17, 33), (23, 140)]
# random_network ranges of what the encoder signals with its default QuantConfig
SIGNALLED = {"weight_max": QuantConfig().wmax, "mult_bits": QuantConfig().scale_bits}


# ------------------------------------------------------------------------------- bit-exactness
@pytest.mark.parametrize("group", [Group.Y, Group.UV], ids=lambda g: g.name)
@pytest.mark.parametrize("packing", ALL_PACKINGS, ids=str)
@pytest.mark.parametrize("bitdepth", [8, 10])
def test_random_networks_all_packings(kernel: kernels.Kernel, group: Group, packing: Packing, bitdepth: int) -> None:
    for seed in range(3):
        rng = np.random.default_rng(1000 * seed + 7)
        net = reference.random_network(rng, group, packing)
        for shape in SIZES:
            _assert_same(kernel, _planes(rng, group, shape, bitdepth), net, bitdepth)


@pytest.mark.parametrize("arch", [Architecture(3, 12), Architecture(7, 12), Architecture(5, 6), Architecture(5, 16),
                                  Architecture(3, 1), Architecture(9, 32)], ids=lambda a: f"{a.layers}x{a.filters}")
@pytest.mark.parametrize("group", [Group.Y, Group.UV], ids=lambda g: g.name)
def test_non_default_architectures(kernel: kernels.Kernel, arch: Architecture, group: Group) -> None:
    rng = np.random.default_rng(arch.layers * 100 + arch.filters)
    for packing in ALL_PACKINGS:
        net = reference.random_network(rng, group, packing, arch)
        for shape, bd in (((19, 37), 8), ((6, 9), 10)):
            _assert_same(kernel, _planes(rng, group, shape, bd), net, bd)


@pytest.mark.parametrize("mode", ["saturate", "general", "shift0", "wide", "mixed"])
@pytest.mark.parametrize("group", [Group.Y, Group.UV], ids=lambda g: g.name)
def test_extreme_networks(kernel: kernels.Kernel, mode: str, group: Group) -> None:
    rng = np.random.default_rng(["saturate", "general", "shift0", "wide", "mixed"].index(mode))
    for packing, arch in ((Packing(1, 1), Architecture()), (Packing(2, 2), Architecture(3, 12)),
                          (Packing(1, 2), Architecture(5, 16))):
        net = _extreme_network(rng, group, packing, arch, mode)
        for bd, shape in ((8, (21, 34)), (10, (9, 17)), (16, (12, 20))):
            planes = _planes(rng, group, shape, bd)
            planes[0][0, :] = (1 << bd) - 1  # extreme samples
            planes[-1][-1, :] = 0
            _assert_same(kernel, planes, net, bd)


def _fold_network(rng: np.random.Generator, group: Group, packing: Packing, arch: Architecture,
                  edge: bool) -> IntNetwork:
    """Networks whose every layer takes the folded requantisation (multiplier folded into int16
    weights, 32-bit accumulation): the ranges the encoder signals, or (edge) the limits of that form:
    w·mult near ±32767 and accumulator bounds near 2^30, shifts 0 and 32..52 (arithmetic shift
    by more than 31 is the sign), biases that saturate both clamps."""
    if not edge:
        return reference.random_network(rng, group, packing, arch, **SIGNALLED)
    layers = []
    for i, s in enumerate(arch.shapes(group, packing)):
        taps = s.cin if s.kind == "pw" else 9
        amax = 1 << 15 if i == 0 else reference.ACT_MAX
        cout = s.cout
        mult = rng.integers(1, 64, size=cout).astype(np.int64)
        mult[rng.random(cout) < 0.15] = 0
        # |w·mult| <= 32767 and sum |w|·mult·amax < 2^31 (with room for the bias below)
        wmax = np.minimum(32767 // np.maximum(mult, 1), ((1 << 30) // amax) // (taps * np.maximum(mult, 1)))
        wmax = np.maximum(wmax, 1)
        w = np.stack([rng.choice([-int(m), int(m), 0, 1, -1], size=s.weight_shape[1:]) for m in wmax])
        w = w.astype(np.int32)
        shift = rng.choice([0, 1, 7, 15, 31, 32, 40, 52], size=cout).astype(np.int64)  # 52: |bias| <= 2^52
        bias = rng.integers(-(1 << 29), 1 << 29, size=cout).astype(np.int64)
        layers.append(IntLayer(s.kind, w, mult, bias - ((np.int64(1) << shift) >> 1), shift, s.relu))
    net = IntNetwork(group, packing, tuple(layers))
    net.validate()
    return net


@pytest.mark.parametrize("edge", [False, True], ids=["signalled-ranges", "edge"])
@pytest.mark.parametrize("group", [Group.Y, Group.UV], ids=lambda g: g.name)
def test_folded_requantisation(kernel: kernels.Kernel, group: Group, edge: bool) -> None:
    """The cheapest requantisation form: taken for every layer (checked through the plan) and exact."""
    rng = np.random.default_rng(77 + edge)
    for packing, arch in ((Packing(1, 1), Architecture()), (Packing(1, 2), Architecture()),
                          (Packing(2, 2), Architecture(3, 12)), (Packing(2, 1), Architecture(7, 9))):
        net = _fold_network(rng, group, packing, arch, edge)
        if isinstance(kernel, kernels.CpuKernel):
            assert kernel.requant_forms(net, 10) == ["fold"] * len(net.layers)
        for bd, shape in ((8, (23, 70)), (10, (9, 17)), (16, (12, 20))):
            planes = _planes(rng, group, shape, bd)
            planes[0][0, :] = (1 << bd) - 1
            planes[-1][-1, :] = 0
            _assert_same(kernel, planes, net, bd)


def test_requant_forms_follow_the_bounds() -> None:
    """The plan picks the cheapest exact form per layer: fold for the signalled ranges, the high-dword
    form when folding could overflow 32 bits, the general 64-bit form for shifts above 32."""
    if not HAVE_CPU:
        pytest.skip("C++ kernel not built")
    k = kernels.cpu_kernel(threads=1)
    rng = np.random.default_rng(2)
    small = reference.random_network(rng, Group.Y, Packing(1, 1), **SIGNALLED)
    assert k.requant_forms(small, 8) == ["fold"] * 5
    wide = reference.random_network(rng, Group.Y, Packing(1, 1))  # ±127 weights, 8-bit multipliers
    assert "high" in k.requant_forms(wide, 8)
    general = _extreme_network(rng, Group.Y, Packing(1, 1), Architecture(), "general")
    assert k.requant_forms(general, 8) == ["general"] * 5
    with pytest.raises(KernelError, match="bit depth"):
        k.requant_forms(small, 7)


@pytest.mark.parametrize("scale", [0.3, 1.0, 4.0])
def test_quantized_networks_take_the_folded_form(scale: float) -> None:
    """What the encoder signals (float network -> quantize with the default QuantConfig -> derive) runs
    through the folded requantisation in every layer, at 8 and 10 bits, and stays exact."""
    if not HAVE_CPU:
        pytest.skip("C++ kernel not built")
    from hevc_ext.quant import FloatLayer, FloatNetwork, derive, quantize

    k = kernels.cpu_kernel(threads=2)
    rng = np.random.default_rng(int(scale * 10))
    arch = Architecture()
    for group in (Group.Y, Group.UV):
        for packing in ALL_PACKINGS:
            shapes = arch.shapes(group, packing)
            layers = tuple(FloatLayer(s.kind, rng.normal(0, scale, s.weight_shape), rng.normal(0, 0.05, s.cout),
                                      s.relu) for s in shapes)
            act_max = [rng.uniform(0.2, 3.0, s.cout) * scale for s in shapes[:-1]]
            q = quantize(FloatNetwork(group, packing, layers), arch, QuantConfig(), act_max)
            for bd in (8, 10):
                net = derive(q, bd)
                assert k.requant_forms(net, bd) == ["fold"] * arch.layers, (group, packing, bd)
                _assert_same(k, _planes(rng, group, (13, 38), bd), net, bd)


def _single_layer_network(rng: np.random.Generator, group: Group, packing: Packing) -> IntNetwork:
    """One point-wise layer with a large gain: residuals beyond ±32768 of both signs."""
    c0 = group.planes * packing.size
    w = rng.integers(-127, 128, size=(c0, c0)).astype(np.int32)
    mult = rng.integers(1 << 20, 1 << 22, size=c0).astype(np.int64)
    shift = np.full(c0, 9, np.int64)
    bias = rng.integers(-(1 << 20), 1 << 20, size=c0).astype(np.int64)
    net = IntNetwork(group, packing, (IntLayer("pw", w, mult, bias, shift, False),))
    net.validate()
    return net


def test_single_layer_network_hits_every_clamp(kernel: kernels.Kernel) -> None:
    rng = np.random.default_rng(3)
    for group in (Group.Y, Group.UV):
        for packing in ALL_PACKINGS:
            net = _single_layer_network(rng, group, packing)
            planes = _planes(rng, group, (15, 22), 10)
            packed = reference.pad_and_pack(planes, packing)
            res = reference.residual_packed(packed, net, 10)
            assert res.min() == reference.RES_MIN and res.max() == reference.RES_MAX
            out = np.concatenate([p.ravel() for p in reference.filter_planes(planes, net, 10)])
            assert out.min() == 0 and out.max() == 1023
            _assert_same(kernel, planes, net, 10)


@pytest.mark.parametrize("group", [Group.Y, Group.UV], ids=lambda g: g.name)
def test_custom_layer_sequence(kernel: kernels.Kernel, group: Group) -> None:
    rng = np.random.default_rng(11)
    for packing in ALL_PACKINGS:
        net = _custom_network(rng, group, packing)
        for shape in ((1, 1), (13, 29), (40, 7)):
            _assert_same(kernel, _planes(rng, group, shape, 8), net, 8)


def test_wide_picture_many_strips_and_bands(kernel: kernels.Kernel) -> None:
    """Wider than one column strip (508 packed columns for a 5-layer network) in every packing used,
    with a narrow last strip, and tall enough for several row bands (of at least 32 rows)."""
    rng = np.random.default_rng(5)
    for group, packing in ((Group.Y, Packing(1, 1)), (Group.UV, Packing(2, 1)), (Group.Y, Packing(1, 2))):
        net = reference.random_network(rng, group, packing)
        _assert_same(kernel, _planes(rng, group, (75, 561 * packing.pw), 8), net, 8)


def test_bitdepths_and_containers(kernel: kernels.Kernel) -> None:
    rng = np.random.default_rng(8)
    net = reference.random_network(rng, Group.UV, Packing(1, 2))
    for bd in (8, 9, 12, 16):
        _assert_same(kernel, _planes(rng, Group.UV, (18, 27), bd, np.uint16), net, bd)


def test_strided_and_non_contiguous_planes(kernel: kernels.Kernel) -> None:
    rng = np.random.default_rng(9)
    net = reference.random_network(rng, Group.UV, Packing(2, 2))
    big = [rng.integers(0, 256, size=(50, 90)).astype(np.uint8) for _ in range(2)]
    views = [b[3:40, 5:70] for b in big]  # row stride != width
    _assert_same(kernel, views, net, 8)
    cols = [b[:, ::3] for b in big]  # column stride != 1: copied
    _assert_same(kernel, cols, net, 8)
    assert all(v.base is not None for v in views)  # the inputs are untouched views


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(h=st.integers(1, 40), w=st.integers(1, 60), pk=st.sampled_from(ALL_PACKINGS),
       uv=st.booleans(), seed=st.integers(0, 2**32 - 1), bd=st.sampled_from([8, 10]))
def test_property_any_size(h: int, w: int, pk: Packing, uv: bool, seed: int, bd: int) -> None:
    if not HAVE_CPU:
        pytest.skip("C++ kernel not built")
    group = Group.UV if uv else Group.Y
    rng = np.random.default_rng(seed)
    net = reference.random_network(rng, group, pk, Architecture(3 + 2 * (seed % 3), 4 + seed % 9))
    _assert_same(kernels.get_kernel("cpu", threads=2), _planes(rng, group, (h, w), bd), net, bd)


# ------------------------------------------------------------------- CPU code paths and threads
@pytest.mark.parametrize("isa", kernels.CPU_ISAS)
def test_every_cpu_code_path(isa: str) -> None:
    if isa not in kernels.cpu_isas():
        pytest.skip(f"{isa} not available here")
    k = kernels.cpu_kernel(threads=2, isa=isa)
    assert k.isa_name == isa
    rng = np.random.default_rng(21)
    for group in (Group.Y, Group.UV):
        for packing in ALL_PACKINGS:
            net = reference.random_network(rng, group, packing)
            _assert_same(k, _planes(rng, group, (21, 45), 10), net, 10)
        for mode in ("general", "mixed"):
            net = _extreme_network(rng, group, Packing(1, 2), Architecture(), mode)
            _assert_same(k, _planes(rng, group, (13, 40), 8), net, 8)
        for edge in (False, True):  # the folded requantisation
            net = _fold_network(rng, group, Packing(1, 2), Architecture(), edge)
            _assert_same(k, _planes(rng, group, (13, 40), 10), net, 10)
        # rows of 301 packed columns: longer than one chunk of the AVX2 depth-wise layers (16 vectors
        # of 8) and than one step group of every path, with a ragged tail
        net = _fold_network(rng, group, Packing(1, 1), Architecture(), False)
        _assert_same(k, _planes(rng, group, (6, 301), 8), net, 8)


def test_thread_counts_agree() -> None:
    if not HAVE_CPU:
        pytest.skip("C++ kernel not built")
    rng = np.random.default_rng(4)
    net = reference.random_network(rng, Group.Y, Packing(1, 1))
    planes = _planes(rng, Group.Y, (130, 400), 8)
    outs = [kernels.get_kernel("cpu", threads=t).filter_planes(planes, net, 8)[0] for t in (1, 2, 3, 7)]
    for o in outs[1:]:
        assert np.array_equal(o, outs[0])
    assert np.array_equal(outs[0], reference.filter_planes(planes, net, 8)[0])


def test_concurrent_calls_and_a_forked_child_agree() -> None:
    """The C++ kernel keeps its worker threads between calls and lends them to one call at a time:
    calls from several threads at once (the others start threads of their own) and a call in a child
    forked after the workers started (they do not exist there; it must start its own, not wait for
    them) all give the reference's output."""
    if not HAVE_CPU:
        pytest.skip("C++ kernel not built")
    rng = np.random.default_rng(12)
    nets = [reference.random_network(rng, Group.Y, Packing(1, 1)) for _ in range(3)]
    planes = [_planes(rng, Group.Y, (70, 150 + 10 * i), 8) for i in range(3)]
    want = [reference.filter_planes(p, n, 8)[0] for p, n in zip(planes, nets)]
    k = kernels.get_kernel("cpu", threads=2)
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda i: k.filter_planes(planes[i % 3], nets[i % 3], 8)[0], range(24)))
    assert all(np.array_equal(g, want[i % 3]) for i, g in enumerate(got))

    if not hasattr(os, "fork"):
        return
    r, w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # forking a process that has threads
        pid = os.fork()
    if pid == 0:  # the child: filter with 2 threads and send the result
        try:
            os.write(w, k.filter_planes(planes[1], nets[1], 8)[0].tobytes())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    try:
        while select.select([r], [], [], 60)[0]:
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
        if not data:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert data == want[1].tobytes(), "the forked child's call did not finish, or gave other output"


# ------------------------------------------------------------------------------------ errors
def test_argument_errors(kernel: kernels.Kernel) -> None:
    rng = np.random.default_rng(0)
    net = reference.random_network(rng, Group.UV, Packing(1, 1))
    u, v = _planes(rng, Group.UV, (8, 8), 8)
    with pytest.raises(UsageError, match="takes 2 planes"):
        kernel.filter_planes([u], net, 8)
    with pytest.raises(UsageError, match="one shape"):
        kernel.filter_planes([u, v[:4]], net, 8)
    with pytest.raises(UsageError, match="bit depth"):
        kernel.filter_planes([u, v], net, 10)
    with pytest.raises(UsageError):
        kernel.filter_planes([u.astype(np.float32), v.astype(np.float32)], net, 8)
    assert issubclass(UsageError, ValueError)


def test_samples_out_of_range_are_a_kernel_error(kernel: kernels.Kernel) -> None:
    rng = np.random.default_rng(1)
    net = reference.random_network(rng, Group.Y, Packing(1, 1))
    (y,) = _planes(rng, Group.Y, (8, 8), 10)
    y[3, 3] = 1024
    with pytest.raises(KernelError, match="out of range|>= 2\\^10"):
        kernel.filter_planes([y], net, 10)


def test_invalid_network_is_a_kernel_error(kernel: kernels.Kernel) -> None:
    rng = np.random.default_rng(2)
    net = reference.random_network(rng, Group.Y, Packing(2, 2))
    big = replace(net.layers[2], weight=np.full_like(net.layers[2].weight, reference.MAX_ABS_WEIGHT))
    bad = IntNetwork(net.group, net.packing, net.layers[:2] + (big,) + net.layers[3:])
    (y,) = _planes(rng, Group.Y, (8, 8), 8)
    with pytest.raises(KernelError, match="accumulator"):
        kernel.filter_planes([y], bad, 8)
    assert issubclass(KernelError, NlfError) and issubclass(KernelError, RuntimeError)


def _invalid_networks() -> dict[str, IntNetwork]:
    """Networks the kernels must refuse, one per check of kernels/nlf_network_check.h."""
    rng = np.random.default_rng(2)
    net = reference.random_network(rng, Group.Y, Packing(2, 2))
    L = net.layers

    def with_layer(i: int, **kw: object) -> IntNetwork:
        return IntNetwork(net.group, net.packing, L[:i] + (replace(L[i], **kw),) + L[i + 1:])

    one = np.ones_like(L[2].mult)
    return {
        "weight": with_layer(1, weight=np.where(np.arange(9).reshape(1, 3, 3) == 4, 40000, L[1].weight)),
        "accumulator": with_layer(2, weight=np.full_like(L[2].weight, reference.MAX_ABS_WEIGHT)),
        "multiplier": with_layer(2, mult=one * (1 << 31)),
        "shift": with_layer(2, shift=one * 63),
        "bias": with_layer(2, bias=one * ((1 << 52) + 1)),
        "inputs": with_layer(2, weight=L[2].weight[:, :5]),
        "outputs": IntNetwork(net.group, net.packing, L[:-1]),
    }


def test_cpu_and_cuda_refuse_the_same_networks() -> None:
    """Both kernels check networks with one piece of code (nlf_network_check.h): every invalid network
    is refused by each with the same message. The CUDA side runs its plan on the host (nvcc, no device)."""
    cpu = kernels.get_kernel("cpu")
    have_cuda = kernels.find_nvcc() is not None and kernels.kernel_sources() is not None
    for what, bad in _invalid_networks().items():
        (y,) = _planes(np.random.default_rng(0), Group.Y, (8, 8), 8)
        with pytest.raises(KernelError) as cpu_err:
            cpu.filter_planes([y], bad, 8)
        assert "invalid network" in str(cpu_err.value)
        detail = str(cpu_err.value).split("): ", 1)[1]
        assert what in detail, (what, detail)
        if have_cuda:
            with pytest.raises(KernelError) as cuda_err:
                kernels.cuda_kernel_path(bad, 8)
            assert str(cuda_err.value).split("): ", 1)[1] == detail, what


# ------------------------------------------------------------------------------------ loader
@pytest.fixture
def isolated_loader(monkeypatch: pytest.MonkeyPatch, tmp_path):  # type: ignore[no-untyped-def]
    """A loader that has forgotten its libraries, with an empty cache and no overrides."""
    monkeypatch.setenv("HEVC_NLF_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HEVC_NLF_CPU_LIB", raising=False)
    monkeypatch.delenv("HEVC_NLF_CUDA_LIB", raising=False)
    kernels._reset_for_tests()
    yield monkeypatch
    kernels._reset_for_tests()


def _not_installed(monkeypatch: pytest.MonkeyPatch, *stems: str) -> None:
    """As if ``pip install`` had not built the libraries ``stems`` (e.g. "_nlf_cpu")."""
    real = nativebuild.prebuilt_library
    monkeypatch.setattr(nativebuild, "prebuilt_library", lambda stem, env: None if stem in stems else real(stem, env))


def test_machine_names_the_processor(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Benchmarks and `hevc-nlf info` name the processor: /proc/cpuinfo's model name (x86 and Arm
    spellings), else what ``platform`` knows."""
    from hevc_ext import machine

    (tmp_path / "x86").write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD  EPYC 7B13\n")
    (tmp_path / "arm").write_text("processor\t: 0\nBogoMIPS\t: 50.00\n\nModel\t\t: Raspberry Pi 4 Model B\n")
    assert machine.cpu_model(tmp_path / "x86") == "AMD EPYC 7B13"
    assert machine.cpu_model(tmp_path / "arm") == "Raspberry Pi 4 Model B"
    assert machine.cpu_model(tmp_path / "missing") != ""  # platform's answer, never empty
    assert machine.summary().startswith(machine.describe()["cpu"])  # type: ignore[arg-type]


def _no_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a machine whose driver reports no CUDA device (the tests of auto's CPU fallbacks run the
    same on a GPU machine, where auto would otherwise take the CUDA kernel)."""
    monkeypatch.setattr(kernels, "cuda_driver_device_count", lambda: 0)


def test_auto_does_not_build_cuda_without_a_device(isolated_loader: pytest.MonkeyPatch) -> None:
    """Building is decided by nvcc (at install); *using* CUDA needs a device, so on a machine without
    one ``auto`` neither builds nor loads the CUDA kernel."""
    _no_cuda_device(isolated_loader)
    calls = []
    isolated_loader.setattr(nativebuild, "compile_library", lambda *a, **k: calls.append(a))
    k = kernels.get_kernel("auto")
    assert k.name in ("cpu", "reference") and not calls
    assert "no CUDA device" in str(kernels.kernel_report()["kernels"]["cuda"]["reason"])  # type: ignore[index]


def test_reference_kernel_and_unknown_names() -> None:
    assert kernels.get_kernel("reference").name == "reference"
    with pytest.raises(UsageError, match="unknown kernel"):
        kernels.get_kernel("fpga")
    with pytest.raises(UsageError):
        kernels.get_kernel("cpu", threads=0)
    with pytest.raises(UsageError):
        kernels.cpu_kernel(isa="neon")


def test_no_nvcc_means_no_cuda(isolated_loader: pytest.MonkeyPatch) -> None:
    isolated_loader.setattr(kernels, "find_nvcc", lambda: None)
    _not_installed(isolated_loader, "_nlf_cuda")  # no install-time CUDA build either (pip builds it where nvcc exists)
    with pytest.raises(KernelError, match="no nvcc to build it"):
        kernels.get_kernel("cuda")
    if HAVE_CPU:
        assert kernels.get_kernel("auto").name == "cpu"
        report = kernels.kernel_report()
        assert report["active"] == "cpu"
        assert report["kernels"]["cuda"]["available"] is False  # type: ignore[index]
        assert "nvcc" in report["kernels"]["cuda"]["reason"]  # type: ignore[index]
        assert report["kernels"]["reference"]["available"] is True  # type: ignore[index]


def test_auto_falls_back_to_reference_with_a_warning(isolated_loader: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    _no_cuda_device(isolated_loader)
    isolated_loader.setattr(kernels, "find_nvcc", lambda: None)
    _not_installed(isolated_loader, "_nlf_cpu")
    isolated_loader.setattr(nativebuild, "find_cxx", lambda: None)
    with pytest.raises(KernelError, match="C\\+\\+ kernel unavailable.*compiler"):
        kernels.get_kernel("cpu")
    with caplog.at_level(logging.WARNING, logger="hevc_ext.kernels"):
        k = kernels.get_kernel("auto")
    assert k.name == "reference"
    assert any("numpy reference" in r.getMessage() for r in caplog.records)
    report = kernels.kernel_report()
    assert report["active"] == "reference"
    assert report["kernels"]["cpu"]["available"] is False  # type: ignore[index]


def test_cpu_kernel_built_at_first_use(isolated_loader: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    if nativebuild.find_cxx() is None or kernels.kernel_sources() is None:
        pytest.skip("no C++ compiler or kernel sources")
    _not_installed(isolated_loader, "_nlf_cpu")
    isolated_loader.setattr(kernels, "CPU_FLAGS", ("-O1",) + kernels.CPU_FLAGS[1:])  # a quicker build
    k = kernels.get_kernel("cpu")
    assert k.path.parent == tmp_path / "cache" and k.path.is_file()  # type: ignore[attr-defined]
    assert k.path.stat().st_mode & 0o777 == 0o755  # type: ignore[attr-defined]  # usable from a shared cache
    rng = np.random.default_rng(6)
    net = reference.random_network(rng, Group.Y, Packing(1, 2))
    _assert_same(k, _planes(rng, Group.Y, (9, 11), 8), net, 8)
    # a damaged cache entry (loading it could crash with SIGBUS) is built again, not loaded
    path = k.path  # type: ignore[attr-defined]
    head = path.read_bytes()[:1000]
    path.unlink()  # a new file: this process has the library mapped, and truncating that would crash it
    path.write_bytes(head)
    kernels._reset_for_tests()
    k = kernels.get_kernel("cpu")
    assert k.path == path and path.stat().st_size > 1000 and nativebuild.intact(path)  # type: ignore[attr-defined]
    _assert_same(k, _planes(rng, Group.Y, (9, 11), 8), net, 8)


def test_unwritable_cache_names_the_cache(isolated_loader: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    if nativebuild.find_cxx() is None or kernels.kernel_sources() is None:
        pytest.skip("no C++ compiler or kernel sources")
    _not_installed(isolated_loader, "_nlf_cpu")
    (tmp_path / "afile").write_text("")
    isolated_loader.setenv("HEVC_NLF_CACHE", str(tmp_path / "afile" / "cache"))
    with pytest.raises(KernelError, match="cannot write into the build cache .*afile.*HEVC_NLF_CACHE"):
        kernels.get_kernel("cpu")


def test_a_named_library_is_never_replaced_by_auto(isolated_loader: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``auto`` falls back when a library is missing, but not from one the user named."""
    from hevc_ext.errors import NamedLibraryError

    missing = tmp_path / "nowhere" / "lib.so"
    _no_cuda_device(isolated_loader)  # with a device, auto takes CUDA and never opens the C++ library
    isolated_loader.setenv("HEVC_NLF_CPU_LIB", str(missing))
    with pytest.raises(NamedLibraryError, match="HEVC_NLF_CPU_LIB"):
        kernels.get_kernel("auto")
    pytest.importorskip("torch")
    from hevc_ext import trainkernel
    from hevc_ext.arch import Architecture
    from hevc_ext.model import NlfNet

    isolated_loader.setenv("HEVC_NLF_TRAIN_LIB", str(missing))
    trainkernel._reset_for_tests()
    try:
        with pytest.raises(NamedLibraryError, match="HEVC_NLF_TRAIN_LIB"):
            trainkernel.select_engine("auto", NlfNet(Architecture(), Group.Y, Packing(1, 1)))
    finally:
        isolated_loader.delenv("HEVC_NLF_TRAIN_LIB")
        trainkernel._reset_for_tests()


def test_compiler_failure_is_reported(isolated_loader: pytest.MonkeyPatch) -> None:
    if kernels.kernel_sources() is None:
        pytest.skip("no kernel sources")
    _not_installed(isolated_loader, "_nlf_cpu")
    isolated_loader.setattr(nativebuild, "find_cxx", lambda: "/bin/false")
    with pytest.raises(KernelError, match="compiler failed"):
        kernels.get_kernel("cpu")


def _process_gone(pid: int, wait_s: float = 5.0) -> bool:
    """The process has exited (no /proc entry, or a zombie nobody reaped yet), within ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        if state == "Z":
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_build_stopped_early_leaves_no_compiler_running(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A first-use build that ends early (here its time limit; Ctrl-C and the CLI's SIGTERM exception
    take the same path) kills the compiler's whole process group and leaves no partial library: killing
    the driver alone left its children (cc1plus) running."""
    pidfile = tmp_path / "child.pid"
    fake = tmp_path / "fake-cxx"
    fake.write_text(f"#!/bin/sh\nsleep 60 &\necho $! > '{pidfile}'\nwait\n")
    fake.chmod(0o755)
    monkeypatch.setattr(nativebuild, "BUILD_TIMEOUT", 1.0)
    out = tmp_path / "cache" / "lib.so"
    with pytest.raises(KernelError, match="timed out"):
        nativebuild.compile_library([str(fake)], out)
    assert _process_gone(int(pidfile.read_text()))
    assert list(out.parent.iterdir()) == []  # neither the library nor its temporary .part file


def test_wrong_library_is_a_kernel_error(isolated_loader: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    not_a_lib = tmp_path / "libnothing.so"
    not_a_lib.write_bytes(b"\x7fELF garbage")
    isolated_loader.setenv("HEVC_NLF_CUDA_LIB", str(not_a_lib))
    with pytest.raises(KernelError, match="cannot load"):
        kernels.get_kernel("cuda")
    if HAVE_CPU:  # a real library without the CUDA entry points
        kernels._reset_for_tests()
        isolated_loader.setenv("HEVC_NLF_CUDA_LIB", str(kernels.get_kernel("cpu").path))  # type: ignore[attr-defined]
        kernels._reset_for_tests()
        with pytest.raises(KernelError, match="not a CUDA kernel library"):
            kernels.get_kernel("cuda")


def test_stale_installed_cuda_library_is_rebuilt(isolated_loader: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An install-time CUDA library older than the sources (a missing entry point) is passed over for a
    build of the sources, as the C++ one is; without nvcc the error names both reasons. A library the
    user named in $HEVC_NLF_CUDA_LIB is never replaced (test_wrong_library_is_a_kernel_error)."""
    stale = tmp_path / "_nlf_cuda.so"
    stale.write_bytes(b"\x7fELF garbage")
    isolated_loader.setattr(nativebuild, "prebuilt_library", lambda stem, env: stale if stem == "_nlf_cuda" else None)
    isolated_loader.setattr(kernels, "find_nvcc", lambda: None)
    with pytest.raises(KernelError, match=f"installed library does not load \\(cannot load {stale}.*no nvcc"):
        kernels._cuda_library()
    kernels._reset_for_tests()
    built = []

    def fake_build(name: str, compiler: str, *args: object, **kw: object) -> Path:
        built.append((name, compiler))
        raise KernelError("compiler failed (test)")

    isolated_loader.setattr(kernels, "find_nvcc", lambda: "/opt/fake/nvcc")
    isolated_loader.setattr(nativebuild, "build_cached", fake_build)
    with pytest.raises(KernelError, match="compiler failed"):
        kernels._cuda_library()
    assert built == [("nlf_cuda", "/opt/fake/nvcc")]


def _native_libraries() -> list[tuple[str, nativebuild.NativeLibrary, Any]]:
    from hevc_ext import trainkernel  # imports torch

    return [("cpu", kernels._CPU, kernels._cpu_library), ("cuda", kernels._CUDA, kernels._cuda_library),
            ("train", trainkernel._ENGINE, trainkernel._library)]


@pytest.mark.parametrize("which", ["cpu", "cuda", "train"])
def test_one_loading_policy_for_every_native_library(which: str, isolated_loader: pytest.MonkeyPatch,
                                                     tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The C++ kernel, the CUDA kernel and the training engine are located by one policy
    (nativebuild.load_native): a library named in the environment is never replaced by a build; an
    installed one that does not load is rebuilt from the sources, with a warning; with neither, the
    error names every reason."""
    from hevc_ext import trainkernel

    _, spec, get = next(t for t in _native_libraries() if t[0] == which)
    isolated_loader.delenv("HEVC_NLF_TRAIN_LIB", raising=False)
    trainkernel._reset_for_tests()
    isolated_loader.setattr(nativebuild, "find_cxx", lambda: "/opt/fake/c++")
    isolated_loader.setattr(kernels, "find_nvcc", lambda: "/opt/fake/nvcc")
    built: list[tuple[str, str]] = []

    def fake_build(name: str, compiler: str, *args: object, **kw: object) -> Path:
        built.append((name, compiler))
        raise KernelError("compiler failed (test)")

    isolated_loader.setattr(nativebuild, "build_cached", fake_build)
    garbage = tmp_path / "libgarbage.so"
    garbage.write_bytes(b"\x7fELF garbage")
    try:
        # 1. named by the user: the error, never a substitute
        isolated_loader.setenv(spec.env_var, str(garbage))
        named = f"named by \\${spec.env_var} does not load \\(cannot load {garbage}.*unset {spec.env_var}"
        with pytest.raises(KernelError, match=named):
            get()
        assert built == []
        isolated_loader.delenv(spec.env_var)
        # 2. installed but not loadable (older than the sources): built anew, with a warning
        kernels._reset_for_tests()
        trainkernel._reset_for_tests()
        isolated_loader.setattr(nativebuild, "prebuilt_library", lambda stem, env: garbage if stem == spec.stem else None)
        with caplog.at_level(logging.WARNING, logger="hevc_ext.nativebuild"):
            stale = f" unavailable: the installed library does not load \\(cannot load {garbage}.*compiler failed"
            with pytest.raises(KernelError, match=re.escape(spec.what) + stale):
                get()
        assert built == [(spec.stem.lstrip("_"), "/opt/fake/nvcc" if which == "cuda" else "/opt/fake/c++")]
        assert any("building it from the sources" in r.getMessage() for r in caplog.records)
        # 3. nothing installed and no compiler: both reasons
        kernels._reset_for_tests()
        trainkernel._reset_for_tests()
        isolated_loader.setattr(nativebuild, "prebuilt_library", lambda stem, env: None)
        isolated_loader.setattr(nativebuild, "find_cxx", lambda: None)
        isolated_loader.setattr(kernels, "find_nvcc", lambda: None)
        neither = f"not built at install time .*{spec.env_var} unset.*no {re.escape(spec.compiler_name)} to build it"
        with pytest.raises(KernelError, match=neither):
            get()
        assert len(built) == 1
    finally:
        trainkernel._reset_for_tests()


def test_native_sources_list_every_header_they_include() -> None:
    """Each library's source list holds every header its sources include (it keys the first-use build
    cache: a header left out would not rebuild a stale library), and setup.py ships them all in the
    package (``_kernels_src``) and in sdists."""
    import ast

    root = Path(__file__).resolve().parent.parent
    kernel_dir = root / "kernels"
    if not (kernel_dir / "filter_cpu.cpp").is_file():
        pytest.skip("not a source checkout")
    setup_tree = ast.parse((root / "setup.py").read_text())
    shipped = next(ast.literal_eval(node.value) for node in ast.walk(setup_tree) if isinstance(node, ast.Assign)
                   and any(isinstance(t, ast.Name) and t.id == "KERNEL_FILES" for t in node.targets))
    for name, spec, _ in _native_libraries():
        included: set[str] = set()
        todo = [spec.sources[0]]
        while todo:
            text = (kernel_dir / todo.pop()).read_text()
            for header in re.findall(r'^\s*#\s*include\s+"([^"]+)"', text, flags=re.M):
                if header not in included and header != spec.sources[0]:  # the .cpp includes itself per ISA
                    included.add(header)
                    todo.append(header)
        assert included, name
        assert included <= set(spec.sources[1:]), (name, included - set(spec.sources[1:]))
        assert set(spec.sources) <= set(shipped), (name, set(spec.sources) - set(shipped))


def test_info_reports_kernels_and_training_engine(isolated_loader: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """``hevc-nlf info`` says which filter kernel and which training engine are active, and why."""
    import json

    from hevc_ext import trainkernel
    from hevc_ext.cli import main

    isolated_loader.delenv("HEVC_NLF_TRAIN_LIB", raising=False)
    isolated_loader.setattr(kernels, "find_nvcc", lambda: None)  # no CUDA build into the empty cache
    _not_installed(isolated_loader, "_nlf_cuda")
    trainkernel._reset_for_tests()
    try:
        assert main(["info", "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["kernels"]["active"] == kernels.get_kernel("auto").name
        assert data["machine"]["cpus"] >= 1 and data["machine"]["cpu"]  # where the figures come from
        ok, why = trainkernel.available()
        assert data["training"] == {"available": ok, "reason": why, "active": "cpu" if ok else "torch"}
        if HAVE_CPU:
            assert data["kernels"]["kernels"]["cpu"]["path"] == str(kernels.get_kernel("cpu").path)  # type: ignore[attr-defined]
        # nothing installed, no compiler: the encoder trains with torch, and info says why
        kernels._reset_for_tests()
        trainkernel._reset_for_tests()
        isolated_loader.setattr(nativebuild, "prebuilt_library", lambda stem, env: None)
        isolated_loader.setattr(nativebuild, "find_cxx", lambda: None)
        assert main(["info"]) == 0
        out = capsys.readouterr().out
        kernel_part, training_part = out.split("training engine (encoder):")
        assert "cpu          unavailable: C++ kernel unavailable" in kernel_part
        assert "active: reference" in kernel_part
        assert "unavailable: C++ training engine unavailable" in training_part and "no C++ compiler" in training_part
        assert "active: torch" in training_part
    finally:
        trainkernel._reset_for_tests()


def test_cuda_without_device_is_refused_not_crashed() -> None:
    if HAVE_GPU:
        pytest.skip("a CUDA device is present")
    if kernels.find_nvcc() is None:
        pytest.skip("nvcc not present")
    if nativebuild.prebuilt_library("_nlf_cuda", "HEVC_NLF_CUDA_LIB") is None and \
            not any(kernels.cache_dir().glob("libnlf_cuda-*.so")):
        pytest.skip("CUDA library not built yet (see test_cuda_kernel_logic_on_host)")
    # without a driver the CUDA runtime says "driver version is insufficient": the error says what is missing
    why = "no CUDA device" + (" .*no NVIDIA driver" if kernels._cuda_driver() is None else "")
    with pytest.raises(KernelError, match=why):
        kernels.get_kernel("cuda")


@pytest.mark.slow
def test_cuda_kernel_logic_on_host() -> None:
    """The CUDA kernel's segment code run on the host (block by block, thread by thread): checks its
    tiling, halos and indexing without a GPU. Builds the CUDA library with nvcc if not cached."""
    if kernels.find_nvcc() is None or kernels.kernel_sources() is None:
        pytest.skip("nvcc not present")
    rng = np.random.default_rng(12)
    cases = [(Group.Y, Packing(1, 1), Architecture(), (37, 70), 8),
             (Group.UV, Packing(2, 2), Architecture(3, 6), (17, 65), 10),
             (Group.Y, Packing(1, 2), Architecture(7, 16), (20, 33), 8),
             (Group.UV, Packing(2, 1), Architecture(5, 32), (5, 3), 16),
             (Group.Y, Packing(2, 2), Architecture(3, 4), (1, 1), 8)]
    for group, packing, arch, shape, bd in cases:
        net = reference.random_network(rng, group, packing, arch)
        planes = _planes(rng, group, shape, bd)
        got = kernels.cuda_check_host(planes, net, bd)
        for g, w in zip(got, reference.filter_planes(planes, net, bd)):
            assert np.array_equal(g, w)
    net = _custom_network(rng, Group.UV, Packing(1, 2))
    planes = _planes(rng, Group.UV, (19, 41), 8)
    for g, w in zip(kernels.cuda_check_host(planes, net, 8), reference.filter_planes(planes, net, 8)):
        assert np.array_equal(g, w)
    nets = [_extreme_network(rng, Group.Y, Packing(1, 1), Architecture(), mode)
            for mode in ("general", "mixed", "saturate")]
    nets += [_fold_network(rng, g, Packing(1, 2), Architecture(), edge) for g in (Group.Y, Group.UV)
             for edge in (False, True)]  # the folded requantisation
    for net in nets:
        planes = _planes(rng, net.group, (18, 40), 10)
        for g, w in zip(kernels.cuda_check_host(planes, net, 10), reference.filter_planes(planes, net, 10)):
            assert np.array_equal(g, w)


def test_cuda_stream_entry_point_refuses_host_memory() -> None:
    """nlf_cuda_filter_stream queues work without waiting, which host copies cannot do: host planes are
    refused (an argument error, checked before any device is looked for)."""
    if kernels.find_nvcc() is None or kernels.kernel_sources() is None:
        pytest.skip("nvcc not present")
    lib, _ = kernels._cuda_library()
    rng = np.random.default_rng(13)
    net = reference.random_network(rng, Group.Y, Packing(1, 1))
    plane = _planes(rng, Group.Y, (8, 8), 8)[0]
    out = np.empty_like(plane)
    rc = lib.nlf_cuda_filter_stream(ctypes.byref(kernels._native_net(net).struct),
                                    ctypes.byref(kernels._fill_planes([plane], [out], 8)), None)
    assert rc == -1 and b"device memory only" in lib.nlf_last_error()


@pytest.mark.slow
def test_cuda_fast_kernel_logic_on_host() -> None:
    """The CUDA fast kernel (paper shape, int8 weights, 32-bit requantisation: what the encoder signals)
    run on the host: taken for every packing, group and hidden width up to 16, and exact; networks
    outside its ranges go to the generic kernel."""
    if kernels.find_nvcc() is None or kernels.kernel_sources() is None:
        pytest.skip("nvcc not present")
    rng = np.random.default_rng(31)
    for group in (Group.Y, Group.UV):
        for packing in ALL_PACKINGS:
            for arch in (Architecture(), Architecture(5, 7), Architecture(5, 16)):
                net = reference.random_network(rng, group, packing, arch, **SIGNALLED)
                assert kernels.cuda_kernel_path(net, 8) == "fast"
                for bd, shape in ((8, (37, 70)), (10, (5, 3)), (16, (18, 33))):
                    planes = _planes(rng, group, shape, bd)
                    got = kernels.cuda_check_host(planes, net, bd)
                    for g, w in zip(got, reference.filter_planes(planes, net, bd)):
                        assert np.array_equal(g, w), (group, packing, arch, bd, shape)
    small = reference.random_network(rng, Group.Y, Packing(1, 1), **SIGNALLED)
    wide = reference.random_network(rng, Group.Y, Packing(1, 1))  # 8-bit multipliers: folding overflows
    w = small.layers[0].weight.copy()
    w[0, 0] = 200  # beyond int8
    big_w = replace(small, layers=(replace(small.layers[0], weight=w),) + small.layers[1:])
    for net in (wide, big_w, reference.random_network(rng, Group.Y, Packing(1, 1), Architecture(7, 12), **SIGNALLED),
                reference.random_network(rng, Group.UV, Packing(1, 1), Architecture(5, 20), **SIGNALLED)):
        assert kernels.cuda_kernel_path(net, 8) == "generic"
        planes = _planes(rng, net.group, (20, 40), 8)
        for g, w in zip(kernels.cuda_check_host(planes, net, 8), reference.filter_planes(planes, net, 8)):
            assert np.array_equal(g, w)


@pytest.mark.parametrize("group", [Group.Y, Group.UV], ids=lambda g: g.name)
@pytest.mark.parametrize("packing", ALL_PACKINGS, ids=str)
def test_signalled_networks_all_packings(kernel: kernels.Kernel, group: Group, packing: Packing) -> None:
    """Networks in the ranges the encoder signals (on the GPU: the fast kernel), every size class."""
    rng = np.random.default_rng(40 + 4 * group.value + packing.index)
    for arch in (Architecture(), Architecture(5, 16)):
        net = reference.random_network(rng, group, packing, arch, **SIGNALLED)
        if kernel.name == "cuda":
            assert kernels.cuda_kernel_path(net, 8) == "fast"
        for bd in (8, 10):
            for shape in SIZES + [(70, 67)]:
                _assert_same(kernel, _planes(rng, group, shape, bd), net, bd)


def test_cuda_filter_device_matches_reference() -> None:
    """Planes already on the GPU (CuPy arrays via __cuda_array_interface__): no host copies, same
    pictures as the reference, for 8- and 10-bit, both groups and a row stride wider than the width."""
    if not HAVE_GPU:
        pytest.skip("no CUDA device")
    cp = pytest.importorskip("cupy")
    k = kernels.get_kernel("cuda")
    rng = np.random.default_rng(21)
    for group, packing, bd, shape in ((Group.Y, Packing(1, 2), 8, (67, 130)), (Group.UV, Packing(1, 1), 10, (33, 65)),
                                      (Group.Y, Packing(2, 2), 10, (240, 416))):
        net = reference.random_network(rng, group, packing)
        planes = _planes(rng, group, shape, bd)
        wide = [cp.zeros((shape[0], shape[1] + 13), dtype=p.dtype) for p in planes]  # stride > width
        for w, p in zip(wide, planes):
            w[:, : shape[1]] = cp.asarray(p)
        ins = [w[:, : shape[1]] for w in wide]
        outs = [cp.empty(shape, dtype=p.dtype) for p in planes]
        k.filter_device(ins, outs, net, bd)  # type: ignore[attr-defined]
        for o, want in zip(outs, reference.filter_planes(planes, net, bd)):
            assert np.array_equal(cp.asnumpy(o), want)
    with pytest.raises(UsageError, match="GPU array"):
        k.filter_device([planes[0]], [planes[0]], reference.random_network(rng, Group.Y, Packing(1, 1)), 8)  # type: ignore[attr-defined]


class _FakeGpuArray:
    """An object with a __cuda_array_interface__ and no memory behind it (the checks never touch it)."""

    def __init__(self, shape: tuple[int, ...], typestr: str, strides: tuple[int, ...] | None = None,
                 readonly: bool = False, stream: int | None = None) -> None:
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (0x7F0000001000, readonly),
                                         "strides": strides, "version": 3}
        if stream is not None:
            self.__cuda_array_interface__["stream"] = stream


def test_gpu_plane_checks_without_a_device() -> None:
    """What filter_device reads from __cuda_array_interface__ (no GPU needed): row stride in samples,
    the producer's stream as the default stream, and a clear refusal of what the kernel cannot take."""
    ptr, h, w, dtype, stride, torch_dev, stream = kernels._gpu_plane(
        _FakeGpuArray((30, 40), "<u2", strides=(2 * 48, 2), stream=7), False, 0)
    assert (ptr, h, w, dtype, stride, torch_dev, stream) == (0x7F0000001000, 30, 40, np.dtype(np.uint16), 48, None, 7)
    assert kernels._gpu_plane(_FakeGpuArray((5, 9), "|u1"), True, 1)[4] == 9  # C-contiguous: strides None
    assert kernels._stream_handle(None, None, 7) == 7
    assert kernels._stream_handle(None, None, None) == 0  # legacy default stream
    assert kernels._stream_handle(12345, None, 7) == 12345

    class TorchLikeStream:
        cuda_stream = 99

    assert kernels._stream_handle(TorchLikeStream(), None, None) == 99
    for bad, match in ((_FakeGpuArray((4, 4, 3), "|u1"), "2-D uint8/uint16"), (_FakeGpuArray((4, 4), "<f4"), "2-D uint8/uint16"),
                       (_FakeGpuArray((4, 4), "|u1", strides=(8, 2)), "contiguous"), (np.zeros((4, 4), np.uint8), "GPU array")):
        with pytest.raises(UsageError, match=match):
            kernels._gpu_plane(bad, False, 0)
    with pytest.raises(UsageError, match="output plane 1: read-only"):
        kernels._gpu_plane(_FakeGpuArray((4, 4), "|u1", readonly=True), True, 1)
    with pytest.raises(UsageError, match="stream"):
        kernels._stream_handle("default", None, None)


def _torch_and_cuda_kernel():  # type: ignore[no-untyped-def]
    """PyTorch with CUDA and the CUDA kernel, or a skip."""
    if not HAVE_GPU:
        pytest.skip("no CUDA device")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch without CUDA")
    return torch, kernels.get_kernel("cuda")


def test_cuda_filter_device_streams_and_asynchrony() -> None:
    """filter_device runs on PyTorch's current stream (or the one given) and, with the fast kernel on
    8-bit samples, returns before the kernel has run; 10-bit calls wait for it (range check)."""
    torch, k = _torch_and_cuda_kernel()
    rng = np.random.default_rng(29)
    shape = (96, 200)
    for bd in (8, 10):
        net = reference.random_network(rng, Group.Y, Packing(1, 2), **SIGNALLED)
        assert kernels.cuda_kernel_path(net, bd) == "fast"
        plane = _planes(rng, Group.Y, shape, bd)[0]
        want = reference.filter_planes([plane], net, bd)[0]
        dt = torch.uint8 if bd == 8 else torch.uint16
        x = torch.from_numpy(plane.astype(np.int32)).to("cuda").to(dt)
        side = torch.cuda.Stream()
        outs = [torch.zeros(shape, dtype=dt, device="cuda") for _ in range(3)]
        torch.cuda.synchronize()
        with torch.cuda.stream(side):
            torch.cuda._sleep(200_000_000)  # ≈0.1 s of GPU time queued ahead of the filter on `side`
            k.filter_device([x], [outs[0]], net, bd)  # type: ignore[attr-defined]
            pending = not side.query()
        assert pending == (bd == 8), f"{bd}-bit call {'returned early' if pending else 'waited'}"
        k.filter_device([x], [outs[1]], net, bd, stream=side)  # type: ignore[attr-defined]
        k.filter_device([x], [outs[2]], net, bd, stream=side.cuda_stream)  # type: ignore[attr-defined]
        side.synchronize()
        for o in outs:
            assert np.array_equal(o.cpu().numpy().astype(np.int64), want.astype(np.int64))
    if torch.cuda.device_count() > 1:
        y = torch.zeros((8, 8), dtype=torch.uint8, device="cuda:1")
        with pytest.raises(UsageError, match="device 1"):
            k.filter_device([y], [y.clone()], net, 8)  # type: ignore[attr-defined]


def test_cuda_filter_device_torch_tensors() -> None:
    """PyTorch CUDA tensors (read without __cuda_array_interface__): same pictures as the reference,
    including a row stride wider than the width; wrong dtypes and column-strided views are refused."""
    torch, k = _torch_and_cuda_kernel()
    rng = np.random.default_rng(23)
    for group, packing, bd, shape in ((Group.Y, Packing(2, 2), 8, (70, 131)), (Group.UV, Packing(1, 2), 8, (33, 64))):
        net = reference.random_network(rng, group, packing, **SIGNALLED)
        planes = _planes(rng, group, shape, bd)
        wide = [torch.zeros((shape[0], shape[1] + 5), dtype=torch.uint8, device="cuda") for _ in planes]
        for w, p in zip(wide, planes):
            w[:, : shape[1]] = torch.from_numpy(p).cuda()
        outs = [torch.empty(shape, dtype=torch.uint8, device="cuda") for _ in planes]
        k.filter_device([w[:, : shape[1]] for w in wide], outs, net, bd)  # type: ignore[attr-defined]
        for o, want in zip(outs, reference.filter_planes(planes, net, bd)):
            assert np.array_equal(o.cpu().numpy(), want)
    net = reference.random_network(rng, Group.Y, Packing(1, 1), **SIGNALLED)
    x = torch.zeros((16, 16), dtype=torch.uint8, device="cuda")
    with pytest.raises(UsageError, match="uint8/uint16"):
        k.filter_device([x.float()], [x], net, 8)  # type: ignore[attr-defined]
    with pytest.raises(UsageError, match="contiguous"):
        k.filter_device([x[:, ::2]], [x[:, :8]], net, 8)  # type: ignore[attr-defined]
