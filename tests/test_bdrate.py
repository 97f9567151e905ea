"""BD-rate / BD-PSNR: agreement with the ``bjontegaard`` reference package, properties, errors."""

from __future__ import annotations

import ast
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hevc_ext import bdrate
from hevc_ext.bdrate import bd_psnr, bd_rate
from hevc_ext.errors import NlfError, UsageError

bjontegaard = pytest.importorskip("bjontegaard")

TOL = 1e-6  # absolute, in percent (BD-rate) or dB (BD-PSNR)

# (anchor rates, anchor PSNR, test rates, test PSNR); rates in kbps, PSNR in dB.
REFERENCE_CASES = {
    # HEVC-like: 4 CTC QPs, test saves a few percent.
    "hevc_classB": ([1050.2, 2260.7, 4830.1, 10480.6], [33.91, 35.98, 37.83, 39.62],
                    [1012.5, 2190.3, 4702.8, 10310.4], [34.02, 36.07, 37.90, 39.66]),
    "hevc_classD": ([102.4, 201.9, 398.7, 812.3], [29.87, 32.61, 35.42, 38.31],
                    [98.6, 193.2, 383.3, 790.5], [30.05, 32.80, 35.57, 38.40]),
    "hevc_loss": ([150.0, 420.0, 1200.0, 3400.0], [31.0, 34.2, 37.5, 40.8],
                  [160.0, 450.0, 1300.0, 3550.0], [30.9, 34.1, 37.4, 40.8]),
    "five_points": ([100, 250, 700, 1900, 5000], [30.1, 32.9, 35.8, 38.9, 41.7],
                    [95, 240, 660, 1850, 4900], [30.3, 33.0, 36.0, 39.0, 41.8]),
    # Partial overlap in PSNR (and in rate, for BD-PSNR).
    "partial_overlap_up": ([100, 300, 900, 2700], [30, 33, 36, 39],
                           [110, 320, 950, 2800], [32, 35, 38, 41]),
    "partial_overlap_down": ([500, 1200, 2800, 5000], [34, 37, 40, 42],
                             [300, 700, 1600, 3500], [31, 34, 37, 40]),
    # Kinked test curves: PCHIP and the cubic fit disagree strongly.
    "kink_strong": ([100, 300, 1000, 3000], [30, 33.5, 37, 40.5],
                    [100, 130, 1100, 3000], [30, 34.8, 37.1, 40.6]),
    "kink_mild": ([200, 500, 1200, 3000], [31, 34, 37, 40],
                  [150, 200, 1600, 2600], [31.2, 34.5, 37.5, 40.2]),
}
KINKED = ("kink_strong", "kink_mild")


def _ref(func, case, method):
    r1, p1, r2, p2 = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the package warns on partial overlap
        return float(func(r1, p1, r2, p2, method=method, require_matching_points=False, min_overlap=0))


@pytest.mark.parametrize("method", ["pchip", "cubic"])
@pytest.mark.parametrize("name", sorted(REFERENCE_CASES))
def test_matches_bjontegaard_package(name, method):
    case = REFERENCE_CASES[name]
    assert bd_rate(*case, method=method) == pytest.approx(_ref(bjontegaard.bd_rate, case, method), abs=TOL)
    assert bd_psnr(*case, method=method) == pytest.approx(_ref(bjontegaard.bd_psnr, case, method), abs=TOL)


@pytest.mark.parametrize("name", KINKED)
def test_pchip_and_cubic_differ_on_kinks(name):
    case = REFERENCE_CASES[name]
    pchip, cubic = bd_rate(*case, method="pchip"), bd_rate(*case, method="cubic")
    assert abs(pchip - cubic) > 1.0
    assert pchip == pytest.approx(_ref(bjontegaard.bd_rate, case, "pchip"), abs=TOL)
    assert cubic == pytest.approx(_ref(bjontegaard.bd_rate, case, "cubic"), abs=TOL)


def test_default_method_is_pchip():
    case = REFERENCE_CASES["kink_strong"]
    assert bd_rate(*case) == bd_rate(*case, method="pchip")
    assert bd_psnr(*case) == bd_psnr(*case, method="pchip")


def test_unsorted_input_and_unequal_point_counts():
    r1, p1, r2, p2 = REFERENCE_CASES["five_points"]
    perm = [3, 0, 4, 2, 1]
    assert bd_rate([r1[i] for i in perm], [p1[i] for i in perm], r2, p2) == bd_rate(r1, p1, r2, p2)
    # 5 anchor points vs 4 test points (the reference needs require_matching_points=False)
    case = (r1, p1, r2[:4], p2[:4])
    for method in ("pchip", "cubic"):
        assert bd_rate(*case, method=method) == pytest.approx(_ref(bjontegaard.bd_rate, case, method), abs=TOL)


