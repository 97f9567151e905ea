"""The HEVC common-test-condition (CTC) sequence catalog, and discovery of test sequences in a folder.

The catalog (``hevc_ext/data/ctc.csv``, a copy of ``sequences/ctc.csv``; see ``sequences/README.md``)
lists the JCTVC-L1100 sequences with class, name, file name as distributed, geometry, frame rate, the
CTC frame count and bit depth. :func:`find_sequences` lists the ``*.yuv`` / ``*.y4m`` files of a folder
(for ``--sequences DIR``) and describes each as a :class:`SequenceInfo`:

* A file is a **catalog sequence** when its name (without extension, case-insensitive) equals the
  catalog file name's stem, or starts with the catalog name or with the catalog file's name token (the
  part before ``_WxH``, e.g. ``Kimono1``) followed by ``_``, ``-``, ``.`` or nothing. Sizes, frame rate or
  bit depth written in the file name (or a Y4M header) must agree with the catalog, otherwise the file is
  not that sequence. ``RaceHorses`` exists in class C and D; a name without a size is resolved by the file
  size where only one fits, otherwise it is an error. Catalog geometry/rate/depth then apply.
* Any other file needs a JCT-VC style name ``Name_WxH_fps[_10bit].yuv`` (or a Y4M header); its class is
  inferred from the picture area by :func:`class_for_size`, unless ``class_overrides`` names it.

Frame counts are what the file holds (file size / frame size), not the CTC count
(:attr:`SequenceInfo.ctc_frames`).
"""

from __future__ import annotations

import csv
import functools
import io
import logging
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from .errors import InputFormatError, TruncatedInputError, UsageError
from .yuv import VideoFormat, format_from_name, open_video, parse_fps, resolve_format

__all__ = ["CLASSES", "CatalogEntry", "SequenceInfo", "class_for_size", "find_sequences", "load_catalog"]

log = logging.getLogger(__name__)

#: The CTC classes. F (screen content) is optional in the CTC and is never inferred from a resolution.
CLASSES: tuple[str, ...] = ("A", "B", "C", "D", "E", "F")

#: Reference picture size per resolution class, largest area first.
CLASS_SIZES: tuple[tuple[str, int, int], ...] = (
    ("A", 2560, 1600), ("B", 1920, 1080), ("E", 1280, 720), ("C", 832, 480), ("D", 416, 240))

_COLUMNS = ("class", "name", "file", "width", "height", "fps", "frames", "bitdepth")
_EXTENSIONS = (".yuv", ".y4m")
_SIZE_TOKEN = re.compile(r"[_\-.]\d{2,5}x\d{2,5}(?=[_\-.]|$)", re.I)
_SEPARATORS = "_-."


@dataclass(frozen=True)
class CatalogEntry:
    """One CTC sequence as listed in the catalog."""

    cls: str
    name: str
    file: str
    width: int
    height: int
    fps: Fraction
    frames: int
    bitdepth: int

    @property
    def token(self) -> str:
        """The file name before its ``_WxH`` part (``Kimono1`` for ``Kimono1_1920x1080_24.yuv``)."""
        return _name_part(Path(self.file).stem)

    @property
    def video_format(self) -> VideoFormat:
        return VideoFormat(self.width, self.height, self.fps, self.bitdepth)


@dataclass(frozen=True)
class SequenceInfo:
    """A test sequence found on disk."""

    name: str
    path: Path
    cls: str
    width: int
    height: int
    fps: Fraction
    frames: int  #: frames available in the file
    bitdepth: int
    in_catalog: bool
    ctc_frames: int | None = None  #: frames the CTC encode (catalog sequences only)

    @property
    def video_format(self) -> VideoFormat:
        return VideoFormat(self.width, self.height, self.fps, self.bitdepth)


def _name_part(stem: str) -> str:
    m = _SIZE_TOKEN.search(stem)
    return stem[:m.start()] if m and m.start() > 0 else stem


def _check_class(value: str, what: str) -> str:
    cls = str(value).strip().upper()
    if cls not in CLASSES:
        raise UsageError(f"{what}: unknown sequence class {value!r}; expected one of {', '.join(CLASSES)}")
    return cls


