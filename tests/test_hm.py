"""The HM backend: log parser on real HM-16.17/16.20 logs, locating HM, failures, and end-to-end runs.

The parser and availability tests need nothing. A stub "HM" (shell scripts printing what HM prints)
exercises the failure paths. Tests marked ``hm`` run the real HM when it is found
(``HEVC_NLF_HM_DIR`` or third_party/HM) and are skipped otherwise.
"""

from __future__ import annotations

import json
import stat
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from hevc_ext import cli
from hevc_ext.backends import CodingConfig
from hevc_ext.backends import hm as hm_mod
from hevc_ext.backends.hm import (HM_DIR_ENV, HMBackend, cfg_gop_size, compare_with_av, hevc_level,
                                  hm_decode)
from hevc_ext.errors import BackendError, BackendUnavailableError, UsageError
from hevc_ext.hmlog import (display_order, display_order_bits, parse_decoder_log, parse_encoder_log,
                            parse_picture_line, parse_version)
from hevc_ext.metrics import PsnrAccumulator
from hevc_ext.yuv import VideoFormat, VideoWriter, open_video

from .conftest import synthetic_frames

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hm"
BANNER_1617 = "HM software: Encoder Version [16.17] (including RExt)[Linux][GCC 12.2.0][64 bit]"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


# ------------------------------------------------------------------------------------------- parser
def test_version_banner_16_17_and_16_20():
    assert parse_version(fixture("hm16.17_ra_q37_3f.log")) == ("16.17", BANNER_1617)
    assert parse_version(fixture("hm16.20_ra_q37_3f.log"))[0] == "16.20"
    assert parse_decoder_log(fixture("hm16.17_dec_ra_q37_3f.log"))[0] == "16.17"
    assert parse_decoder_log(fixture("hm16.20_dec_ra_q37_3f.log"))[0] == "16.20"
    assert parse_version("no banner here") is None


def test_ra_log_coding_order_mapped_to_display_order():
    log = parse_encoder_log(fixture("hm16.17_ra_q37_3f.log"))
    assert log.complete
    # coding order: I0, then the hierarchical B pictures 2 and 1 (TId 3, 4); RA's IntraQPOffset -3
    assert [(p.poc, p.slice_type, p.tid, p.qp, p.bits) for p in log.pictures] == [
        (0, "I", 0, 34, 28088), (2, "B", 3, 45, 1296), (1, "B", 4, 46, 360)]
    assert log.pictures[1].psnr == {"y": 32.2806, "u": 38.3223, "v": 37.9055}
    assert display_order_bits(log.pictures, 3) == [28088, 360, 1296]
    assert [p.poc for p in display_order(log.pictures)] == [0, 1, 2]
    # per-picture bits (start codes included, SEI excluded) add up to the file: no SEI in the CTC cfgs
    assert sum(p.bits for p in log.pictures) == 8 * log.bytes_written == 8 * 3718
    assert log.settings["Intra period"] == "32" and log.settings["GOP size"] == "16"
    assert log.settings["Internal bit depth"] == "(Y:8, C:8)"
    assert log.total_seconds == pytest.approx(2.616)


def test_ra_summary_values():
    log = parse_encoder_log(fixture("hm16.17_ra_q37_3f.log"))
    a = log.summary["all"]
    assert a.frames == 3 and a.kbps == 495.7333
    assert a.psnr == {"y": 33.0865, "u": 38.4258, "v": 38.1151, "yuv": 34.1640}
    assert log.summary["I"].frames == 1 and log.summary["I"].kbps == 1404.4
    assert log.summary["B"].frames == 2 and log.summary["B"].psnr["y"] == 32.4965
    p = log.summary["P"]  # "-nan" for a slice type without pictures
    assert p.frames == 0 and p.kbps is None and set(p.psnr.values()) == {None}
    # HM's bitrate: the per-picture bits times its frame rate (50) per picture
    assert round(sum(x.bits for x in log.pictures) * 50 / 3 / 1000, 4) == a.kbps
    assert log.bytes_written == 3718 and log.kbps_written == 495.733
    # per-picture PSNRs average to the SUMMARY (HM: the mean of per-picture PSNRs)
    for c in "yuv":
        assert np.mean([x.psnr[c] for x in log.pictures]) == pytest.approx(a.psnr[c], abs=1e-4)


