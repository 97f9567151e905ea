"""What the scripts under tools/ share: how they end on bad input, and how they write their results.

A script ends with ``sys.exit(toolmain.run(main))``: an error of the package (``NlfError``: a file
that is not there, a kernel that cannot run, a result file that cannot be written) becomes one line
``<script>: error: <what>`` on stderr and exit status 2, as argparse does for a bad option, instead
of a traceback. Results are written with :func:`write_json` (under a temporary name, renamed when
complete: an interrupted run leaves no half-written file).

The scripts put the repository first on ``sys.path`` so that they measure this checkout's package.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
if sys.path[:1] != [str(REPO)]:  # this checkout first, before any installed copy
    sys.path.insert(0, str(REPO))

from hevc_ext.cli import positive_int  # noqa: E402  (the CLI's argparse type, for the scripts' options)
from hevc_ext.errors import NlfError  # noqa: E402
from hevc_ext.files import atomic_output  # noqa: E402

__all__ = ["REPO", "atomic_output", "frame_sizes", "positive_int", "run", "write_json"]


def run(main: Callable[[], int]) -> int:
    """``main()``'s exit status; a package error is reported in one line with status 2."""
    name = Path(sys.argv[0]).stem or "tool"
    try:
        return main()
    except NlfError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130


def write_json(path: str | Path, doc: Any, indent: int | None = 2) -> None:
    """``doc`` as JSON at ``path``, which appears only once it is complete."""
    with atomic_output(path) as f:
        f.write((json.dumps(doc, indent=indent) + "\n").encode())


def frame_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """argparse type: a comma-separated list of WIDTHxHEIGHT, each at least 1x1."""
    sizes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        try:
            w, h = (int(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item.strip()!r} is not WIDTHxHEIGHT (for example 1920x1080)") from None
        if w < 1 or h < 1:
            raise argparse.ArgumentTypeError(f"{item.strip()!r}: width and height must be at least 1")
        sizes.append((w, h))
    return tuple(sizes)