# ------------------------------------------------------------------------------------------ catalog
def _parse_catalog(text: str, origin: str) -> tuple[CatalogEntry, ...]:
    reader = csv.DictReader(io.StringIO(text))
    if tuple(reader.fieldnames or ()) != _COLUMNS:
        raise InputFormatError(f"{origin}: expected the columns {','.join(_COLUMNS)}, "
                               f"found {','.join(reader.fieldnames or ())}")
    entries: list[CatalogEntry] = []
    seen: set[str] = set()
    for line, row in enumerate(reader, start=2):
        try:
            entry = CatalogEntry(
                cls=_check_class(row["class"], "column class"), name=row["name"].strip(),
                file=row["file"].strip(), width=int(row["width"]), height=int(row["height"]),
                fps=parse_fps(row["fps"].strip()), frames=int(row["frames"]), bitdepth=int(row["bitdepth"]))
            entry.video_format  # validates geometry and bit depth  # noqa: B018
        except (ValueError, TypeError, AttributeError) as exc:
            raise InputFormatError(f"{origin}:{line}: bad catalog row {row}: {exc}") from None
        if not entry.name or entry.frames <= 0:
            raise InputFormatError(f"{origin}:{line}: bad catalog row {row}")
        if entry.name.lower() in seen:
            raise InputFormatError(f"{origin}:{line}: duplicate sequence name {entry.name!r}")
        seen.add(entry.name.lower())
        entries.append(entry)
    return tuple(entries)


@functools.lru_cache(maxsize=1)
def _packaged_catalog() -> tuple[CatalogEntry, ...]:
    text = resources.files("hevc_ext").joinpath("data").joinpath("ctc.csv").read_text(encoding="utf-8")
    return _parse_catalog(text, "hevc_ext/data/ctc.csv")


def load_catalog(path: str | os.PathLike[str] | None = None) -> tuple[CatalogEntry, ...]:
    """The CTC catalog shipped with the package, or the catalog CSV at ``path``."""
    if path is None:
        return _packaged_catalog()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InputFormatError(f"{path}: cannot read the sequence catalog: {exc.strerror}") from None
    return _parse_catalog(text, str(path))


# ----------------------------------------------------------------------------------- classification
def class_for_size(width: int, height: int) -> str:
    """The CTC resolution class (A, B, C, D or E) whose reference picture area is nearest.

    Nearness is measured on a logarithmic scale (area ratio), so the boundary between two neighbouring
    classes is the geometric mean of their reference areas: A 2560x1600, B 1920x1080, E 1280x720,
    C 832x480, D 416x240. An exact tie goes to the larger class (e.g. 624x320 = 199,680 pixels, the
    geometric mean of C and D, is C). Anything at least as large as A is A, anything at most as large
    as D is D. Examples: 352x288 (CIF) and 320x192 are D, 852x480 is C, 1024x768 is E.
    Class F (screen content) is never inferred.
    """
    if width <= 0 or height <= 0:
        raise UsageError(f"invalid frame size {width}x{height}")
    area = width * height
    for (big, bw, bh), (small, sw, sh) in zip(CLASS_SIZES, CLASS_SIZES[1:]):
        upper, lower = bw * bh, sw * sh
        if area >= upper:
            return big
        if area > lower:
            # nearer to the upper class in log-area iff area / lower >= upper / area (ties: upper)
            return big if area * area >= upper * lower else small
    return CLASS_SIZES[-1][0]


# ------------------------------------------------------------------------------------------ probing
def _frames_in_raw(path: Path, fmt: VideoFormat) -> int:
    size = path.stat().st_size
    count, rest = divmod(size, fmt.frame_bytes)
    if rest:
        raise TruncatedInputError(
            f"{path}: size {size} bytes is not a whole number of {fmt.describe()} frames "
            f"({fmt.frame_bytes} bytes each): {count} frames and {rest} bytes left over; the file is "
            f"truncated or its name does not match its content")
    if count == 0:
        raise InputFormatError(f"{path}: empty (no whole {fmt.describe()} frame)")
    return count


def _probe_y4m(path: Path) -> tuple[VideoFormat, int]:
    src = open_video(str(path))
    try:
        frames = len(src) if src.random_access else sum(1 for _ in src)
        return src.fmt, frames
    finally:
        src.close()
        stream = getattr(src, "_stream", None)  # sequential Y4M sources own an open file
        if stream is not None:
            stream.close()


def _candidates(stem: str, catalog: Sequence[CatalogEntry]) -> list[CatalogEntry]:
    low = stem.lower()
    exact = [e for e in catalog if Path(e.file).stem.lower() == low]
    if exact:
        return exact
    found = []
    for e in catalog:
        for token in {e.name.lower(), e.token.lower()}:
            if low == token or (low.startswith(token) and low[len(token)] in _SEPARATORS):
                found.append(e)
                break
    return found


def _agrees(entry: CatalogEntry, width: int | None, height: int | None, fps: Fraction | None,
            bitdepth: int | None) -> bool:
    return ((width is None or (width, height) == (entry.width, entry.height))
            and (fps is None or fps == entry.fps)
            and (bitdepth is None or bitdepth == entry.bitdepth))


