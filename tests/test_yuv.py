from __future__ import annotations

import io
from fractions import Fraction

import numpy as np
import pytest

from hevc_ext.errors import InputFormatError, TruncatedInputError, UsageError
from hevc_ext.files import atomic_output
from hevc_ext.yuv import (Frame, VideoFormat, VideoWriter, format_from_name, open_video,
                          resolve_format, y4m_header)

from .conftest import synthetic_frames


@pytest.mark.parametrize("name, expected", [
    ("BasketballPass_416x240_50.yuv", (416, 240, Fraction(50), None)),
    ("Tiny_8x8_25.yuv", (8, 8, Fraction(25), None)),
    ("NebutaFestival_2560x1600_60_10bit_crop.yuv", (2560, 1600, Fraction(60), 10)),
    ("Traffic_2560x1600_30_crop.yuv", (2560, 1600, Fraction(30), None)),
    ("clip_1920x1080_29.97.yuv", (1920, 1080, Fraction(2997, 100), None)),
    ("foo_352x288.yuv", (352, 288, None, None)),
    ("nothing.yuv", None),
])
def test_format_from_name(name, expected):
    assert format_from_name(name) == expected


def test_resolve_format_errors_and_overrides(caplog):
    with caplog.at_level("WARNING", logger="hevc_ext.yuv"):
        fmt = resolve_format("x_64x48_30.yuv", size="32x16", fps="25", bitdepth=10)
    assert (fmt.width, fmt.height, fmt.fps, fmt.bitdepth) == (32, 16, 25, 10)
    # options that contradict the name win, with a warning each (the name gives no bit depth here)
    assert [r.getMessage() for r in caplog.records] == [
        "x_64x48_30.yuv: the size given (32x16) overrides the 64x48 in the file name",
        "x_64x48_30.yuv: the frame rate given (25) overrides the 30 in the file name"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="hevc_ext.yuv"):
        resolve_format("x_64x48_30_10bit.yuv", size="64x48", fps="30", bitdepth=10)  # agreeing: silent
    assert caplog.records == []
    with pytest.raises(UsageError, match="--size"):
        resolve_format("noname.yuv")
    with pytest.raises(UsageError, match="--fps"):
        resolve_format("foo_352x288.yuv")
    with pytest.raises(UsageError, match="even"):
        VideoFormat(33, 16)


@pytest.mark.parametrize("bitdepth", [8, 10])
def test_raw_roundtrip_memmap(tmp_path, bitdepth):
    frames = synthetic_frames(3, 32, 16, bitdepth)
    path = tmp_path / f"c_32x16_30{'_10bit' if bitdepth == 10 else ''}.yuv"
    frames.tofile(path)
    src = open_video(str(path))
    assert len(src) == 3 and src.fmt.bitdepth == bitdepth and src.random_access
    assert src[1].y.dtype == (np.uint8 if bitdepth == 8 else np.uint16)
    assert isinstance(src[1].y, np.ndarray) and not np.issubdtype(src[1].y.dtype, np.floating)
    for i in range(3):
        np.testing.assert_array_equal(src[i].y, frames[i]["y"])
        np.testing.assert_array_equal(src[i].v, frames[i]["v"])
    # y4m round trip through the writer
    out = tmp_path / "c.y4m"
    with atomic_output(out) as f:
        w = VideoWriter(f, src.fmt, y4m=True)
        for fr in src:
            w.write(fr)
    back = open_video(str(out))
    assert back.fmt == src.fmt and len(back) == 3
    np.testing.assert_array_equal(back[2].u, frames[2]["u"])


def test_truncated_and_wrong_size(tmp_path):
    frames = synthetic_frames(2, 32, 16)
    path = tmp_path / "t_32x16_30.yuv"
    path.write_bytes(frames.tobytes()[:-10])
    with pytest.raises(TruncatedInputError, match=r"1 frames and 758 bytes left over"):
        open_video(str(path))
    with pytest.raises(TruncatedInputError, match="--size"):
        open_video(str(path), size="30x16")
    with pytest.raises(InputFormatError, match="no such file"):
        open_video(str(tmp_path / "missing_32x16_30.yuv"))


