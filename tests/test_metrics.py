"""PSNR the way HM reports it (hevc_ext/metrics.py): expected values computed by hand from HM's formulas."""

from __future__ import annotations

import math

import pytest

from hevc_ext.metrics import LOSSLESS_PSNR, PsnrAccumulator, psnr_from_sse


def test_psnr_8bit_peak_is_255():
    # 10·log10(255² · N / SSE) with SSE = 255² = 65025 and N = 1000: 10·log10(1000) = 30 dB exactly
    assert psnr_from_sse(65025, 1000, 8) == pytest.approx(30.0, abs=1e-9)
    # SSE = 255², N = 10^5: 10·log10(10^5) = 50 dB
    assert psnr_from_sse(65025, 100_000, 8) == pytest.approx(50.0, abs=1e-9)


def test_psnr_10bit_peak_is_255_shifted_not_1023():
    # HM: maxval = 255 << 2 = 1020 for 10-bit (not 1023); 1020² = 1040400
    assert psnr_from_sse(1040400, 1000, 10) == pytest.approx(30.0, abs=1e-9)
    # with 1023 the same SSE would give 30 + 20·log10(1023/1020) ≈ 30.0255 dB
    assert psnr_from_sse(1040400, 1000, 10) < 30.01
    # 12-bit: 255 << 4 = 4080, 4080² = 16646400
    assert psnr_from_sse(16646400, 10_000, 12) == pytest.approx(40.0, abs=1e-9)


def test_psnr_lossless_plane():
    assert psnr_from_sse(0, 1000, 8) == LOSSLESS_PSNR == 999.99
    assert psnr_from_sse(0, 1000, 10) == LOSSLESS_PSNR


def test_yuv_psnr_is_hms_weighted_mean_error():
    # N = 10^5 samples per plane, 8-bit: SSE 6502500 → 30 dB, 650250 → 40 dB, 65025 → 50 dB
    acc = PsnrAccumulator(8, (100_000, 100_000, 100_000))
    acc.add([6502500, 650250, 65025])  # Y 30, U 40, V 50: (6·30 + 40 + 50) / 8 = 33.75
    acc.add([650250, 65025, 6502500])  # Y 40, U 50, V 30: (6·40 + 50 + 30) / 8 = 40.0
    frames = acc.per_frame()
    assert frames[0] == pytest.approx({"y": 30.0, "u": 40.0, "v": 50.0}, abs=1e-9)
    assert acc.mean() == pytest.approx({"y": 35.0, "u": 45.0, "v": 40.0}, abs=1e-9)
    # HM: the PSNR of the mean MSE per plane (Y 35.76375, U 3.576375, V 32.837625), weighted 4:1:1 for
    # 4:2:0 planes of 4N, N, N samples; here all planes have N samples, so the weights are 1:1:1
    assert acc.yuv_psnr() == pytest.approx(10 * math.log10(255 ** 2 / ((35.76375 + 3.576375 + 32.837625) / 3)), abs=1e-9)
    acc420 = PsnrAccumulator(8, (400_000, 100_000, 100_000))
    acc420.add([4 * 6502500, 650250, 65025])  # the same per-sample errors
    acc420.add([4 * 650250, 65025, 6502500])
    assert acc420.yuv_psnr() == pytest.approx(10 * math.log10(255 ** 2 / ((4 * 35.76375 + 3.576375 + 32.837625) / 6)),
                                              abs=1e-9)
    assert acc420.yuv_psnr() != pytest.approx((33.75 + 40) / 2, abs=0.1)  # not the mean of (6Y+U+V)/8
