"""Further ``hevc-nlf`` subcommands (evaluation, side-stream tools), registered on the main parser."""

from __future__ import annotations

import argparse
from typing import Callable


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]",
             add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add the extra subcommands to ``sub``."""
