"""The benchmark scripts under tools/ (where the project's speed targets are measured) keep working:
they run on this checkout, report what they measured, end with one line and status 2 on bad input,
and their C++ companions still compile against the kernel source."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hevc_ext import kernels, nativebuild
from hevc_ext.arch import Architecture, Group
from hevc_ext.pipeline import default_packing

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"
HAVE_CPU = bool(kernels.cpu_isas())


def _tool(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(TOOLS / name), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not HAVE_CPU, reason="C++ kernel not built")
def test_bench_filter_measures_the_cpu_kernel_and_writes_what_it_printed(tmp_path: Path) -> None:
    out = tmp_path / "res" / "bench.json"
    r = _tool("bench_filter.py", "--kernel", "cpu", "--threads", "2", "--sizes", "96x64,97x61", "--repeat", "2",
              "--no-torch", "--no-decode", "--sequences", str(tmp_path / "no-clips"), "--json", "--out", str(out))
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout)
    assert json.loads(out.read_text()) == printed
    assert [row["size"] for row in printed["rows"]] == ["96x64", "97x61"]
    arch = Architecture()
    for row, (w, h) in zip(printed["rows"], [(96, 64), (97, 61)]):
        macs = w * h * (arch.mac_per_pixel(Group.Y, default_packing(w, h, Group.Y))
                        + arch.mac_per_pixel(Group.UV, default_packing(w, h, Group.UV)))
        assert row["mac_per_frame"] == macs
        assert row["bitexact"] is True and row["content"] == "random"
        assert 0 < row["kernel_ms_best"] <= row["kernel_ms"]
        assert row["gmacs"] == pytest.approx(macs / row["kernel_ms"] / 1e6, rel=0.01)
        assert row["requant_forms"]["y"] and row["requant_forms"]["uv"]
    assert printed["bitexact"] is True and printed["kernel"] == "cpu" and printed["threads"] == 2
    assert printed["decode_ms_1080p"] is None and printed["filter_ms_1080p"] is None  # neither measured
    assert not [p for p in out.parent.iterdir() if p != out]  # no temporary file left beside it


@pytest.mark.parametrize("args, message", [
    (["--sizes", "abc"], "argument --sizes: 'abc' is not WIDTHxHEIGHT"),
    (["--sizes", "64x48,0x5"], "argument --sizes: '0x5': width and height must be at least 1"),
    (["--repeat", "0"], "argument --repeat: expected a positive integer, got 0"),
    (["--threads", "two"], "argument --threads: expected a positive integer, got 'two'"),
])
def test_bench_filter_rejects_bad_options_in_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "bench.json"
    r = _tool("bench_filter.py", *args, "--no-torch", "--no-decode", "--out", str(out))
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.skipif(kernels.cuda_driver_device_count() > 0, reason="this machine has a CUDA device")
def test_bench_filter_says_why_a_kernel_cannot_run(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    r = _tool("bench_filter.py", "--kernel", "cuda", "--sizes", "64x48", "--no-torch", "--no-decode",
              "--out", str(out))
    assert r.returncode == 2
    assert r.stderr.startswith("bench_filter: error: ") and "CUDA" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_bench_decode_names_a_missing_clip(tmp_path: Path) -> None:
    r = _tool("bench_decode.py", "--clip", str(tmp_path / "nothere.yuv"))
    assert r.returncode == 2 and "nothere.yuv: no such clip" in r.stderr


def _cxx() -> str:
    cxx = nativebuild.find_cxx()
    if cxx is None:
        pytest.skip("no C++ compiler")
    return str(cxx)


@pytest.mark.skipif(not HAVE_CPU, reason="C++ kernel not built")
def test_kernel_ab_compares_two_builds_of_the_kernel(tmp_path: Path) -> None:
    """tools/kernel_ab.cpp compiles, loads the installed kernel and a build of the source with other
    flags, and finds that they filter a frame the same way."""
    cxx = _cxx()
    ab, lib = tmp_path / "kernel_ab", tmp_path / "other.so"
    subprocess.run([cxx, "-O2", "-std=c++17", str(TOOLS / "kernel_ab.cpp"), "-o", str(ab), "-ldl"], check=True,
                   timeout=300)
    subprocess.run([cxx, "-O1", "-std=c++17", "-shared", "-fPIC", "-pthread", str(ROOT / "kernels" / "filter_cpu.cpp"),
                    "-o", str(lib)], check=True, timeout=600)
    installed = str(kernels.get_kernel("cpu").path)  # type: ignore[attr-defined]
    r = subprocess.run([str(ab), "2", installed, str(lib)], capture_output=True, text=True, timeout=300,
                       env={"SIZE": "130x66", "N": "2", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.endswith("same output") for line in lines), r.stdout
    medians = [float(re.search(r"median +([0-9.]+) ms", line).group(1)) for line in lines]  # type: ignore[union-attr]
    assert all(m > 0 for m in medians)


@pytest.mark.skipif(not sys.platform.startswith("linux") or "avx2" not in kernels.cpu_isas(),
                    reason="needs an AVX2 CPU")
def test_kernel_layers_measures_each_row_kernel_against_its_multiply_bound(tmp_path: Path) -> None:
    """tools/kernel_layers.cpp (AVX2 row kernels) prints, per kernel, the multiply instructions it needs
    per packed pixel and its time over the time those alone would take at the measured rate: a kernel
    cannot beat that bound, so the ratio is above 1 unless the count is wrong."""
    cxx = _cxx()
    exe = tmp_path / "kernel_layers"
    subprocess.run([cxx, "-O2", "-std=c++17", "-pthread", "-DNS=nlf_avx2", str(TOOLS / "kernel_layers.cpp"), "-o",
                    str(exe)], check=True, timeout=600)
    r = subprocess.run([str(exe), "64"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rate = re.search(r"^rate ([0-9.]+) VPMADDWD\+VPADDD pairs per cycle$", r.stdout, re.M)
    assert rate is not None and 0.2 < float(rate.group(1)) < 8, r.stdout
    rows = {m.group(1): (float(m.group(2)), float(m.group(3)), float(m.group(4)))
            for m in re.finditer(r"^(\w+) .* muls ([0-9.]+) bound ([0-9.]+) measured/bound ([0-9.]+)$", r.stdout, re.M)}
    # 5x12 network, 8 columns per vector: 12 outputs x 6 input pairs / 8 for the 12->12 layer, 12 per
    # channel and 2x8 pixels for the depth-wise one, 12 x 1 and 2 x 6 for the first and last layers
    assert {k: v[0] for k, v in rows.items()} == {"dw2": 9.0, "pw2_vp_L3": 9.0, "pw2_vp_L1": 1.5, "pw_L5": 1.5}
    for name, (muls, bound, ratio) in rows.items():
        assert bound == pytest.approx(muls / float(rate.group(1)), rel=0.02), name
        assert ratio > 0.9, (name, r.stdout)
