"""CTC catalog loading, resolution classes and sequence discovery."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest

from hevc_ext.catalog import (CatalogEntry, SequenceInfo, class_for_size, find_sequences,
                              load_catalog)
from hevc_ext.errors import InputFormatError, TruncatedInputError, UsageError
from hevc_ext.yuv import VideoFormat, y4m_header

from .conftest import SEQUENCES

REPO = Path(__file__).resolve().parents[1]
SHARED_SEQUENCES = SEQUENCES  # ../shared/sequences or $HEVC_NLF_SEQUENCES


def frame_bytes(w: int, h: int, bitdepth: int = 8) -> int:
    return VideoFormat(w, h, Fraction(30), bitdepth).frame_bytes


def make_raw(directory: Path, name: str, w: int, h: int, frames: int, bitdepth: int = 8,
             extra: int = 0) -> Path:
    """A raw file of the right size; sparse, so even 2560x1600 frames cost no disk."""
    path = directory / name
    with open(path, "wb") as f:
        f.truncate(frames * frame_bytes(w, h, bitdepth) + extra)
    return path


def make_y4m(directory: Path, name: str, w: int, h: int, frames: int, fps: int = 25) -> Path:
    fmt = VideoFormat(w, h, Fraction(fps), 8)
    path = directory / name
    with open(path, "wb") as f:
        f.write(y4m_header(fmt))
        for _ in range(frames):
            f.write(b"FRAME\n" + bytes(fmt.frame_bytes))
    return path


# ------------------------------------------------------------------------------------------ catalog
def test_catalog_files_identical():
    assert (REPO / "sequences" / "ctc.csv").read_bytes() == (REPO / "hevc_ext" / "data" / "ctc.csv").read_bytes()


def test_catalog_content():
    cat = load_catalog()
    assert all(isinstance(e, CatalogEntry) for e in cat)
    by_class: dict[str, list[str]] = {}
    for e in cat:
        by_class.setdefault(e.cls, []).append(e.name)
    assert {c: len(v) for c, v in by_class.items()} == {"A": 4, "B": 5, "C": 4, "D": 4, "E": 3, "F": 4}
    names = [e.name for e in cat]
    assert len(set(n.lower() for n in names)) == len(names)
    e = {x.name: x for x in cat}
    assert (e["Traffic"].file, e["Traffic"].frames, e["Traffic"].fps) == ("Traffic_2560x1600_30_crop.yuv", 150, 30)
    assert (e["NebutaFestival"].bitdepth, e["NebutaFestival"].frames, e["NebutaFestival"].fps) == (10, 300, 60)
    assert (e["SteamLocomotiveTrain"].bitdepth, e["SteamLocomotiveTrain"].frames) == (10, 300)
    assert e["Kimono"].file == "Kimono1_1920x1080_24.yuv" and e["Kimono"].token == "Kimono1"
    assert [e[n].frames for n in ("Kimono", "ParkScene", "Cactus", "BQTerrace", "BasketballDrive")] == \
        [240, 240, 500, 600, 500]
    for c, d in (("RaceHorsesC", "RaceHorses"), ("BQMall", "BQSquare"), ("PartyScene", "BlowingBubbles"),
                 ("BasketballDrill", "BasketballPass")):
        assert (e[c].cls, e[d].cls) == ("C", "D")
        assert e[c].frames == e[d].frames and e[c].fps == e[d].fps
    assert (e["RaceHorsesC"].width, e["RaceHorses"].width) == (832, 416)
    assert all(x.frames == 600 and x.fps == 60 for x in cat if x.cls == "E")
    assert all(x.bitdepth == 8 for x in cat if x.name not in ("NebutaFestival", "SteamLocomotiveTrain"))
    for x in cat:  # file names follow Name_WxH_fps
        assert f"_{x.width}x{x.height}_{x.fps}" in x.file


def test_load_catalog_from_path_and_errors(tmp_path):
    good = tmp_path / "cat.csv"
    good.write_text("class,name,file,width,height,fps,frames,bitdepth\nE,Desk,Desk_64x48_30.yuv,64,48,30,9,8\n")
    (entry,) = load_catalog(good)
    assert (entry.cls, entry.name, entry.width, entry.fps, entry.frames) == ("E", "Desk", 64, Fraction(30), 9)
    bad_cols = tmp_path / "bad1.csv"
    bad_cols.write_text("class,name\nA,x\n")
    with pytest.raises(InputFormatError, match="columns"):
        load_catalog(bad_cols)
    bad_row = tmp_path / "bad2.csv"
    bad_row.write_text("class,name,file,width,height,fps,frames,bitdepth\nA,X,X.yuv,wide,48,30,9,8\n")
    with pytest.raises(InputFormatError, match=":2"):
        load_catalog(bad_row)
    bad_cls = tmp_path / "bad3.csv"
    bad_cls.write_text("class,name,file,width,height,fps,frames,bitdepth\nG,X,X.yuv,64,48,30,9,8\n")
    with pytest.raises(InputFormatError, match="bad3.csv:2: .*unknown sequence class 'G'"):
        load_catalog(bad_cls)
    with pytest.raises(InputFormatError, match="cannot read"):
        load_catalog(tmp_path / "missing.csv")


# ------------------------------------------------------------------------------------ classification
@pytest.mark.parametrize("w,h,cls", [
    (2560, 1600, "A"), (3840, 2160, "A"), (1920, 1080, "B"), (1280, 720, "E"), (832, 480, "C"),
    (416, 240, "D"), (64, 48, "D"),
    (852, 480, "C"), (352, 288, "D"), (320, 240, "D"), (320, 192, "D"), (1024, 768, "E"), (2048, 1080, "B"),
    (624, 320, "C"),     # 199,680 = sqrt(832*480 * 416*240) exactly: tie -> larger class
    (622, 320, "D"),
    (1440, 960, "B"),    # 1,382,400 = sqrt(1920*1080 * 1280*720) exactly: tie -> larger class
    (1438, 960, "E"),
])
def test_class_for_size(w, h, cls):
    assert class_for_size(w, h) == cls


def test_class_for_size_rejects_nonsense():
    with pytest.raises(UsageError):
        class_for_size(0, 240)


# -------------------------------------------------------------------------------------- discovery
@pytest.fixture()
def seqdir(tmp_path):
    make_raw(tmp_path, "Foo_64x48_30.yuv", 64, 48, 3)
    make_raw(tmp_path, "BasketballPass_416x240_50.yuv", 416, 240, 2)
    make_raw(tmp_path, "Traffic.yuv", 2560, 1600, 1)
    make_raw(tmp_path, "nebutafestival_2560x1600_60_10bit_crop.YUV", 2560, 1600, 1, bitdepth=10)
    make_raw(tmp_path, "RaceHorses_832x480_30.yuv", 832, 480, 1)
    make_raw(tmp_path, "RaceHorses_416x240_30.yuv", 416, 240, 2)
    make_raw(tmp_path, "Kimono1_1920x1080_24_first2.yuv", 1920, 1080, 2)
    make_raw(tmp_path, "Desk_1280x720_25.yuv", 1280, 720, 1)
    make_raw(tmp_path, "Small_208x120_50_10bit.yuv", 208, 120, 2, bitdepth=10)
    make_raw(tmp_path, "BQMall_416x240_60.yuv", 416, 240, 1)  # contradicts the catalog: not CTC
    make_y4m(tmp_path, "Baz.y4m", 352, 288, 2)
    (tmp_path / "README.md").write_text("not a sequence")
    (tmp_path / "sub.yuv").mkdir()  # a directory named like a sequence is ignored
    return tmp_path


def test_find_sequences(seqdir):
    infos = find_sequences(seqdir)
    assert all(isinstance(i, SequenceInfo) for i in infos)
    got = [(i.cls, i.name, i.path.name, i.in_catalog) for i in infos]
    assert got == [
        ("A", "NebutaFestival", "nebutafestival_2560x1600_60_10bit_crop.YUV", True),
        ("A", "Traffic", "Traffic.yuv", True),
        ("B", "Kimono", "Kimono1_1920x1080_24_first2.yuv", True),
        ("C", "RaceHorsesC", "RaceHorses_832x480_30.yuv", True),
        ("D", "BasketballPass", "BasketballPass_416x240_50.yuv", True),
        ("D", "Baz", "Baz.y4m", False),
        ("D", "BQMall", "BQMall_416x240_60.yuv", False),
        ("D", "Foo", "Foo_64x48_30.yuv", False),
        ("D", "RaceHorses", "RaceHorses_416x240_30.yuv", True),
        ("D", "Small", "Small_208x120_50_10bit.yuv", False),
        ("E", "Desk", "Desk_1280x720_25.yuv", False),
    ]
    by = {i.name: i for i in infos}
    foo = by["Foo"]
    assert (foo.width, foo.height, foo.fps, foo.frames, foo.bitdepth, foo.ctc_frames) == \
        (64, 48, Fraction(30), 3, 8, None)
    assert foo.path == seqdir / "Foo_64x48_30.yuv"
    assert (by["Traffic"].width, by["Traffic"].height, by["Traffic"].fps, by["Traffic"].frames,
            by["Traffic"].ctc_frames) == (2560, 1600, Fraction(30), 1, 150)
    assert (by["NebutaFestival"].bitdepth, by["NebutaFestival"].frames, by["NebutaFestival"].fps) == (10, 1, 60)
    assert (by["BasketballPass"].frames, by["BasketballPass"].ctc_frames) == (2, 500)
    assert (by["Small"].bitdepth, by["Small"].frames) == (10, 2)
    assert (by["Baz"].width, by["Baz"].height, by["Baz"].frames, by["Baz"].fps) == (352, 288, 2, Fraction(25))
    assert by["Desk"].video_format == VideoFormat(1280, 720, Fraction(25), 8)


def test_find_sequences_is_deterministic(seqdir):
    assert find_sequences(seqdir) == find_sequences(str(seqdir))


def test_class_filter(seqdir):
    assert [i.name for i in find_sequences(seqdir, classes=["a", "E"])] == ["NebutaFestival", "Traffic", "Desk"]
    with pytest.raises(UsageError, match="unknown sequence class 'G'"):
        find_sequences(seqdir, classes=["G"])
    with pytest.raises(UsageError, match="no sequence of class F.*present: A, B, C, D, E"):
        find_sequences(seqdir, classes=["F"])


def test_class_overrides(seqdir, caplog):
    infos = find_sequences(seqdir, class_overrides={"foo": "e", "Traffic": "B", "Nothing": "C"})
    by = {i.name: i for i in infos}
    assert by["Foo"].cls == "E" and by["Traffic"].cls == "B"
    assert "nothing" in caplog.text
    assert [i.name for i in find_sequences(seqdir, classes="E", class_overrides={"Foo": "E"})] == ["Desk", "Foo"]
    with pytest.raises(UsageError, match="class override"):
        find_sequences(seqdir, class_overrides={"Foo": "Z"})


def test_prefix_matching_needs_a_separator(tmp_path):
    make_raw(tmp_path, "BasketballDrillText_832x480_50.yuv", 832, 480, 1)
    make_raw(tmp_path, "BasketballDrill-part_832x480_50.yuv", 832, 480, 1)
    make_raw(tmp_path, "Johnnyish_1280x720_60.yuv", 1280, 720, 1)
    got = {(i.name, i.cls, i.in_catalog) for i in find_sequences(tmp_path)}
    assert got == {("BasketballDrillText", "F", True), ("BasketballDrill", "C", True), ("Johnnyish", "E", False)}


def test_ambiguous_name_resolved_by_file_size(tmp_path):
    make_raw(tmp_path, "RaceHorses.yuv", 416, 240, 3)  # 3 class D frames: not a whole class C frame count
    (info,) = find_sequences(tmp_path)
    assert (info.name, info.cls, info.width, info.frames) == ("RaceHorses", "D", 416, 3)


def test_ambiguous_name_error(tmp_path):
    make_raw(tmp_path, "RaceHorses.yuv", 832, 480, 1)  # = 4 class D frames as well
    with pytest.raises(InputFormatError, match="several CTC sequences.*RaceHorsesC.*RaceHorses"):
        find_sequences(tmp_path)


def test_custom_catalog(tmp_path):
    make_raw(tmp_path, "Desk.yuv", 64, 48, 2)
    cat = (CatalogEntry("E", "Desk", "Desk_64x48_30.yuv", 64, 48, Fraction(30), 9, 8),)
    (info,) = find_sequences(tmp_path, catalog=cat)
    assert (info.cls, info.in_catalog, info.frames, info.ctc_frames) == ("E", True, 2, 9)


def test_y4m_matched_by_name_and_header(tmp_path):
    make_y4m(tmp_path, "Desk_64x48_30.y4m", 64, 48, 2, fps=30)
    make_y4m(tmp_path, "Desk-other.y4m", 32, 24, 1, fps=30)  # header contradicts the catalog size
    cat = (CatalogEntry("E", "Desk", "Desk_64x48_30.yuv", 64, 48, Fraction(30), 9, 8),)
    got = [(i.name, i.cls, i.in_catalog, i.width, i.frames) for i in find_sequences(tmp_path, catalog=cat)]
    assert got == [("Desk-other", "D", False, 32, 1), ("Desk", "E", True, 64, 2)]


# ----------------------------------------------------------------------------------------- errors
def test_missing_directory(tmp_path):
    with pytest.raises(UsageError, match="no such sequence directory"):
        find_sequences(tmp_path / "nope")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        find_sequences(f)


def test_empty_directory(tmp_path):
    with pytest.raises(UsageError, match=r"no \.yuv or \.y4m files"):
        find_sequences(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UsageError, match=r"no \.yuv or \.y4m files"):
        find_sequences(tmp_path)


def test_size_does_not_fit_name(tmp_path):
    make_raw(tmp_path, "Foo_64x48_30.yuv", 64, 48, 3, extra=100)
    with pytest.raises(TruncatedInputError, match="Foo_64x48_30.yuv.*3 frames and 100 bytes left over"):
        find_sequences(tmp_path)


def test_catalog_file_size_does_not_fit(tmp_path):
    make_raw(tmp_path, "BQSquare_416x240_60.yuv", 416, 240, 1, extra=-1)
    with pytest.raises(InputFormatError, match="BQSquare"):
        find_sequences(tmp_path)


def test_empty_file(tmp_path):
    make_raw(tmp_path, "Foo_64x48_30.yuv", 64, 48, 0)
    with pytest.raises(InputFormatError, match="empty"):
        find_sequences(tmp_path)


@pytest.mark.parametrize("name", ["clip.yuv", "Foo_64x48.yuv"])
def test_unparseable_name(tmp_path, name):
    make_raw(tmp_path, name, 64, 48, 1)
    with pytest.raises(InputFormatError, match=name.replace(".", r"\.")):
        find_sequences(tmp_path)


# ---------------------------------------------------------------------------------- real clips
@pytest.mark.skipif(not SHARED_SEQUENCES.is_dir(), reason=f"{SHARED_SEQUENCES} absent")
def test_real_clips():
    # Classes by nearest log-area (see class_for_size): 320x240, 320x192 and CIF 352x288 are all much
    # nearer D (416x240) than C (832x480); 852x480 is C. BasketballPass is the CTC class D sequence itself.
    expected = {
        "BasketballPass": ("D", True), "Cars": ("D", False), "CiscoVT2people": ("D", False),
        "Bus": ("D", False), "MobileCalendar": ("D", False), "Tractor": ("D", False),
        "Railway": ("C", False), "TwoPeopleDesk": ("E", False), "Zhling": ("E", False),
        "StreetTree": ("B", False), "CrowdRunCrop": ("A", False),
    }
    infos = find_sequences(SHARED_SEQUENCES)
    got = {i.name: (i.cls, i.in_catalog) for i in infos}
    assert {k: got.get(k) for k in expected} == expected
    by = {i.name: i for i in infos}
    assert by["BasketballPass"].frames == 64 and by["CrowdRunCrop"].frames == 5
    assert [i.cls for i in infos] == sorted(i.cls for i in infos)