def test_numpy_arrays_accepted():
    r1, p1, r2, p2 = (np.asarray(v, dtype=float) for v in REFERENCE_CASES["hevc_classD"])
    assert bd_rate(r1, p1, r2, p2) == bd_rate(list(r1), list(p1), list(r2), list(p2))


def test_module_does_not_import_bjontegaard():
    tree = ast.parse(Path(bdrate.__file__).read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "bjontegaard" not in imported


# --------------------------------------------------------------------------------------- properties
@st.composite
def rd_curves(draw, min_size=4, max_size=7):
    """A strictly monotonic RD curve with HEVC-like magnitudes (any shape, kinks included)."""
    n = draw(st.integers(min_size, max_size))
    r0 = draw(st.floats(10.0, 10_000.0))
    ratios = draw(st.lists(st.floats(1.1, 4.0), min_size=n - 1, max_size=n - 1))
    p0 = draw(st.floats(25.0, 40.0))
    steps = draw(st.lists(st.floats(0.2, 4.0), min_size=n - 1, max_size=n - 1))
    rates = [r0]
    psnr = [p0]
    for ratio, step in zip(ratios, steps):
        rates.append(rates[-1] * ratio)
        psnr.append(psnr[-1] + step)
    return rates, psnr


@st.composite
def log_linear_curves(draw):
    """PSNR = a + b * log10(rate) at random rates: a shape on which the cubic fit is monotonic too."""
    n = draw(st.integers(4, 7))
    r0 = draw(st.floats(10.0, 10_000.0))
    ratios = draw(st.lists(st.floats(1.2, 4.0), min_size=n - 1, max_size=n - 1))
    a = draw(st.floats(10.0, 30.0))
    b = draw(st.floats(4.0, 15.0))
    rates = [r0]
    for ratio in ratios:
        rates.append(rates[-1] * ratio)
    return rates, [a + b * math.log10(r) for r in rates]


METHODS = st.sampled_from(["pchip", "cubic"])


@settings(max_examples=60, deadline=None)
@given(curve=rd_curves(), method=METHODS)
def test_identical_curves_give_zero(curve, method):
    rates, psnr = curve
    assert bd_rate(rates, psnr, rates, psnr, method=method) == pytest.approx(0.0, abs=1e-9)
    assert bd_psnr(rates, psnr, rates, psnr, method=method) == pytest.approx(0.0, abs=1e-9)


@settings(max_examples=80, deadline=None)
@given(curve=rd_curves(), k=st.floats(0.1, 10.0), method=METHODS)
def test_scaled_rates_give_exact_percentage(curve, k, method):
    rates, psnr = curve
    scaled = [k * r for r in rates]
    assert bd_rate(rates, psnr, scaled, psnr, method=method) == pytest.approx((k - 1.0) * 100.0, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(curve=rd_curves(), d=st.floats(-1.0, 1.0), method=METHODS)
def test_shifted_psnr_gives_exact_bd_psnr(curve, d, method):
    rates, psnr = curve
    assert bd_psnr(rates, psnr, rates, [p + d for p in psnr], method=method) == pytest.approx(d, abs=1e-9)


@settings(max_examples=80, deadline=None)
@given(curve=rd_curves(), k=st.floats(0.5, 2.0), frac=st.floats(0.02, 0.7))
def test_higher_test_psnr_lowers_bd_rate_pchip(curve, k, frac):
    # PCHIP preserves monotonicity, so for any strictly monotonic curve a test curve that reaches a
    # higher PSNR at the same rates needs less rate at every PSNR: BD-rate drops below (k - 1) * 100.
    rates, psnr = curve
    d = frac * (psnr[-1] - psnr[0])
    scaled = [k * r for r in rates]
    base = bd_rate(rates, psnr, scaled, psnr)
    up = bd_rate(rates, psnr, scaled, [p + d for p in psnr])
    down = bd_rate(rates, psnr, scaled, [p - d for p in psnr])
    assert up < base < down


@settings(max_examples=60, deadline=None)
@given(curve=log_linear_curves(), frac=st.floats(0.02, 0.7))
def test_higher_test_psnr_lowers_bd_rate_cubic(curve, frac):
    rates, psnr = curve
    d = frac * (psnr[-1] - psnr[0])
    assert bd_rate(rates, psnr, rates, [p + d for p in psnr], method="cubic") < 0.0
    assert bd_rate(rates, psnr, rates, [p - d for p in psnr], method="cubic") > 0.0


# --------------------------------------------------------------------------------------------- errors
GOOD_R, GOOD_P = [100.0, 300.0, 900.0, 2700.0], [30.0, 33.0, 36.0, 39.0]


def _raises(match, *args, **kwargs):
    with pytest.raises(UsageError, match=match) as info:
        bd_rate(*args, **kwargs)
    assert isinstance(info.value, ValueError) and isinstance(info.value, NlfError)
    return info.value


def test_too_few_points_says_how_many():
    _raises(r"at least 4 RD points.*3 given", GOOD_R[:3], GOOD_P[:3], GOOD_R, GOOD_P)
    _raises(r"test: .*at least 4.*2 given", GOOD_R, GOOD_P, GOOD_R[:2], GOOD_P[:2])
    with pytest.raises(UsageError, match="3 given"):
        bd_psnr(GOOD_R[:3], GOOD_P[:3], GOOD_R, GOOD_P)


def test_exactly_four_points_accepted():
    assert bd_rate(GOOD_R, GOOD_P, GOOD_R, GOOD_P, method="cubic") == pytest.approx(0.0, abs=1e-9)


def test_mismatched_lengths():
    _raises(r"anchor: 4 rates but 5 PSNR", GOOD_R, GOOD_P + [40.0], GOOD_R, GOOD_P)


@pytest.mark.parametrize("bad", [0.0, -5.0])
def test_non_positive_rate(bad):
    _raises(r"anchor: rate of point 2 .*positive", [100.0, 300.0, bad, 2700.0], GOOD_P, GOOD_R, GOOD_P)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_values(bad):
    _raises(r"test: PSNR of point 1 .*finite", GOOD_R, GOOD_P, GOOD_R, [30.0, bad, 36.0, 39.0])
    _raises(r"anchor: rate of point 3 .*finite", [100.0, 300.0, 900.0, bad], GOOD_P, GOOD_R, GOOD_P)


@pytest.mark.parametrize("values, shown", [
    ([100.0, 300.0, -5.0, 2700.0], "rate of point 2 is -5; rates must be positive"),
    (np.array([100.0, 300.0, 0.25, 2700.0]) * -1, "rate of point 0 is -100; rates must be positive"),
    ([100.0, 300.0, math.nan, 2700.0], "rate of point 2 is nan; all values must be finite"),
    (np.array([100.0, 300.0, 900.0, -math.inf]), "rate of point 3 is -inf; all values must be finite"),
])
def test_bad_values_are_shown_as_plain_numbers(values, shown):
    """The numbers in a message are written plainly (``-5``, ``nan``), never as a numpy repr
    (``np.float64(-5.0)``), whether the input is a list or an array."""
    err = _raises(re.escape(shown), values, GOOD_P, GOOD_R, GOOD_P)
    assert "np." not in str(err) and "float64" not in str(err)


def test_non_monotonic_curve_names_the_point():
    err = _raises(r"not strictly monotonic: point 2 \(rate 900, PSNR 32.5\).*point 1",
                  GOOD_R, [30.0, 33.0, 32.5, 39.0], GOOD_R, GOOD_P)
    assert "anchor" in str(err)
    _raises(r"test: .*not strictly monotonic", GOOD_R, GOOD_P, GOOD_R, [30.0, 33.0, 33.0, 39.0])
    _raises(r"same rate", GOOD_R, GOOD_P, [100.0, 300.0, 300.0, 2700.0], GOOD_P)


def test_no_overlap():
    _raises(r"do not overlap in PSNR", GOOD_R, GOOD_P, GOOD_R, [p + 10.0 for p in GOOD_P])
    _raises(r"do not overlap in PSNR", GOOD_R, GOOD_P, GOOD_R, [p + 9.0 for p in GOOD_P])  # touching
    with pytest.raises(UsageError, match="do not overlap in rate"):
        bd_psnr(GOOD_R, GOOD_P, [r * 100 for r in GOOD_R], GOOD_P)


def test_partial_overlap_is_logged(caplog):
    with caplog.at_level("WARNING", logger="hevc_ext.bdrate"):
        bd_rate(GOOD_R, GOOD_P, GOOD_R, [p + 6.0 for p in GOOD_P])
    assert "overlap" in caplog.text


def test_unknown_method_and_bad_shapes():
    _raises(r"unknown BD interpolation method 'akima'", GOOD_R, GOOD_P, GOOD_R, GOOD_P, method="akima")
    _raises(r"1-D", [GOOD_R], [GOOD_P], GOOD_R, GOOD_P)
    _raises(r"sequence of numbers", ["a", "b", "c", "d"], GOOD_P, GOOD_R, GOOD_P)
