"""Raw YUV 4:2:0 and Y4M input/output.

Frames are integer numpy arrays (``uint8`` for 8-bit, ``uint16`` for 9–16-bit samples) and are never
converted to float here. Regular files are memory-mapped through a structured dtype (one record = one
frame), so opening a 2560×1600 clip costs nothing until a frame is touched; ``-`` reads or writes a
pipe sequentially.

Outputs are written to a temporary name beside the target and renamed when complete, so a failed run
never leaves a half-written file behind (:mod:`hevc_ext.files`).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

import numpy as np

from .errors import InputFormatError, TruncatedInputError, UsageError
from .files import check_input

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"(?:^|[_\-.])(\d{1,5})x(\d{1,5})(?:_(\d+(?:\.\d+)?)(?:fps|hz)?)?(?=[_\-.]|$)", re.I)
_BITDEPTH_RE = re.compile(r"[_\-.](8|9|10|12|16)b(?:it)?(?=[_\-.]|$)", re.I)


@dataclass(frozen=True)
class VideoFormat:
    """Geometry and sample format of a 4:2:0 video."""

    width: int
    height: int
    fps: Fraction = Fraction(30)
    bitdepth: int = 8

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise UsageError(f"invalid frame size {self.width}x{self.height}")
        if self.width % 2 or self.height % 2:
            raise UsageError(f"4:2:0 video needs an even width and height, got {self.width}x{self.height}")
        if not 8 <= self.bitdepth <= 16:
            raise UsageError(f"unsupported bit depth {self.bitdepth} (8..16)")
        if self.fps <= 0:
            raise UsageError(f"invalid frame rate {self.fps}")

    @property
    def chroma_shape(self) -> tuple[int, int]:
        return (self.height // 2, self.width // 2)

    @property
    def dtype(self) -> np.dtype:
        return sample_dtype(self.bitdepth)

    @property
    def frame_dtype(self) -> np.dtype:
        """Structured dtype of one raw frame: fields ``y``, ``u``, ``v``."""
        ch, cw = self.chroma_shape
        return np.dtype([("y", self.dtype, (self.height, self.width)),
                         ("u", self.dtype, (ch, cw)), ("v", self.dtype, (ch, cw))])

    @property
    def frame_bytes(self) -> int:
        return self.frame_dtype.itemsize

    @property
    def max_value(self) -> int:
        return (1 << self.bitdepth) - 1

    def describe(self) -> str:
        return f"{self.width}x{self.height} 4:2:0 {self.bitdepth}-bit @ {float(self.fps):g} fps"


@dataclass(frozen=True)
class Frame:
    """One 4:2:0 picture: three integer planes."""

    y: np.ndarray
    u: np.ndarray
    v: np.ndarray

    @property
    def planes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (self.y, self.u, self.v)


def parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise UsageError(f"invalid size {text!r}: expected WIDTHxHEIGHT, e.g. 416x240")
    return int(m.group(1)), int(m.group(2))


def sample_dtype(bitdepth: int) -> np.dtype:
    """How samples are stored (in files, hashes and arrays): bytes at 8 bits, 16-bit little-endian above."""
    return np.dtype(np.uint8) if bitdepth == 8 else np.dtype("<u2")


#: the largest numerator and denominator of a frame rate (what the side stream's header can code)
MAX_FPS_TERM = 1 << 20


def parse_fps(text: str | float | Fraction) -> Fraction:
    """A frame rate from ``"25"``, ``"29.97"`` (to within 1/1001), ``"30000:1001"`` or a number."""
    try:
        if isinstance(text, str) and ":" in text:
            num, den = text.split(":")
            fps = Fraction(int(num), int(den))
        else:
            fps = Fraction(str(text)).limit_denominator(1001)
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"invalid frame rate {text!r}") from None
    if fps <= 0:
        raise UsageError(f"invalid frame rate {text!r}")
    if fps.numerator > MAX_FPS_TERM or fps.denominator > MAX_FPS_TERM:
        raise UsageError(f"frame rate {text!r} is out of range: numerator and denominator must be at most "
                         f"{MAX_FPS_TERM} (the side stream codes them so)")
    return fps


def format_from_name(path: str | os.PathLike) -> tuple[int, int, Fraction | None, int | None] | None:
    """Width, height, fps and bit depth from a JCT-VC style name ``Name_WxH_fps[_10bit].yuv``."""
    name = Path(path).name
    matches = list(_NAME_RE.finditer(name))
    if not matches:
        return None
    m = matches[-1]
    fps = parse_fps(m.group(3)) if m.group(3) else None
    bd = _BITDEPTH_RE.search(name)
    return int(m.group(1)), int(m.group(2)), fps, (int(bd.group(1)) if bd else None)


def resolve_format(path: str, size: str | None = None, fps: str | float | None = None,
                   bitdepth: int | None = None) -> VideoFormat:
    """The format of a raw ``.yuv`` input: explicit options win over the file name."""
    guess = None if path == "-" else format_from_name(path)
    if size is not None:
        w, h = parse_size(size)
    elif guess is not None:
        w, h = guess[0], guess[1]
    else:
        raise UsageError(f"{path}: cannot tell the frame size; name the file Name_WxH_fps.yuv "
                         f"or pass --size WxH --fps F")
    if fps is not None:
        rate = parse_fps(fps)
    elif guess is not None and guess[2] is not None:
        rate = guess[2]
    else:
        raise UsageError(f"{path}: cannot tell the frame rate; name the file Name_WxH_fps.yuv or pass --fps F")
    depth = bitdepth if bitdepth is not None else (guess[3] if guess and guess[3] else 8)
    if guess is not None:  # an option that contradicts the name is probably a mistake: say which wins
        named = {"size": (f"{guess[0]}x{guess[1]}", f"{w}x{h}", size), "frame rate": (guess[2], rate, fps),
                 "bit depth": (guess[3], depth, bitdepth)}
        for what, (in_name, used, given) in named.items():
            if given is not None and in_name is not None and in_name != used:
                log.warning("%s: the %s given (%s) overrides the %s in the file name", path, what, used, in_name)
    return VideoFormat(w, h, rate, depth)


# --------------------------------------------------------------------------------------------- Y4M
_Y4M_MAGIC = b"YUV4MPEG2"
_Y4M_COLORSPACES = {"420": 8, "420jpeg": 8, "420paldv": 8, "420mpeg2": 8,
                    "420p9": 9, "420p10": 10, "420p12": 12, "420p14": 14, "420p16": 16}


def _parse_y4m_header(line: bytes, origin: str) -> VideoFormat:
    if not line.startswith(_Y4M_MAGIC):
        raise InputFormatError(f"{origin}: not a Y4M stream (expected 'YUV4MPEG2', found {line[:9]!r})")
    w = h = None
    fps = Fraction(25)
    depth = 8
    for tok in line.decode("ascii", "replace").split()[1:]:
        key, val = tok[0], tok[1:]
        try:
            if key in "WH" and not val.isdigit():
                raise ValueError("expected a whole number of samples")
            if key == "W":
                w = int(val)
            elif key == "H":
                h = int(val)
            elif key == "F":
                fps = parse_fps(val)
            elif key == "C":
                if val not in _Y4M_COLORSPACES:
                    raise InputFormatError(f"{origin}: Y4M colour space C{val} is not supported "
                                           f"(expected 4:2:0: {', '.join('C' + k for k in _Y4M_COLORSPACES)})")
                depth = _Y4M_COLORSPACES[val]
            elif key == "I" and val not in ("p", "?"):
                raise InputFormatError(f"{origin}: interlaced Y4M (I{val}) is not supported")
        except InputFormatError:
            raise
        except (ValueError, UsageError) as exc:
            raise InputFormatError(f"{origin}: bad Y4M header field {tok!r}: {exc}") from None
    if w is None or h is None:
        raise InputFormatError(f"{origin}: Y4M header lacks W or H: {line!r}")
    try:
        return VideoFormat(w, h, fps, depth)
    except UsageError as exc:
        raise InputFormatError(f"{origin}: {exc}") from None


def y4m_header(fmt: VideoFormat) -> bytes:
    cs = "420jpeg" if fmt.bitdepth == 8 else f"420p{fmt.bitdepth}"
    return (f"YUV4MPEG2 W{fmt.width} H{fmt.height} F{fmt.fps.numerator}:{fmt.fps.denominator} "
            f"Ip A1:1 C{cs}\n").encode("ascii")


# ------------------------------------------------------------------------------------------ sources
class VideoSource:
    """A sequence of frames. File sources allow random access; pipe sources are read once, in order."""

    fmt: VideoFormat
    origin: str

    def __len__(self) -> int:  # pragma: no cover - overridden
        raise TypeError("length unknown for a streamed source")

    def __getitem__(self, index: int) -> Frame:  # pragma: no cover - overridden
        raise TypeError("random access is not possible on a streamed source")

    def __iter__(self) -> Iterator[Frame]:  # pragma: no cover - overridden
        for i in range(len(self)):
            yield self[i]

    @property
    def random_access(self) -> bool:
        return True

    def close(self) -> None:
        pass

    def __enter__(self) -> "VideoSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MemmapSource(VideoSource):
    """Frames of a raw ``.yuv`` or a ``.y4m`` file, viewed through a memory map."""

    def __init__(self, path: str, fmt: VideoFormat, offset: int, frame_header: int, count: int) -> None:
        self.fmt, self.origin = fmt, path
        fields = [("hdr", np.uint8, (frame_header,))] if frame_header else []
        ft = fmt.frame_dtype
        dtype = np.dtype(fields + [(n, ft.fields[n][0]) for n in ("y", "u", "v")])
        self._records = (np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))
                         if count else np.zeros(0, dtype))

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Frame:
        if not -len(self) <= index < len(self):
            raise IndexError(f"frame {index} out of range (0..{len(self) - 1})")
        r = self._records[index]
        return Frame(r["y"], r["u"], r["v"])

    def close(self) -> None:
        self._records = self._records[:0]


class StreamSource(VideoSource):
    """Frames read sequentially from a binary stream (a pipe), raw or Y4M."""

    def __init__(self, stream: BinaryIO, fmt: VideoFormat, origin: str, y4m: bool, owned: bool = False) -> None:
        self.fmt, self.origin, self._stream, self._y4m = fmt, origin, stream, y4m
        self._owned = owned

    def close(self) -> None:
        if self._owned:
            self._stream.close()

    @property
    def random_access(self) -> bool:
        return False

    def __len__(self) -> int:
        raise TypeError(f"{self.origin}: the frame count of a pipe is not known in advance")

    def __iter__(self) -> Iterator[Frame]:
        ft = self.fmt.frame_dtype
        index = 0
        while True:
            if self._y4m:
                line = self._stream.readline(4096)
                if not line:
                    return
                if not line.startswith(b"FRAME"):
                    raise InputFormatError(f"{self.origin}: frame {index}: expected 'FRAME', found {line[:16]!r}")
            data = _read_exact(self._stream, ft.itemsize)
            if not data:
                if self._y4m:
                    raise TruncatedInputError(f"{self.origin}: frame {index} header without picture data")
                return
            if len(data) < ft.itemsize:
                raise TruncatedInputError(f"{self.origin}: frame {index} is truncated: {len(data)} of "
                                          f"{ft.itemsize} bytes ({self.fmt.describe()})")
            rec = np.frombuffer(data, dtype=ft)[0]
            yield Frame(rec["y"], rec["u"], rec["v"])
            index += 1


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _stdin() -> BinaryIO:
    return sys.stdin.buffer


def open_video(path: str, size: str | None = None, fps: str | float | None = None,
               bitdepth: int | None = None, stdin: BinaryIO | None = None) -> VideoSource:
    """Open a raw ``.yuv`` or ``.y4m`` file, or ``-`` (Y4M, or raw with ``size``) from standard input."""
    if path == "-":
        stream = stdin if stdin is not None else _stdin()
        if size is None:
            header = stream.readline(4096)
            if not header:
                raise TruncatedInputError("<stdin>: empty input")
            fmt = _parse_y4m_header(header.rstrip(b"\n"), "<stdin>")
            if fps is not None:
                fmt = VideoFormat(fmt.width, fmt.height, parse_fps(fps), fmt.bitdepth)
            return StreamSource(stream, fmt, "<stdin>", y4m=True)
        return StreamSource(stream, resolve_format("-", size, fps or 25, bitdepth), "<stdin>", y4m=False)
    check_input(path, "a .yuv or .y4m file")
    if path.lower().endswith(".y4m"):
        src = _open_y4m_file(path, fps)
        problem = None
        if size is not None and parse_size(size) != (src.fmt.width, src.fmt.height):
            problem = f"--size {size} contradicts the Y4M header ({src.fmt.width}x{src.fmt.height})"
        elif bitdepth is not None and bitdepth != src.fmt.bitdepth:
            problem = f"--bitdepth {bitdepth} contradicts the Y4M header ({src.fmt.bitdepth}-bit)"
        if problem:
            src.close()
            raise UsageError(f"{path}: {problem}; the header decides, leave the option out")
        return src
    fmt = resolve_format(path, size, fps, bitdepth)
    total = os.path.getsize(path)
    count, rest = divmod(total, fmt.frame_bytes)
    if rest:
        raise TruncatedInputError(
            f"{path}: size {total} bytes is not a whole number of {fmt.describe()} frames "
            f"({fmt.frame_bytes} bytes each): {count} frames and {rest} bytes left over. "
            f"The file is truncated, or the size/bit depth is wrong (pass --size WxH / --bitdepth)")
    if count == 0:
        raise InputFormatError(f"{path}: empty (no frame of {fmt.frame_bytes} bytes)")
    return MemmapSource(path, fmt, 0, 0, count)


def _open_y4m_file(path: str, fps: str | float | None) -> VideoSource:
    with open(path, "rb") as f:
        header = f.readline(4096)
        if not header:
            raise InputFormatError(f"{path}: empty file (expected a Y4M stream)")
        if not header.endswith(b"\n"):
            raise InputFormatError(f"{path}: Y4M header line is not terminated")
        fmt = _parse_y4m_header(header.rstrip(b"\n"), path)
        if fps is not None:
            fmt = VideoFormat(fmt.width, fmt.height, parse_fps(fps), fmt.bitdepth)
        first = f.readline(4096)
    total = os.path.getsize(path)
    payload = total - len(header)
    if first == b"FRAME\n":
        unit = fmt.frame_bytes + 6
        count, rest = divmod(payload, unit)
        if rest:
            raise TruncatedInputError(f"{path}: {count} whole frames of {fmt.describe()} and {rest} "
                                      f"bytes left over (truncated file?)")
        src = MemmapSource(path, fmt, len(header), 6, count)
        for i in range(count):
            if bytes(src._records[i]["hdr"]) != b"FRAME\n":  # noqa: SLF001 - own class
                raise InputFormatError(f"{path}: frame {i}: Y4M frame header is not 'FRAME'")
        return src
    if not first and payload == 0:
        raise InputFormatError(f"{path}: Y4M file without frames")
    # Frame headers with parameters: fall back to sequential reading.
    stream = open(path, "rb")  # noqa: SIM115 - owned by the source
    stream.readline(4096)
    return StreamSource(stream, fmt, path, y4m=True, owned=True)


# --------------------------------------------------------------------------------------------- output
class VideoWriter:
    """Writes frames as raw planar YUV or Y4M to an open binary handle."""

    def __init__(self, handle: BinaryIO, fmt: VideoFormat, y4m: bool) -> None:
        self._handle, self.fmt, self._y4m = handle, fmt, y4m
        if y4m:
            handle.write(y4m_header(fmt))

    def write(self, frame: Frame | Sequence[np.ndarray]) -> None:
        planes = frame.planes if isinstance(frame, Frame) else tuple(frame)
        if self._y4m:
            self._handle.write(b"FRAME\n")
        for plane in planes:
            self._handle.write(np.ascontiguousarray(plane, dtype=self.fmt.dtype).tobytes())


def is_y4m_name(path: str) -> bool:
    return path.lower().endswith(".y4m")
