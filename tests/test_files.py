"""Input and output files (hevc_ext.files): checks before any work, all-or-nothing publication."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hevc_ext.errors import InputFormatError, OutputError, UsageError
from hevc_ext.files import atomic_output, atomic_outputs, check_input, check_output, check_output_folder


def test_check_input_names_the_problem(tmp_path):
    with pytest.raises(InputFormatError, match="no such file"):
        check_input(tmp_path / "missing.hevc")
    with pytest.raises(InputFormatError, match="is a directory, expected an HEVC stream"):
        check_input(tmp_path, "an HEVC stream")
    (tmp_path / "ok.bin").write_bytes(b"x")
    check_input(tmp_path / "ok.bin")
    check_input("-")


def test_check_output_refuses_unusable_paths(tmp_path):
    (tmp_path / "adir").mkdir()
    with pytest.raises(OutputError, match="is a directory"):
        check_output(tmp_path / "adir")
    (tmp_path / "afile").write_bytes(b"x")
    with pytest.raises(OutputError, match="afile is not a directory"):
        check_output(tmp_path / "afile" / "sub" / "out.yuv")
    with pytest.raises(UsageError, match="overwrite the input"):
        check_output(tmp_path / "afile", inputs=(None, str(tmp_path / "afile")))
    check_output(tmp_path / "new" / "deeper" / "out.yuv")  # folders are created when written
    check_output(tmp_path / "afile")  # replacing an existing file that is no input is fine
    check_output("-")
    check_output(os.devnull)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"]  # the probe left nothing


def test_check_output_refuses_a_read_only_folder(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root may write into read-only folders: let the access check answer as for a user
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro else real(p, mode, **kw))
    try:
        with pytest.raises(OutputError, match="not writable"):
            check_output(ro / "out.yuv")
        with pytest.raises(OutputError, match="not writable"):
            check_output(ro / "new" / "out.yuv")  # a folder it would have to create in there
    finally:
        ro.chmod(0o755)


def test_atomic_outputs_publish_all_or_nothing(tmp_path):
    a, b = tmp_path / "x.hevc", tmp_path / "x.nlf"
    with pytest.raises(RuntimeError):
        with atomic_outputs(a, b) as (fa, fb):
            fa.write(b"stream")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    # the second rename fails (its name became a directory meanwhile): the first file is taken back
    with pytest.raises(OutputError, match="x.nlf: cannot write"):
        with atomic_outputs(a, b) as (fa, fb):
            fa.write(b"stream")
            fb.write(b"side")
            b.mkdir()
    assert not a.exists() and [p.name for p in tmp_path.iterdir()] == ["x.nlf"]
    b.rmdir()
    with atomic_outputs(a, b) as (fa, fb):
        fa.write(b"stream")
        fb.write(b"side")
    assert a.read_bytes() == b"stream" and b.read_bytes() == b"side"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.hevc", "x.nlf"]


def test_atomic_output_writes_devices_in_place():
    with atomic_output(os.devnull) as f:
        f.write(b"discarded")
    assert os.path.exists(os.devnull) and not os.path.isfile(os.devnull)


def test_check_input_does_not_open_a_pipe(tmp_path):
    """A named pipe (or bash's <(...)) is only checked for permission: opening it to probe would block
    without a writer, or take data from the real reader."""
    import threading

    fifo = tmp_path / "in.hevc"
    os.mkfifo(fifo)
    done = threading.Event()

    def probe() -> None:
        check_input(fifo)
        done.set()

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(5)
    if not done.is_set():  # unblock the probe's open so the thread ends, then fail
        with open(fifo, "wb"):
            pass
    assert done.is_set()


def test_check_output_folder_names_the_problem(tmp_path):
    """eval's results folder and bdrate's -o: a file in the way, the input folder itself, or a file among
    the parents are refused before any work."""
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputError, match="file: exists and is not a folder \\(the results go into a folder\\)"):
        check_output_folder(f, "the results")
    with pytest.raises(UsageError, match="is the input folder"):
        check_output_folder(tmp_path / ".", "the results", inputs=[tmp_path])
    with pytest.raises(OutputError, match="is not a folder"):
        check_output_folder(f / "sub", "the results")
    check_output_folder(tmp_path / "new" / "deeper", "the results", inputs=[tmp_path])  # can be created
    assert not (tmp_path / "new").exists()
