"""Parsing the console logs of the HM reference software (TAppEncoder / TAppDecoder), HM-16.x.

Pure functions over the text HM prints on standard output; nothing here runs HM. Tested on the logs
of HM-16.17 and HM-16.20 (tests/fixtures/hm/), and written to tolerate the known variations:

* the version banner ``HM software: Encoder Version [16.17] (including RExt)[Linux][GCC 12.2.0][64 bit]``;
* per-picture lines, printed in **coding order**::

      POC    2 TId: 3 ( B-SLICE, nQP 45 QP 45 )       1296 bits [Y 32.2806 dB    U 38.3223 dB    V 37.9055 dB] [ET     1 ] [L0 0 ] [L1 0 ]

  with or without ``nQP`` (ADAPTIVE_QP_SELECTION), a lower-case slice letter for non-referenced
  pictures (``b-SLICE``), later versions' ``LId:`` and NAL-type fields, and optional bracketed fields
  after the PSNRs (xPSNR, MS-SSIM, MSE, hex PSNRs) that are ignored;
* the SUMMARY tables (``a`` = all, ``i``, ``p``, ``b``), read by their column headers, with ``-nan``
  for a slice type that has no pictures and trailing spaces (16.20);
* ``Bytes written to file: 3718 (495.733 kbps)`` and ``Total Time: 2.616 sec.``.

HM's per-picture bits count every NAL unit of the access unit **except SEI messages**, plus 4 or 3
start-code bytes per NAL unit (TEncGOP::xCalculateAddPSNR); the SUMMARY bitrate is their sum times
``FrameRate / frames`` (HM's integer ``-fr``). "Bytes written to file" is the whole file, SEIs included.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .errors import BackendError

_VERSION_RE = re.compile(r"HM software:\s*(Encoder|Decoder) Version \[([^\]]+)\]([^\n]*)")
_POC_RE = re.compile(
    r"^POC\s+(?P<poc>-?\d+)\s+(?:LId:\s*\d+\s+)?TId:\s*(?P<tid>\d+)\s+\(\s*(?:[A-Z_]+,\s*)?"
    r"(?P<type>[IPBipb])-SLICE,\s*(?:nQP\s*(?P<nqp>-?\d+)\s+)?QP\s*(?P<qp>-?\d+)\s*\)"
    r"(?:\s+(?P<bits>\d+)\s+bits)?(?P<rest>.*)$")
_PSNR_RE = re.compile(r"\[Y\s+(?P<y>\S+)\s+dB\s+U\s+(?P<u>\S+)\s+dB\s+V\s+(?P<v>\S+)\s+dB\]")
_SUMMARY_TITLES = {"SUMMARY": "all", "I Slices": "I", "P Slices": "P", "B Slices": "B"}
_SUMMARY_TITLE_RE = re.compile(r"^\s*(SUMMARY|I Slices|P Slices|B Slices)\s*-{4,}\s*$")
_BYTES_RE = re.compile(r"Bytes written to file:\s*(\d+)\s*\(\s*([-\w.]+)\s*kbps\)")
_TIME_RE = re.compile(r"Total Time:\s*([\d.]+)\s*sec")
_SETTING_RE = re.compile(r"^([A-Za-z][^:]*?)\s*:\s(.*)$")
_HASH_RE = re.compile(r"\[(?:MD5|CRC|Checksum):[^\]]*\((OK|\*\*\*ERROR\*\*\*)\)\]")  # decoder: "[MD5:…,(OK)]"


def _number(text: str) -> float | None:
    """A number printed by HM; ``-nan``/``nan``/``inf`` (no pictures of that kind) → None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class PictureLine:
    """One ``POC ...`` line of the encoder (or decoder) log."""

    poc: int
    tid: int
    slice_type: str  # I, P or B (upper case; ``referenced`` tells what the lower-case letter meant)
    qp: int
    nqp: int | None = None
    bits: int | None = None  # encoder only
    psnr: dict[str, float | None] | None = None  # encoder only: {"y", "u", "v"}
    referenced: bool = True
    hash_status: str | None = None  # decoder only: "OK", "ERROR" or None (no hash SEI)


@dataclass(frozen=True)
class SummaryRow:
    """One row of a SUMMARY table. ``kbps`` uses HM's own (integer) frame rate."""

    frames: int
    kbps: float | None
    psnr: dict[str, float | None]  # y, u, v, yuv (HM's YUV-PSNR: from the 4:1:1-weighted mean MSE)
    extra: dict[str, float | None] = field(default_factory=dict)  # other columns (MSE, xPSNR...)

    def as_dict(self) -> dict:
        d = {"frames": self.frames, "kbps": self.kbps, **{f"psnr_{k}": v for k, v in self.psnr.items()}}
        d.update(self.extra)
        return d


@dataclass
class EncoderLog:
    version: str | None = None  # "16.17"
    banner: str | None = None  # the whole "HM software: ..." line
    settings: dict[str, str] = field(default_factory=dict)  # "Intra period" → "32", ...
    pictures: list[PictureLine] = field(default_factory=list)  # coding order
    summary: dict[str, SummaryRow] = field(default_factory=dict)  # "all", "I", "P", "B"
    bytes_written: int | None = None
    kbps_written: float | None = None
    total_seconds: float | None = None

    @property
    def complete(self) -> bool:
        return "all" in self.summary and self.bytes_written is not None