def test_y4m_stdin_stream_and_errors():
    fmt = VideoFormat(16, 8, Fraction(30000, 1001), 8)
    frames = synthetic_frames(2, 16, 8)
    data = y4m_header(fmt) + b"".join(b"FRAME\n" + f.tobytes() for f in frames)
    src = open_video("-", stdin=io.BytesIO(data))
    assert not src.random_access and src.fmt.fps == Fraction(30000, 1001)
    got = list(src)
    assert len(got) == 2
    np.testing.assert_array_equal(got[1].y, frames[1]["y"])
    cut = open_video("-", stdin=io.BytesIO(data[:-5]))
    with pytest.raises(TruncatedInputError, match="frame 1 is truncated"):
        list(cut)
    with pytest.raises(InputFormatError, match="not a Y4M"):
        open_video("-", stdin=io.BytesIO(b"RIFF....\n"))
    bad = y4m_header(fmt).replace(b"C420jpeg", b"C444") + b"FRAME\n"
    with pytest.raises(InputFormatError, match="C444"):
        open_video("-", stdin=io.BytesIO(bad))


def test_atomic_output_has_normal_permissions(tmp_path):
    import os
    import stat

    target = tmp_path / "perm.bin"
    with atomic_output(target) as f:
        f.write(b"x")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask


def test_atomic_output_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.yuv"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_frame_writer_accepts_planes(tmp_path):
    fmt = VideoFormat(4, 2, Fraction(1), 10)
    buf = io.BytesIO()
    VideoWriter(buf, fmt, y4m=False).write(Frame(np.full((2, 4), 1023, np.uint16), np.zeros((1, 2), np.uint16),
                                                 np.ones((1, 2), np.uint16)))
    assert len(buf.getvalue()) == fmt.frame_bytes == 24
    assert buf.getvalue()[:2] == b"\xff\x03"  # little-endian 10-bit samples


def test_frame_rates_are_limited_to_what_the_side_stream_codes():
    """--fps (encode, decode) and rates in file names: numerator and denominator up to 2^20 each, so an
    absurd rate is a usage error up front, not an overflow in the encoder or a 300-digit Y4M header."""
    from fractions import Fraction

    from hevc_ext.yuv import MAX_FPS_TERM, parse_fps

    assert parse_fps("30000:1001") == Fraction(30000, 1001) and parse_fps("29.97") == Fraction(2997, 100)
    assert parse_fps(str(MAX_FPS_TERM)) == MAX_FPS_TERM
    for bad in ("1e300", "99999999999999999999:1", str(MAX_FPS_TERM + 1), f"1:{MAX_FPS_TERM + 1}"):
        with pytest.raises(UsageError, match="out of range"):
            parse_fps(bad)
    for bad in ("0", "-25", "x", "1:0"):
        with pytest.raises(UsageError, match="invalid frame rate"):
            parse_fps(bad)


@pytest.mark.parametrize("content,message", [
    (b"", "empty file (expected a Y4M stream)"),
    (b"YUV4MPEG2 W64 H48 F25:1", "Y4M header line is not terminated"),
    (b"YUV4MPEG2 Wabc H48\n", "bad Y4M header field 'Wabc': expected a whole number of samples"),
    (b"YUV4MPEG2 W64 H48 C444\n", "Y4M colour space C444 is not supported (expected 4:2:0: C420, "),
    (b"YUV4MPEG2 W64 H48 F1e300\n", "bad Y4M header field 'F1e300': frame rate '1e300' is out of range"),
])
def test_bad_y4m_headers_name_the_file_once_and_the_problem(tmp_path, content, message):
    path = tmp_path / "bad.y4m"
    path.write_bytes(content)
    with pytest.raises(InputFormatError) as err:
        open_video(str(path))
    text = str(err.value)
    assert text.startswith(f"{path}: {message}") and text.count(str(path)) == 1, text