def test_hm_16_17_and_16_20_logs_parse_the_same():
    a = parse_encoder_log(fixture("hm16.17_ra_q37_3f.log"))
    b = parse_encoder_log(fixture("hm16.20_ra_q37_3f.log"))  # trailing spaces, extra xPSNR setting line
    assert b.settings["xPSNR calculation"] == "Disabled" and "xPSNR calculation" not in a.settings
    assert a.pictures == b.pictures
    assert {k: v.as_dict() for k, v in a.summary.items()} == {k: v.as_dict() for k, v in b.summary.items()}
    assert a.bytes_written == b.bytes_written == 3718


@pytest.mark.parametrize("name, types, bits, kbps", [
    ("hm16.17_ldp_q37_3f.log", "IPP", [21800, 776, 1128], 395.0667),
    ("hm16.17_ldb_q37_3f.log", "IBB", [21800, 704, 1128], 393.8667),
])
def test_low_delay_logs(name, types, bits, kbps):
    log = parse_encoder_log(fixture(name))
    assert [p.poc for p in log.pictures] == [0, 1, 2]  # low delay: coding order = display order
    assert "".join(p.slice_type for p in log.pictures) == types
    assert [p.qp for p in log.pictures] == [36, 45, 44]  # LD: I at QP-1, then the GOP's QP offsets
    assert display_order_bits(log.pictures, 3) == bits
    assert log.summary["all"].kbps == kbps
    assert sum(bits) == 8 * log.bytes_written
    assert log.settings["Intra period"] == "-1" and log.settings["GOP size"] == "4"


def test_decoder_log():
    version, pics = parse_decoder_log(fixture("hm16.17_dec_ra_q37_3f.log"))
    assert [(p.poc, p.slice_type, p.qp, p.bits, p.hash_status) for p in pics] == [
        (0, "I", 34, None, None), (2, "B", 45, None, None), (1, "B", 46, None, None)]


def test_picture_line_variants():
    # non-referenced picture (lower case), without nQP, later versions' LId and NAL type, extra fields
    p = parse_picture_line("POC   17 TId: 4 ( b-SLICE, QP 41 )        312 bits [Y 30.1000 dB    U 40.0000 dB    "
                           "V 39.5000 dB] [xPSNR 31.2000 dB] [Y MSE 3.1  U MSE 1.0  V MSE 1.1] [ET     0 ]")
    assert (p.poc, p.slice_type, p.referenced, p.qp, p.nqp, p.bits) == (17, "B", False, 41, None, 312)
    assert p.psnr == {"y": 30.1, "u": 40.0, "v": 39.5}
    p = parse_picture_line("POC    0 LId:  0 TId: 0 ( IDR_W_RADL, I-SLICE, nQP 32 QP 32 )     100 bits "
                           "[Y 40.0000 dB    U 42.0000 dB    V 43.0000 dB]")
    assert (p.poc, p.slice_type, p.qp, p.bits) == (0, "I", 32, 100)
    ok = parse_picture_line("POC    1 TId: 0 ( P-SLICE, QP 35 ) [DT  0.001] [L0 0 ] [L1 ] [MD5:0a1b2c,(OK)] ")
    bad = parse_picture_line("POC    1 TId: 0 ( P-SLICE, QP 35 ) [DT  0.001] [MD5:0a1b2c,(***ERROR***)] ")
    assert ok.hash_status == "OK" and bad.hash_status == "ERROR"
    assert parse_picture_line("POC order: 0 1 2") is None


