"""``hevc-nlf eval`` / ``bdrate``: job specs, resume cache, aggregation, tables, CLI, one tiny real run."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest

from hevc_ext import evaluate as ev
from hevc_ext.catalog import find_sequences
from hevc_ext.cli import main
from hevc_ext.errors import InputFormatError, UsageError

TESTS = Path(__file__).resolve().parent

# A plausible anchor curve (kbps, PSNR Y/U/V) at QPs 22, 27, 32, 37.
QPS = (22, 27, 32, 37)
A_KBPS = (1200.0, 600.0, 310.0, 160.0)
A_PSNR = {"y": (40.1, 37.3, 34.6, 32.0), "u": (42.0, 40.2, 38.7, 37.5), "v": (42.5, 40.9, 39.3, 38.0)}


def spec(**kw) -> ev.JobSpec:
    base = dict(sequence="Foo", cls="D", path="/data/Foo_64x64_30.yuv", width=64, height=64, fps="30",
                bitdepth=8, frames=3, mode="ra", qp=32, settings=ev.EvalSettings(iterations=2))
    base.update(kw)
    return ev.JobSpec(**base)


def eval_row(seq: str, cls: str, mode: str, i: int, factor: float = 0.9, dpsnr: float = 0.0,
             psnr: dict | None = None) -> dict:
    """An eval row whose test point has ``factor`` × the anchor rate (and ``dpsnr`` more PSNR)."""
    p = psnr or A_PSNR
    row = {"sequence": seq, "class": cls, "mode": mode, "qp": QPS[i], "frames": 3, "width": 64, "height": 64,
           "fps": 30.0, "kbps_before": A_KBPS[i], "kbps_after": A_KBPS[i] * factor, "hevc_bytes": 1000,
           "side_bytes": 10, "mac_per_pixel": 500.0, "encode_seconds": 4.0, "backend_seconds": 1.0,
           "train_seconds": 2.5, "decode_seconds": 0.3, "decode_plain_seconds": 0.1, "codec_version": "x265"}
    for c in ev.CHANNELS:
        row[f"psnr_before_{c}"] = p[c][i]
        row[f"psnr_after_{c}"] = p[c][i] + dpsnr
    return row


def job_result(row: dict) -> dict:
    """A run_job-style result dict from a flat row."""
    r = {k: v for k, v in row.items() if not k.startswith("psnr_")}
    r["psnr_before"] = {c: row[f"psnr_before_{c}"] for c in ev.CHANNELS}
    r["psnr_after"] = {c: row[f"psnr_after_{c}"] for c in ev.CHANNELS}
    r["segments"] = [{"decisions": {"y": "new", "uv": "off"}}]
    return r


# ------------------------------------------------------------------------------------------ job specs
def test_settings_added_later_keep_earlier_caches_valid():
    """A spec whose later settings are unset hashes exactly as version-1 specs did (without those keys),
    so results cached before the settings existed are still found."""
    import hashlib

    s = spec()
    d = s.to_dict()
    for name in ev.EXECUTION_FIELDS:
        d.pop(name)
    for name in ("finetune_iterations", "rd_slope", "reuse_decay", "reuse_horizon"):
        d["settings"].pop(name)
    d["spec_version"] = ev.SPEC_VERSION
    text = json.dumps(d, sort_keys=True, separators=(",", ":"))
    assert s.spec_hash == hashlib.sha256(text.encode()).hexdigest()[:20]


def test_filter_settings_reach_the_encoder():
    pytest.importorskip("torch")
    from hevc_ext.pipeline import EncoderConfig
    from hevc_ext.train import TrainConfig

    cfg = ev.encoder_config(spec(settings=ev.EvalSettings(iterations=7, finetune_iterations=3, rd_slope=3.5,
                                                          reuse_decay=0.6, reuse_horizon=3)))
    assert (cfg.train.iterations, cfg.train.finetune_iterations, cfg.rd_slope_db) == (7, 3, 3.5)
    assert (cfg.reuse_decay, cfg.reuse_horizon) == (0.6, 3)
    cfg = ev.encoder_config(spec(settings=ev.EvalSettings()))
    assert cfg.rd_slope_db == EncoderConfig().rd_slope_db
    assert (cfg.reuse_decay, cfg.reuse_horizon) == (EncoderConfig().reuse_decay, EncoderConfig().reuse_horizon)
    # the planner's copies of the training defaults (it runs without torch) are the trainer's
    assert (ev.DEFAULT_ITERATIONS, ev.DEFAULT_FINETUNE_ITERATIONS) == (TrainConfig().iterations,
                                                                        TrainConfig().finetune_iterations)


def test_job_cost_counts_training_steps():
    ra, ldp = spec(frames=16, mode="ra"), spec(frames=16, mode="ldp")
    samples = 64 * 64 * 16
    assert ra.cost == samples + 2 * 2 * ev.STEP_COST  # one RA segment, 2 networks × 2 iterations
    # LD: 4 GoPs of 5, the first trained from scratch, three fine-tuned (default 200 steps each)
    assert ldp.cost == samples + 2 * (2 + 3 * ev.DEFAULT_FINETUNE_ITERATIONS) * ev.STEP_COST
    assert spec(settings=ev.EvalSettings(filter_enabled=False)).cost == 64 * 64 * 3


def test_spec_roundtrip_and_hash():
    s = spec()
    back = ev.JobSpec.from_dict(json.loads(s.to_json()))
    assert back == s and back.spec_hash == s.spec_hash
    assert s.job_id == "Foo_ra_qp32"
    assert json.loads(s.to_json())["class"] == "D"
    # execution details do not change the hash ...
    for kw in ({"path": "/elsewhere/Foo_64x64_30.yuv"}, {"kernel": "reference"}, {"threads": 1},
               {"measure_decode": False}, {"decode_repeats": 5}):
        assert spec(**kw).spec_hash == s.spec_hash, kw
    # ... what determines the result does
    for kw in ({"qp": 37}, {"mode": "ldp"}, {"frames": 4}, {"settings": ev.EvalSettings(iterations=3)},
               {"settings": ev.EvalSettings(iterations=2, codec="hm")}, {"width": 32}):
        assert spec(**kw).spec_hash != s.spec_hash, kw
    assert len(s.spec_hash) == 20
    for kw in ({"settings": ev.EvalSettings(iterations=2, rd_slope=3.0)},
               {"settings": ev.EvalSettings(iterations=2, finetune_iterations=50)}):
        assert spec(**kw).spec_hash != s.spec_hash, kw
    with pytest.raises(InputFormatError):
        ev.JobSpec.from_dict({**s.to_dict(), "bogus": 1})
    with pytest.raises(InputFormatError):
        ev.JobSpec.from_dict({k: v for k, v in s.to_dict().items() if k != "qp"})


def _raw(directory: Path, name: str, w: int, h: int, frames: int) -> Path:
    path = directory / name
    path.write_bytes(bytes(w * h * 3 // 2 * frames))
    return path


def test_plan_jobs(tmp_path, caplog):
    _raw(tmp_path, "Foo_64x64_30.yuv", 64, 64, 5)
    _raw(tmp_path, "Bar_64x48_25.yuv", 64, 48, 2)
    seqs = find_sequences(tmp_path)
    specs, notes = ev.plan_jobs(seqs, ["ra", "ldb", "ldp"], [22, 27, 32, 37], ev.EvalSettings(), frames=3)
    assert len(specs) == 2 * 2 * 4  # ldb is not run with x265
    assert any("LDB not run" in n for n in notes)
    frames = {s.sequence: s.frames for s in specs}
    assert frames == {"Foo": 3, "Bar": 2}  # min(--frames, available)
    assert {s.mode for s in specs} == {"ra", "ldp"}
    assert {s.fps for s in specs} == {"30", "25"}
    hm_specs, hm_notes = ev.plan_jobs(seqs, ["ldb"], [22, 27, 32, 37], ev.EvalSettings(codec="hm"))
    assert len(hm_specs) == 8 and not hm_notes
    with pytest.raises(UsageError):
        ev.plan_jobs(seqs, ["xx"], [22], ev.EvalSettings())
    with pytest.raises(UsageError):
        ev.plan_jobs(seqs, ["ra"], [22, 22], ev.EvalSettings())


# ------------------------------------------------------------------------------------- runner/resume
class FakeRunner:
    def __init__(self, fail: set[str] | None = None) -> None:
        self.calls: list[str] = []
        self.fail = fail or set()

    def __call__(self, s: ev.JobSpec) -> dict:
        self.calls.append(s.job_id)
        if s.job_id in self.fail:
            raise RuntimeError(f"boom {s.job_id}")
        return {"status": "ok", "spec_hash": s.spec_hash, "job_id": s.job_id, "qp": s.qp}


def test_resume_skips_finished_jobs(tmp_path):
    specs = [spec(qp=q) for q in QPS] + [spec(sequence="Bar", qp=q) for q in QPS]
    events = []
    r1 = FakeRunner(fail={"Bar_ra_qp27"})
    out = ev.run_jobs(specs, tmp_path, runner=r1, progress=events.append)
    assert len(r1.calls) == 8 and out.ran == 8 and out.cached == 0
    assert len(out.results) == 7 and [f["job_id"] for f in out.failures] == ["Bar_ra_qp27"]
    assert (tmp_path / "jobs" / "Foo_ra_qp22.json").is_file()
    assert (tmp_path / "jobs" / "Bar_ra_qp27.error.json").is_file()
    assert events[0].job_id is None and events[-1].done == 8 and events[-1].failed == 1
    assert all(e.eta_seconds is not None for e in events[1:])

    r2 = FakeRunner()  # second run: only the failed job runs again
    out2 = ev.run_jobs(specs, tmp_path, runner=r2)
    assert r2.calls == ["Bar_ra_qp27"] and out2.cached == 7 and not out2.failures
    assert not (tmp_path / "jobs" / "Bar_ra_qp27.error.json").exists()
    assert [r["job_id"] for r in out2.results] == [s.job_id for s in specs]  # spec order

    r3 = FakeRunner()
    ev.run_jobs(specs, tmp_path, runner=r3)
    assert r3.calls == []

    # a changed setting changes the hash: that job runs again; a damaged cache file too
    changed = [spec(qp=22, settings=ev.EvalSettings(iterations=5))] + specs[1:]
    (tmp_path / "jobs" / "Foo_ra_qp27.json").write_text("{not json")
    r4 = FakeRunner()
    ev.run_jobs(changed, tmp_path, runner=r4)
    assert sorted(r4.calls) == ["Foo_ra_qp22", "Foo_ra_qp27"]

    r5 = FakeRunner()
    ev.run_jobs(changed, tmp_path, runner=r5, force=True)
    assert len(r5.calls) == 8


def test_pool_runner(tmp_path, monkeypatch):
    # spawned workers import this module by name: put tests/ on their path
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
    specs = [spec(qp=q) for q in QPS]
    out = ev.run_jobs(specs, tmp_path, jobs=2, runner=_module_runner)
    assert len(out.results) == 4 and not out.failures
    assert {r["threads"] for r in out.results} == {1}  # one torch thread per worker
    again = ev.run_jobs(specs, tmp_path, jobs=2, runner=_module_runner)
    assert again.ran == 0 and again.cached == 4


def _module_runner(s: ev.JobSpec) -> dict:
    return {"status": "ok", "spec_hash": s.spec_hash, "job_id": s.job_id, "threads": s.threads, "pid": os.getpid()}


def _slow_runner(s: ev.JobSpec) -> dict:
    """QP 22 finishes at once; the others work for a minute in a temporary folder (under $NLF_TEST_TMP)."""
    import tempfile
    import time

    if s.qp == 22:
        return _module_runner(s)
    with tempfile.TemporaryDirectory(dir=os.environ["NLF_TEST_TMP"]) as work:
        Path(work, "busy").write_text(str(os.getpid()))
        for _ in range(600):
            time.sleep(0.1)
    return _module_runner(s)


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_interrupted_pool_stops_its_workers_and_keeps_finished_jobs(tmp_path, monkeypatch, signum):
    """Ctrl-C (or SIGTERM, which the CLI turns into the same exception) during a pooled run: the running
    jobs stop at once and remove their temporary files, finished jobs stay stored for a resume."""
    import multiprocessing
    import signal
    import threading
    import time

    from hevc_ext.cli import _raise_terminated, _Terminated

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("NLF_TEST_TMP", str(work))
    sig = getattr(signal, signum)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    specs = [spec(qp=q) for q in QPS]

    def interrupt_when_busy() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list(work.glob("*/busy"))) < 2:
            time.sleep(0.05)
        os.kill(os.getpid(), sig)

    threading.Thread(target=interrupt_when_busy, daemon=True).start()
    try:
        with pytest.raises(_Terminated if signum == "SIGTERM" else KeyboardInterrupt):
            ev.run_jobs(specs, tmp_path / "run", jobs=2, runner=_slow_runner)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert multiprocessing.active_children() == []
    assert list(work.iterdir()) == []  # the stopped jobs removed their folders
    assert [p.name for p in (tmp_path / "run" / "jobs").iterdir()] == ["Foo_ra_qp22.json"]


# -------------------------------------------------------------------------------------- aggregation
def test_bd_rate_known_values_and_class_average():
    rows = ([eval_row("S1", "D", "ra", i, 0.9) for i in range(4)]
            + [eval_row("S2", "D", "ra", i, 0.8) for i in range(4)]
            + [eval_row("S3", "B", "ra", i, 1.05) for i in range(4)]
            + [eval_row("S1", "D", "ldp", i, 0.95) for i in range(4)])
    summary = ev.summarise([job_result(r) for r in rows], modes=["ra", "ldp"])
    seq = {(s.sequence, s.mode): s for s in summary.sequences}
    for c in ev.CHANNELS:
        assert seq[("S1", "ra")].values[c].value == pytest.approx(-10.0, abs=1e-9)
        assert seq[("S2", "ra")].values[c].value == pytest.approx(-20.0, abs=1e-9)
        assert seq[("S3", "ra")].values[c].value == pytest.approx(5.0, abs=1e-9)
        assert seq[("S1", "ldp")].values[c].value == pytest.approx(-5.0, abs=1e-9)
    cls = {(k.cls, k.mode): k for k in summary.classes}
    assert cls[("D", "ra")].values["y"].mean == pytest.approx(-15.0)
    assert cls[("D", "ra")].values["y"].count == 2
    assert cls[("B", "ra")].values["u"].mean == pytest.approx(5.0)
    assert cls[(ev.ALL, "ra")].values["v"].mean == pytest.approx((-10 - 20 + 5) / 3)
    assert cls[("D", "ldp")].values["y"].mean == pytest.approx(-5.0)
    assert ("B", "ldp") not in cls
    comp = {(r["class"], r["mode"]): r for r in summary.complexity}
    assert comp[("D", "ra")]["encode_ratio"] == pytest.approx(4.0)
    assert comp[("D", "ra")]["decode_ratio"] == pytest.approx(3.0)
    assert comp[("D", "ra")]["mac_per_pixel_mean"] == pytest.approx(500.0)
    assert comp[("D", "ra")]["filter_on"] == pytest.approx(0.5)

    md = ev.summary_markdown(summary)
    assert "| HEVC D | -15.00% | -15.00% | -15.00% | -5.00% | -5.00% | -5.00% |" in md
    assert "| HEVC B | 5.00% | 5.00% | 5.00% | — | — | — |" in md
    assert "| Class | RA Y | RA U | RA V | LDP Y | LDP U | LDP V |" in md
    assert "| S2 | D | RA | 22,27,32,37 | -20.00% | -20.00% | -20.00% |" in md
    assert "| HEVC D | RA | 8 | 50% | 500 | 500 | 400% | 300% |" in md


def test_bd_rate_undefined_cases_are_reported_not_raised():
    rows = [eval_row("Full", "C", "ra", i, 0.9) for i in range(4)]
    rows += [eval_row("Short", "C", "ra", i, 0.9) for i in range(3)]  # 3 QPs
    flat = {"y": (36.0, 35.0, 35.0, 33.0), "u": A_PSNR["u"], "v": A_PSNR["v"]}  # Y not monotonic
    rows += [eval_row("Flat", "C", "ra", i, 0.9, psnr=flat) for i in range(4)]
    summary = ev.summarise([job_result(r) for r in rows])
    seq = {s.sequence: s for s in summary.sequences}
    assert seq["Short"].values["y"].value is None and "3 QPs" in seq["Short"].values["y"].reason
    assert seq["Flat"].values["y"].value is None and "monotonic" in seq["Flat"].values["y"].reason
    assert seq["Flat"].values["u"].value == pytest.approx(-10.0)
    cell = {k.cls: k for k in summary.classes}["C"].values
    assert (cell["y"].count, cell["y"].total) == (1, 3) and cell["y"].mean == pytest.approx(-10.0)
    assert (cell["u"].count, cell["u"].total) == (2, 3)
    md = ev.summary_markdown(summary)
    assert "-10.00% (1/3) [1]" in md
    assert "## Footnotes (n/a)" in md and "Short: 3 QPs (BD-rate needs 4)" in md
    js = summary.to_json()
    short = next(s for s in js["sequences"] if s["sequence"] == "Short")
    assert short["y"]["bd_rate"] is None and "QPs" in short["y"]["reason"]


def test_write_outputs_and_load_run(tmp_path):
    rows = [eval_row("S1", "D", "ra", i, 0.9, dpsnr=0.1) for i in range(4)]
    summary = ev.summarise([job_result(r) for r in rows], notes=["a note"], meta={"command": "hevc-nlf eval x"})
    files = ev.write_outputs(tmp_path, summary, plots=True)
    for name in ("results.json", "results.csv", "bdrate.json", "bdrate_classes.csv", "bdrate_sequences.csv",
                 "complexity.csv", "report.md"):
        assert files[name].is_file(), name
    assert (tmp_path / "plots" / "S1_ra.png").stat().st_size > 1000
    run = ev.load_run(tmp_path)
    assert run.kind == "eval" and len(run.rows) == 4 and run.meta["command"] == "hevc-nlf eval x"
    run_csv = ev.load_run(tmp_path / "results.csv")
    assert run_csv.kind == "eval" and run_csv.rows[0]["kbps_after"] == pytest.approx(A_KBPS[0] * 0.9)
    again = ev.self_comparison(run_csv)
    assert again.sequences[0].values["y"].value == pytest.approx(
        summary.sequences[0].values["y"].value, abs=1e-9)
    with open(tmp_path / "bdrate_classes.csv") as f:
        got = list(csv.DictReader(f))
    assert {r["class"] for r in got} == {"D", "All"}
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(InputFormatError):
        ev.load_run(tmp_path / "bad.csv")
    with pytest.raises(InputFormatError):
        ev.load_run(tmp_path / "nothing_here")


# ------------------------------------------------------------------------------------------ bdrate CLI
def _simple_csv(path: Path, factor: float, seqs=(("S1", "D"), ("S2", "E")), modes=("ra",)) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(ev.SIMPLE_FIELDS)
        for seq, cls in seqs:
            for mode in modes:
                for i, qp in enumerate(QPS):
                    w.writerow([seq, cls, mode, qp, A_KBPS[i] * factor, *(A_PSNR[c][i] for c in ev.CHANNELS)])
    return path


def test_bdrate_cli_two_csv(tmp_path, capsys):
    a = _simple_csv(tmp_path / "a.csv", 1.0)
    b = _simple_csv(tmp_path / "b.csv", 0.9)
    assert main(["bdrate", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "| HEVC D | -10.00% | -10.00% | -10.00% |" in out
    assert "| S2 | E | RA | 22,27,32,37 | -10.00% | -10.00% | -10.00% |" in out
    assert main(["bdrate", str(b), str(a), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["classes"][0]["y"]["bd_rate"] == pytest.approx(100 / 9, abs=1e-9)  # 1/0.9 - 1


def test_bdrate_cli_eval_runs(tmp_path, capsys):
    for name, factor in (("A", 0.9), ("B", 0.8)):
        rows = [eval_row("S1", "D", "ldp", i, factor) for i in range(4)]
        ev.write_outputs(tmp_path / name, ev.summarise([job_result(r) for r in rows]), plots=False)
    assert main(["bdrate", str(tmp_path / "A"), str(tmp_path / "B" / "results.json"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    seq = data["sequences"][0]
    assert seq["mode"] == "ldp" and seq["y"]["bd_rate"] == pytest.approx((0.8 / 0.9 - 1) * 100, abs=1e-9)
    # B's filter against A's backend alone; A's own filter vs backend (one run)
    assert main(["bdrate", str(tmp_path / "A"), str(tmp_path / "B"), "--a-curve", "before", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sequences"][0]["u"]["bd_rate"] == pytest.approx(-20.0)
    assert main(["bdrate", str(tmp_path / "A"), "-o", str(tmp_path / "again")]) == 0
    assert "| HEVC D | -10.00% | -10.00% | -10.00% |" in capsys.readouterr().out
    assert (tmp_path / "again" / "report.md").is_file()
    # a CSV with 3 QPs: n/a with the reason, exit 0
    c = tmp_path / "c.csv"
    lines = _simple_csv(tmp_path / "c_full.csv", 0.9).read_text().splitlines()
    c.write_text("\n".join(lines[:4]) + "\n")
    assert main(["bdrate", str(tmp_path / "c_full.csv"), str(c)]) == 0
    assert "3 QPs (BD-rate needs 4)" in capsys.readouterr().out
    assert main(["bdrate", str(tmp_path / "nope.csv"), str(c)]) == 1


# ----------------------------------------------------------------------------------- tiny real eval
def test_tiny_real_eval_and_resume(tmp_path, capsys, monkeypatch, make_clip):
    seqdir = tmp_path  # make_clip writes here; the results go to a subfolder
    make_clip(n=3, width=64, height=64, name="Foo", seed=1)
    make_clip(n=4, width=64, height=64, name="Bar", seed=2)
    out = tmp_path / "out"
    # cheap networks that still pay at a small price of side bits, so that the decode check applies some
    argv = ["eval", "--sequences", str(seqdir), "--qps", "30,32,34,36", "--modes", "ra", "--iterations", "30",
            "--batch", "4", "--patch", "16", "--frames", "3", "--jobs", "1", "--kernel", "reference",
            "--lambda-scale", "0.001", "--no-plots", "-o", str(out)]
    assert main(argv) == 0
    cap = capsys.readouterr()
    assert "| Class | RA Y | RA U | RA V |" in cap.out and "| HEVC D |" in cap.out
    assert "eval: 8/8 jobs" in cap.err and "ETA" in cap.err
    report = (out / "report.md").read_text()
    assert "hevc-nlf eval --sequences" in report and "## RD points" in report
    run = json.loads((out / "results.json").read_text())
    assert run["format"] == "hevc-nlf-eval" and len(run["rows"]) == 8
    for row in run["rows"]:
        assert row["frames"] == 3
        assert row["kbps_after"] >= row["kbps_before"] > 0  # the side stream is counted (none if nothing is filtered)
        assert (row["kbps_after"] == row["kbps_before"]) == (row["side_bytes"] == 0)
        assert row["kbps_after"] == pytest.approx(
            (row["hevc_bytes"] + row["side_bytes"]) * 8 * 30 / 3 / 1000)
        assert row["decode_seconds"] > 0 and row["decode_plain_seconds"] > 0
    assert {r["sequence"] for r in run["rows"]} == {"Foo", "Bar"}
    applied = 0
    for name in ("Foo", "Bar"):
        for qp in (30, 32, 34, 36):
            job = json.loads((out / "jobs" / f"{name}_ra_qp{qp}.json").read_text())
            assert job["status"] == "ok" and job["spec"]["frames"] == 3
            signalled = sum(d != "off" for s in job["segments"] for d in s["decisions"].values())
            assert job["decode_records_applied"] == job["decode_records_verified"] == signalled  # MD5: each checked
            applied += signalled
    assert applied > 0
    bd = json.loads((out / "bdrate.json").read_text())
    assert {c["class"] for c in bd["classes"]} == {"D", "All"}
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "jobs").iterdir()}

    import hevc_ext.pipeline as pipeline

    def no_encode(*a, **k):
        raise AssertionError("a cached job was encoded again")

    monkeypatch.setattr(pipeline, "encode", no_encode)
    assert main(argv + ["--json"]) == 0  # resumes: nothing is encoded
    data = json.loads(capsys.readouterr().out)
    assert len(data["sequences"]) == 2
    assert {p.name: p.stat().st_mtime_ns for p in (out / "jobs").iterdir()} == mtimes
    assert json.loads((out / "results.json").read_text())["jobs_cached"] == 8


def test_eval_cli_dry_run_and_x265_ldb(tmp_path, capsys):
    seqdir = tmp_path / "seq"
    seqdir.mkdir()
    _raw(seqdir, "Foo_64x64_30.yuv", 64, 64, 2)
    assert main(["eval", "--sequences", str(seqdir), "--modes", "ra,ldb", "--dry-run", "-o", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "4 jobs (0 cached)" in out and "Foo_ra_qp22" in out and "LDB not run" in out
    plan = json.loads((tmp_path / "o" / "plan.json").read_text())
    assert len(plan["jobs"]) == 4 and plan["jobs"][0]["spec"]["frames"] == 2
    # a plan entry is a complete job spec
    assert ev.JobSpec.from_dict(plan["jobs"][0]["spec"]).spec_hash == plan["jobs"][0]["spec_hash"]
    assert main(["eval", "--sequences", str(seqdir), "--modes", "ldb", "-o", str(tmp_path / "p")]) == 2


# ------------------------------------------------------------------------------ option/input checks
def test_plan_jobs_rejects_an_unknown_codec(tmp_path):
    from hevc_ext.backends import BACKENDS

    _raw(tmp_path, "Foo_64x64_30.yuv", 64, 64, 2)
    seqs = find_sequences(tmp_path)
    with pytest.raises(UsageError, match=r"unknown codec 'zz': expected one of x265, hm") as info:
        ev.plan_jobs(seqs, ["ra"], [22, 27, 32, 37], ev.EvalSettings(codec="zz"))
    assert all(b in str(info.value) for b in BACKENDS)  # the registry's list, not a copy
    for codec in BACKENDS:  # every registered codec plans, installed here or not
        specs, _ = ev.plan_jobs(seqs, ["ra"], [22, 27, 32, 37], ev.EvalSettings(codec=codec))
        assert len(specs) == 4 and {s.settings.codec for s in specs} == {codec}


@pytest.mark.parametrize("dry_run", [True, False])
def test_eval_cli_unknown_codec_fails_before_writing(tmp_path, capsys, dry_run):
    seqdir = tmp_path / "seq"
    seqdir.mkdir()
    _raw(seqdir, "Foo_64x64_30.yuv", 64, 64, 2)
    out = tmp_path / "R"
    argv = ["eval", "--sequences", str(seqdir), "-o", str(out), "--codec", "zz"] + (["--dry-run"] if dry_run else [])
    assert main(argv) == 2
    cap = capsys.readouterr()
    assert cap.err == "hevc-nlf: error: unknown codec 'zz': expected one of x265, hm\n"
    assert cap.out == "" and not out.exists()


def test_eval_cli_hm_missing_plans_but_does_not_run(tmp_path, capsys, monkeypatch):
    """HM not installed: a dry run still plans (exit 0); a real run fails before writing anything."""
    monkeypatch.setenv("HEVC_NLF_HM_DIR", str(tmp_path / "no_hm_here"))
    seqdir = tmp_path / "seq"
    seqdir.mkdir()
    _raw(seqdir, "Foo_64x64_30.yuv", 64, 64, 2)
    argv = ["eval", "--sequences", str(seqdir), "--codec", "hm", "--modes", "ldb"]
    assert main(argv + ["--dry-run", "-o", str(tmp_path / "plan")]) == 0
    assert len(json.loads((tmp_path / "plan" / "plan.json").read_text())["jobs"]) == 4
    capsys.readouterr()
    assert main(argv + ["-o", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hevc-nlf: error: codec hm: HM (the HEVC reference software) was not found")
    assert "no_hm_here" in err and not (tmp_path / "run").exists()


def _bad_csv(path: Path, line: int, field: str, value: str) -> Path:
    """The plausible simple CSV of ``_simple_csv`` with one field of one file line replaced."""
    _simple_csv(path, 1.0)
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[line - 1].split(",")
    cells[header.index(field)] = value
    lines[line - 1] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("line, field, value, expected", [
    (4, "kbps", "-5", "line 4: kbps must be a positive finite number, got -5"),
    (2, "kbps", "0", "line 2: kbps must be a positive finite number, got 0"),
    (5, "kbps", "inf", "line 5: kbps must be a positive finite number, got inf"),
    (3, "psnr_y", "nan", "line 3: psnr_y must be a finite number, got nan"),
    (9, "psnr_v", "-inf", "line 9: psnr_v must be a finite number, got -inf"),
    (6, "psnr_u", "abc", "line 6: psnr_u must be a number, got abc"),
    (7, "qp", "27.5", "line 7: qp must be an integer, got 27.5"),
    (8, "qp", "nan", "line 8: qp must be an integer, got nan"),
])
def test_load_run_rejects_bad_csv_values(tmp_path, line, field, value, expected):
    bad = _bad_csv(tmp_path / "runs.csv", line, field, value)
    with pytest.raises(InputFormatError) as info:
        ev.load_run(bad)
    assert str(info.value) == f"{bad} {expected}"


def test_load_run_csv_shape_errors_name_the_line(tmp_path):
    path = _simple_csv(tmp_path / "runs.csv", 1.0)
    lines = path.read_text().splitlines()
    (tmp_path / "extra.csv").write_text("\n".join(lines[:3] + [lines[3] + ",7"] + lines[4:]) + "\n")
    with pytest.raises(InputFormatError, match=r"extra\.csv line 4: 9 fields, the header has 8$"):
        ev.load_run(tmp_path / "extra.csv")
    (tmp_path / "short.csv").write_text("\n".join(lines[:2] + [",".join(lines[2].split(",")[:5])]) + "\n")
    with pytest.raises(InputFormatError, match=r"short\.csv line 3: missing psnr_y, psnr_u, psnr_v$"):
        ev.load_run(tmp_path / "short.csv")
    (tmp_path / "dup.csv").write_text("\n".join(lines + [lines[2]]) + "\n")
    with pytest.raises(InputFormatError, match=r"dup\.csv line 10: a second row for sequence S1 mode ra QP 27 "
                                               r"\(the first is line 3\)"):
        ev.load_run(tmp_path / "dup.csv")


@pytest.mark.parametrize("field, value, expected", [
    ("kbps_after", -5.0, "kbps_after must be a positive finite number, got -5"),
    ("kbps_before", 0, "kbps_before must be a positive finite number, got 0"),
    ("psnr_after_u", math.nan, "psnr_after_u must be a finite number, got nan"),
    ("psnr_before_y", math.inf, "psnr_before_y must be a finite number, got inf"),
    ("kbps_after", "fast", "kbps_after must be a number, got fast"),
    ("psnr_after_v", True, "psnr_after_v must be a number, got true"),
])
def test_load_run_rejects_bad_eval_json_values(tmp_path, field, value, expected):
    rows = [eval_row("S1", "D", "ra", i, 0.9) for i in range(4)]
    ev.write_outputs(tmp_path / "run", ev.summarise([job_result(r) for r in rows]), plots=False)
    path = tmp_path / "run" / "results.json"
    data = json.loads(path.read_text())
    data["rows"][2][field] = value
    path.write_text(json.dumps(data))  # NaN and Infinity as Python's json writes them
    with pytest.raises(InputFormatError) as info:
        ev.load_run(tmp_path / "run")
    assert str(info.value) == f"{path} row 3: {expected}"


def test_bdrate_cli_rejects_bad_numbers_without_writing(tmp_path, capsys):
    a = _simple_csv(tmp_path / "a.csv", 1.0)
    for name, field, value, expected in (
            ("runs.csv", "kbps", "-5", "line 4: kbps must be a positive finite number, got -5"),
            ("nan.csv", "psnr_y", "nan", "line 4: psnr_y must be a finite number, got nan"),
            ("inf.csv", "psnr_u", "inf", "line 4: psnr_u must be a finite number, got inf")):
        b = _bad_csv(tmp_path / name, 4, field, value)
        for argv in (["bdrate", str(a), str(b)], ["bdrate", str(b), str(a), "--json"], ["bdrate", str(b)]):
            assert main(argv + ["-o", str(tmp_path / "out")]) == 1
            cap = capsys.readouterr()
            assert cap.out == "" and cap.err == f"hevc-nlf: error: {b} {expected}\n"
            assert "np.float64" not in cap.err and not (tmp_path / "out").exists()