def parse_version(text: str) -> tuple[str, str] | None:
    """``("16.17", "HM software: Encoder Version [16.17] (including RExt)[...]")`` or None."""
    m = _VERSION_RE.search(text)
    if not m:
        return None
    return m.group(2).strip(), m.group(0).strip()


def parse_picture_line(line: str) -> PictureLine | None:
    m = _POC_RE.match(line.strip())
    if not m:
        return None
    rest = m.group("rest")
    psnr = None
    pm = _PSNR_RE.search(rest)
    if pm:
        psnr = {k: _number(pm.group(k)) for k in ("y", "u", "v")}
    hm = _HASH_RE.search(rest)
    status = None if hm is None else ("OK" if hm.group(1) == "OK" else "ERROR")
    letter = m.group("type")
    return PictureLine(poc=int(m.group("poc")), tid=int(m.group("tid")), slice_type=letter.upper(),
                       qp=int(m.group("qp")), nqp=int(m.group("nqp")) if m.group("nqp") else None,
                       bits=int(m.group("bits")) if m.group("bits") else None, psnr=psnr,
                       referenced=letter.isupper(), hash_status=status)


def _summary_columns(header: str) -> list[str]:
    """Column names after ``Total Frames |``: ``Bitrate Y-PSNR U-PSNR V-PSNR YUV-PSNR [...]``."""
    if "|" not in header:
        raise ValueError("not a SUMMARY header")
    return header.split("|", 1)[1].split()


def _summary_row(header: str, values: str) -> SummaryRow:
    cols = _summary_columns(header)
    tokens = values.split()
    if tokens and tokens[0].endswith(":"):  # "Average:" prefix when MSE-based SNR is printed
        tokens = tokens[1:]
    if len(tokens) < 2 + len(cols):
        raise ValueError(f"SUMMARY row has {len(tokens)} fields for {len(cols)} columns: {values.strip()!r}")
    frames = int(tokens[0])
    nums = {name: _number(tok) for name, tok in zip(cols, tokens[2:])}
    psnr_names = {"Y-PSNR": "y", "U-PSNR": "u", "V-PSNR": "v", "YUV-PSNR": "yuv"}
    psnr = {short: nums.pop(name, None) for name, short in psnr_names.items()}
    kbps = nums.pop("Bitrate", None)
    return SummaryRow(frames, kbps, psnr, {k.lower(): v for k, v in nums.items()})


def parse_encoder_log(text: str) -> EncoderLog:
    """Everything of interest in a TAppEncoder log (possibly incomplete, e.g. after a crash)."""
    out = EncoderLog()
    ver = parse_version(text)
    if ver:
        out.version, out.banner = ver
    lines = text.splitlines()
    seen_poc = False
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("POC"):
            pic = parse_picture_line(stripped)
            if pic is not None:
                out.pictures.append(pic)
                seen_poc = True
                i += 1
                continue
        title = _SUMMARY_TITLE_RE.match(line)
        if title and i + 2 < len(lines) and "|" in lines[i + 1]:
            try:
                out.summary[_SUMMARY_TITLES[title.group(1)]] = _summary_row(lines[i + 1], lines[i + 2])
            except ValueError:
                pass
            i += 3
            continue
        m = _BYTES_RE.search(line)
        if m:
            out.bytes_written, out.kbps_written = int(m.group(1)), _number(m.group(2))
        m = _TIME_RE.search(line)
        if m:
            out.total_seconds = float(m.group(1))
        if not seen_poc:
            s = _SETTING_RE.match(stripped)
            if s and not stripped.startswith("HM software"):
                out.settings.setdefault(re.sub(r"\s+", " ", s.group(1)), s.group(2).strip())
        i += 1
    return out


def parse_decoder_log(text: str) -> tuple[str | None, list[PictureLine]]:
    """HM version and the pictures, in decoding order, of a TAppDecoder log."""
    ver = parse_version(text)
    pics = [p for p in (parse_picture_line(line) for line in text.splitlines()) if p is not None]
    return (ver[0] if ver else None), pics


def display_order_bits(pictures: list[PictureLine], frames: int) -> list[int]:
    """Bits per picture in display order (POC 0..frames-1) from the coding-order records.

    HM's POC counts from 0 in display order over the whole sequence (CRA pictures do not reset it),
    so the POC is the display index. Every POC must appear exactly once.
    """
    bits: list[int | None] = [None] * frames
    for p in pictures:
        if not 0 <= p.poc < frames:
            raise BackendError(f"HM log: POC {p.poc} outside 0..{frames - 1}")
        if bits[p.poc] is not None:
            raise BackendError(f"HM log: POC {p.poc} appears twice")
        if p.bits is None:
            raise BackendError(f"HM log: POC {p.poc} has no bit count")
        bits[p.poc] = p.bits
    missing = [i for i, b in enumerate(bits) if b is None]
    if missing:
        shown = ", ".join(str(i) for i in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise BackendError(f"HM log: no record for POC {shown} ({len(missing)} of {frames} pictures missing)")
    return [int(b) for b in bits]  # type: ignore[arg-type]


def display_order(pictures: list[PictureLine]) -> list[PictureLine]:
    return sorted(pictures, key=lambda p: p.poc)