def test_summary_read_by_column_names():
    text = ("SUMMARY --------------------------------------------------------\n"
            "\tTotal Frames |   Bitrate     Y-PSNR    U-PSNR    V-PSNR    YUV-PSNR      xPSNR    Y-MSE     "
            "U-MSE     V-MSE     YUV-MSE  \n"
            "\t        2    a     100.5000   40.0000   41.0000   42.0000   40.5000   39.0000    6.5000    "
            "4.0000    3.0000    5.6000\n"
            "Bytes written to file: 100 (0.800 kbps)\n")
    log = parse_encoder_log(text)
    row = log.summary["all"]
    assert row.kbps == 100.5 and row.psnr == {"y": 40.0, "u": 41.0, "v": 42.0, "yuv": 40.5}
    assert row.extra["xpsnr"] == 39.0 and row.extra["yuv-mse"] == 5.6


def test_incomplete_log_and_bad_poc_sets():
    text = fixture("hm16.17_ra_q37_3f.log")
    cut = parse_encoder_log(text[: text.index("SUMMARY")])
    assert not cut.complete and len(cut.pictures) == 3
    pics = parse_encoder_log(text).pictures
    with pytest.raises(BackendError, match="no record for POC 1 "):
        display_order_bits(pics[:2], 3)  # coding order 0, 2, 1: POC 1 missing
    with pytest.raises(BackendError, match="twice"):
        display_order_bits(pics + pics[:1], 3)
    with pytest.raises(BackendError, match="outside"):
        display_order_bits(pics, 2)