def _describe(path: Path, catalog: Sequence[CatalogEntry], overrides: Mapping[str, str]) -> SequenceInfo:
    is_y4m = path.suffix.lower() == ".y4m"
    header: tuple[VideoFormat, int] | None = _probe_y4m(path) if is_y4m else None
    if header is not None:
        hf = header[0]
        w, h, fps, depth = hf.width, hf.height, hf.fps, hf.bitdepth
    else:
        guess = format_from_name(path.name)
        w, h, fps, depth = guess if guess is not None else (None, None, None, None)

    entries = [e for e in _candidates(path.stem, catalog) if _agrees(e, w, h, fps, depth)]
    if len(entries) > 1 and header is None:
        size = path.stat().st_size
        fitting = [e for e in entries if size and size % e.video_format.frame_bytes == 0]
        if len(fitting) == 1:
            entries = fitting
        else:
            names = ", ".join(f"{e.name} ({e.width}x{e.height}, class {e.cls})" for e in entries)
            raise InputFormatError(f"{path}: the name matches several CTC sequences ({names}) and the "
                                   f"file size does not decide; put the size in the name, e.g. "
                                   f"{entries[0].file}")

    if entries:
        entry = entries[0]
        if header is not None:
            fmt, frames = header
        else:
            fmt = entry.video_format
            frames = _frames_in_raw(path, fmt)
        name, cls, ctc_frames = entry.name, entry.cls, entry.frames
    else:
        if header is not None:
            fmt, frames = header
        else:
            try:
                fmt = resolve_format(str(path))
            except UsageError as exc:
                raise InputFormatError(f"{exc} (or use a CTC sequence name from the catalog)") from None
            frames = _frames_in_raw(path, fmt)
        name, cls, ctc_frames = _name_part(path.stem), class_for_size(fmt.width, fmt.height), None
    override = overrides.get(name.lower())
    if override is not None:
        cls = override
    return SequenceInfo(name=name, path=path, cls=cls, width=fmt.width, height=fmt.height, fps=fmt.fps,
                        frames=frames, bitdepth=fmt.bitdepth, in_catalog=bool(entries), ctc_frames=ctc_frames)


def find_sequences(directory: str | os.PathLike[str], classes: Iterable[str] | None = None,
                   class_overrides: Mapping[str, str] | None = None,
                   catalog: Sequence[CatalogEntry] | None = None) -> list[SequenceInfo]:
    """Every ``*.yuv`` and ``*.y4m`` file directly in ``directory``, sorted by (class, name, file name).

    ``classes`` keeps only those classes (letters, case-insensitive). ``class_overrides`` maps sequence
    names (case-insensitive) to a class, and wins over the catalog and over resolution inference.
    ``catalog`` replaces the packaged CTC catalog. Raises :class:`UsageError` for a missing directory,
    one without video files, bad class letters or a filter that leaves nothing, and
    :class:`InputFormatError` for a file whose size does not fit its name or whose format cannot be told.
    """
    root = Path(directory)
    if not root.exists():
        raise UsageError(f"{root}: no such sequence directory")
    if not root.is_dir():
        raise UsageError(f"{root}: not a directory (expected a folder of .yuv/.y4m sequences)")
    wanted = None if classes is None else {_check_class(c, "classes") for c in classes}
    overrides = {str(k).lower(): _check_class(v, f"class override for {k!r}")
                 for k, v in (class_overrides or {}).items()}
    entries = load_catalog() if catalog is None else tuple(catalog)

    files = sorted(p for p in root.iterdir() if p.suffix.lower() in _EXTENSIONS and p.is_file())
    if not files:
        raise UsageError(f"{root}: no .yuv or .y4m files in this directory")
    infos = [_describe(p, entries, overrides) for p in files]

    unused = set(overrides) - {i.name.lower() for i in infos}
    if unused:
        log.warning("class overrides name no sequence in %s: %s", root, ", ".join(sorted(unused)))
    by_name: dict[str, list[str]] = {}
    for info in infos:
        by_name.setdefault(info.name.lower(), []).append(info.path.name)
    for dupes in by_name.values():
        if len(dupes) > 1:
            log.warning("several files describe the same sequence: %s", ", ".join(dupes))

    if wanted is not None:
        kept = [i for i in infos if i.cls in wanted]
        if not kept:
            present = ", ".join(sorted({i.cls for i in infos}))
            raise UsageError(f"{root}: no sequence of class {', '.join(sorted(wanted))} "
                             f"(classes present: {present})")
        infos = kept
    return sorted(infos, key=lambda i: (i.cls, i.name.casefold(), i.name, i.path.name))