def test_yuv_psnr_matches_hm_summary():
    """HM's YUV-PSNR is the PSNR of the 4:1:1-weighted mean MSE, not a mean of per-picture values."""
    log = parse_encoder_log(fixture("hm16.17_ra_q37_3f.log"))
    w, h = 416, 240
    acc = PsnrAccumulator(8, (w * h, w * h // 4, w * h // 4))
    for p in display_order(log.pictures):  # SSE back from HM's 4-decimal PSNRs
        acc.add([round(n * 255 ** 2 / 10 ** (p.psnr[c] / 10)) for c, n in zip("yuv", acc.sizes)])
    assert acc.yuv_psnr() == pytest.approx(log.summary["all"].psnr["yuv"], abs=2e-4)
    rows = acc.per_frame()  # the other definition, a mean of per-picture weighted values, is not HM's
    assert np.mean([(6 * r["y"] + r["u"] + r["v"]) / 8 for r in rows]) != pytest.approx(log.summary["all"].psnr["yuv"], abs=2e-3)


@pytest.mark.parametrize("w, h, fps, level", [
    (416, 240, 50, "2.1"), (416, 240, 60, "2.1"), (832, 480, 60, "3.1"), (1280, 720, 60, "4"),
    (1920, 1080, 50, "4.1"), (1920, 1080, 24, "4"), (2560, 1600, 30, "5"), (64, 64, 30, "1"),
    (8192, 4320, 120, "6.2"),
])
def test_level_table_gives_the_ctc_levels(w, h, fps, level):
    assert hevc_level(w, h, fps) == level


def test_cfg_gop_size(tmp_path):
    cfg = tmp_path / "x.cfg"
    cfg.write_text("IntraPeriod : 32\nGOPSize                       : 16           # GOP Size\n")
    assert cfg_gop_size(cfg) == 16
    assert cfg_gop_size(tmp_path / "missing.cfg") is None


# -------------------------------------------------------------------------------------- availability
def test_unavailable_names_env_var_and_readme(tmp_path, monkeypatch):
    monkeypatch.setenv(HM_DIR_ENV, str(tmp_path))
    backend = HMBackend()
    ok, why = backend.availability()
    assert not ok
    for text in (HM_DIR_ENV, str(tmp_path), "bin/TAppEncoderStatic", "bin/TAppDecoderStatic",
                 "cfg/encoder_randomaccess_main.cfg", "third_party/README.md", "vcgit.hhi.fraunhofer.de/jvet/HM",
                 "HM-16.17"):
        assert text in why
    with pytest.raises(BackendUnavailableError, match=HM_DIR_ENV):
        backend.encode(None, CodingConfig(), tmp_path)  # type: ignore[arg-type]
    with pytest.raises(BackendUnavailableError, match="third_party/README.md"):
        backend.version()


def test_unavailable_without_env_var(tmp_path, monkeypatch):
    monkeypatch.delenv(HM_DIR_ENV, raising=False)
    monkeypatch.setattr(hm_mod, "repo_hm_dir", lambda: tmp_path / "third_party" / "HM")
    ok, why = HMBackend().availability()
    assert not ok and f"{HM_DIR_ENV} is not set" in why and "does not exist" in why
    assert "third_party/README.md" in why


def test_cli_encode_without_hm_explains_and_fails(tmp_path, monkeypatch, capsys, make_clip):
    monkeypatch.setenv(HM_DIR_ENV, str(tmp_path / "nowhere"))
    clip = make_clip(2, 64, 64)
    rc = cli.main(["encode", str(clip), "--codec", "hm", "--frames", "2", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc != 0
    assert HM_DIR_ENV in err and "third_party/README.md" in err and "does not exist" in err
    assert not (tmp_path / "out.hevc").exists()


def test_bad_options():
    with pytest.raises(UsageError, match="reconstruction check"):
        HMBackend(decoder="ffmpeg")
    with pytest.raises(UsageError, match="timeout"):
        HMBackend(timeout=0)


# ------------------------------------------------------------------------------------ a stub "HM"
def _stub_hm(root: Path, encoder_body: str) -> Path:
    """A directory shaped like an HM build whose programs are shell scripts."""
    (root / "bin").mkdir(parents=True)
    (root / "cfg").mkdir()
    for name in hm_mod.CFG_FILES.values():
        (root / "cfg" / name).write_text(f"GOPSize : {16 if 'random' in name else 4}\n")
    help_part = f'if [ "$1" = "--help" ]; then echo; echo "{BANNER_1617} "; exit 1; fi\n'
    for name, body in (("TAppEncoderStatic", help_part + encoder_body), ("TAppDecoderStatic", "exit 1\n")):
        path = root / "bin" / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return root


@pytest.fixture
def clip_source(make_clip):
    return open_video(str(make_clip(3, 64, 64)))


@pytest.mark.skipif(sys.platform == "win32", reason="shell-script stub")
def test_stub_version_and_failure_carries_command_and_log_tail(tmp_path, clip_source):
    body = 'echo; echo "HM software: Encoder Version [16.17]"\necho "Error: stub failure at line 7"\n' \
           'echo "stub stderr" >&2\nexit 1\n'
    backend = HMBackend(hm_dir=_stub_hm(tmp_path / "hm", body))
    assert backend.availability()[0] and backend.version() == "HM-16.17"
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(BackendError) as info:
        backend.encode(clip_source, CodingConfig("ldp", 30, frames=2), work)
    text = str(info.value)
    assert "exit code 1" in text and "Error: stub failure at line 7" in text and "stub stderr" in text
    assert "TAppEncoderStatic -c" in text and "encoder_lowdelay_P_main.cfg" in text and "-q 30" in text
    assert (work / "hm_encoder.log").read_text().strip().endswith("Error: stub failure at line 7")


@pytest.mark.skipif(sys.platform == "win32", reason="shell-script stub")
def test_stub_incomplete_log_is_an_error(tmp_path, clip_source):
    # HM exits with 0 when it cannot open its input; the log then has no SUMMARY
    body = 'echo "HM software: Encoder Version [16.17]"\necho "failed to open Input YUV file"\nexit 0\n'
    backend = HMBackend(hm_dir=_stub_hm(tmp_path / "hm", body))
    with pytest.raises(BackendError, match="(?s)without its SUMMARY.*failed to open Input YUV file"):
        backend.encode(clip_source, CodingConfig("ra", 30, frames=2), tmp_path)


@pytest.mark.skipif(sys.platform == "win32", reason="shell-script stub")
def test_stub_timeout(tmp_path, clip_source):
    backend = HMBackend(hm_dir=_stub_hm(tmp_path / "hm", "echo started\nexec sleep 30\n"), timeout=0.5)
    with pytest.raises(BackendError, match="did not finish within 0.5 s"):
        backend.encode(clip_source, CodingConfig("ra", 30, frames=2), tmp_path)


@pytest.mark.skipif(sys.platform == "win32", reason="shell-script stub")
def test_intra_period_must_be_a_multiple_of_hm_gop(tmp_path, clip_source):
    backend = HMBackend(hm_dir=_stub_hm(tmp_path / "hm", "exit 1\n"))
    with pytest.raises(UsageError, match="GOPSize 16.*--intra-period 40.*32, 64, 128, 256"):
        backend.encode(clip_source, CodingConfig("ra", 30, intra_period=40, frames=2), tmp_path)


def test_timeout_from_environment(monkeypatch):
    monkeypatch.setenv(hm_mod.HM_TIMEOUT_ENV, "12.5")
    assert hm_mod._default_timeout() == 12.5
    monkeypatch.setenv(hm_mod.HM_TIMEOUT_ENV, "soon")
    with pytest.raises(UsageError, match=hm_mod.HM_TIMEOUT_ENV):
        hm_mod._default_timeout()


# --------------------------------------------------------------------------- end to end with real HM
@pytest.fixture(scope="module")
def real_hm() -> HMBackend:
    backend = HMBackend()
    ok, why = backend.availability()
    if not ok:
        pytest.skip(f"HM not found; set {HM_DIR_ENV} to run these (third_party/README.md)")
    return backend


def _write_clip(path: Path, n: int, w: int, h: int, bitdepth: int = 8, y4m: bool = False) -> Path:
    frames = synthetic_frames(n, w, h, bitdepth)
    fmt = VideoFormat(w, h, Fraction(30), bitdepth)
    with open(path, "wb") as f:
        writer = VideoWriter(f, fmt, y4m=y4m)
        for rec in frames:
            writer.write((rec["y"], rec["u"], rec["v"]))
    return path


@pytest.mark.hm
@pytest.mark.parametrize("mode", ["ra", "ldp", "ldb"])
def test_e2e_cli_encode_with_hm(real_hm, tmp_path, capsys, mode):
    clip = _write_clip(tmp_path / "Synth_64x64_30.yuv", 5, 64, 64)
    rc = cli.main(["encode", str(clip), "--codec", "hm", "--mode", mode, "--qp", "32", "--iterations", "5",
                   "--gop", "2", "--json", "--per-frame", "-o", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    rep = json.loads(captured.out)
    s = rep["backend_summary"]
    assert rep["codec"] == "hm" and rep["codec_version"] == f"HM-{s['hm_version']}"
    assert s["cfg"].endswith(hm_mod.CFG_FILES[(mode, 8)]) and s["level"] == "1"
    assert any("TAppEncoderStatic" in c and "-q 32" in c for c in rep["commands"])
    # rate: HM's per-picture bits (display order) add up to the file; no SEI in the CTC configurations
    assert sum(rep["per_frame"]["hevc_bits"]) == 8 * rep["hevc_bytes"]
    assert s["hm_picture_bits"] == 8 * rep["hevc_bytes"] and s["ours_minus_hm"]["bits_not_in_hm_pictures"] == 0
    assert s["ours"]["kbps"] == pytest.approx(s["hm_summary"]["all"]["kbps"], abs=1e-3)
    # distortion: ours from the files vs HM's SUMMARY, within HM's 4-decimal printing (+ float noise)
    for c in ("y", "u", "v", "yuv"):
        assert abs(s["ours_minus_hm"][f"psnr_{c}"]) <= 1e-4
    assert s["ours_minus_hm"]["per_picture_psnr_max_abs"] <= 1e-4
    assert rep["psnr_before"]["y"] == pytest.approx(s["hm_summary"]["all"]["psnr_y"], abs=1e-4)
    assert s["decoder_check"]["av_identical"] is True
    assert Path(str(tmp_path / "out") + ".hevc").stat().st_size == rep["hevc_bytes"]
    # the decoder side (av) reproduces what the encoder measured
    assert cli.main(["decode", str(tmp_path / "out.hevc"), "--sidecar", str(tmp_path / "out.nlf"),
                     "-o", str(tmp_path / "dec.yuv")]) == 0


@pytest.mark.hm
def test_e2e_hm_decoder_and_av_give_identical_pictures(real_hm, tmp_path):
    clip = _write_clip(tmp_path / "Synth_64x64_30.yuv", 5, 64, 64)
    backend = HMBackend(hm_dir=real_hm.hm_dir, decoder="both")
    with open_video(str(clip)) as src:
        res = backend.encode(src, CodingConfig("ra", 37, frames=5), tmp_path)
    assert res.summary["decoder_check"]["av_identical"] and res.summary["decoder_check"]["hm_decoder_identical"]
    dec = hm_decode(res.bitstream, tmp_path / "again.yuv", workdir=tmp_path)
    assert dec.pictures == 5 and dec.version == res.summary["hm_version"]
    assert (tmp_path / "again.yuv").read_bytes() == Path(res.recon.origin).read_bytes()
    same, count, _ = compare_with_av(res.bitstream, open_video(str(tmp_path / "again.yuv"), size="64x64", fps=30))
    assert same and count == 5
    assert len(res.commands) == 2 and "TAppDecoderStatic" in res.commands[1][0]


@pytest.mark.hm
def test_e2e_picture_hash_sei_is_the_rate_difference(real_hm, tmp_path):
    clip = _write_clip(tmp_path / "Synth_64x64_30.yuv", 4, 64, 64)
    with open_video(str(clip)) as src:
        res = HMBackend(hm_dir=real_hm.hm_dir, decoder="hm").encode(
            src, CodingConfig("ldb", 32, frames=4, extra=("--SEIDecodedPictureHash=1",)), tmp_path)
    s = res.summary
    extra_bits = 8 * res.bitstream.stat().st_size - sum(res.frame_bits)
    assert extra_bits > 0 and (extra_bits // 8) % 4 == 0  # one MD5 SEI per picture, not in HM's bits
    assert s["ours_minus_hm"]["bits_not_in_hm_pictures"] == extra_bits
    assert s["ours_minus_hm"]["kbps"] == pytest.approx(extra_bits * 30 / 4 / 1000, abs=1e-3)
    assert any("SEI" in note for note in s["notes"])
    dec = hm_decode(res.bitstream, tmp_path / "d.yuv", workdir=tmp_path)
    assert dec.hash_checked == 4  # HM's decoder verified every picture's MD5


@pytest.mark.hm
@pytest.mark.parametrize("w, h, bitdepth, y4m", [(64, 64, 10, False), (72, 36, 8, False), (64, 48, 8, True)])
def test_e2e_main10_padding_and_y4m_input(real_hm, tmp_path, w, h, bitdepth, y4m):
    name = f"Synth_{w}x{h}_30" + ("_10bit" if bitdepth == 10 else "") + (".y4m" if y4m else ".yuv")
    clip = _write_clip(tmp_path / name, 3, w, h, bitdepth, y4m)
    with open_video(str(clip)) as src:
        res = real_hm.encode(src, CodingConfig("ra", 32, intra_period=64, frames=3), tmp_path)
        ref = [src[i] for i in range(3)]
    cmd = " ".join(res.commands[0])
    assert f"--InternalBitDepth={bitdepth}" in cmd and "--IntraPeriod=64" in cmd
    assert ("main10.cfg" in cmd) == (bitdepth == 10)
    assert ("--ConformanceWindowMode=1" in cmd) == (w % 8 != 0 or h % 8 != 0)
    assert ("hm_input.yuv" in cmd) == y4m
    assert res.recon.fmt.bitdepth == bitdepth and res.recon[0].y.shape == (h, w)
    assert res.summary["decoder_check"]["av_identical"]
    assert abs(res.summary["ours_minus_hm"]["psnr_y"]) <= 1e-4
    assert not np.array_equal(ref[0].y, res.recon[0].y)  # lossy, and compared against the right source
