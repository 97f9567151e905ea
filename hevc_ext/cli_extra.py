"""Further ``hevc-nlf`` subcommands, registered on the main parser by the modules that own them:
``cli_eval`` (eval, bdrate) and ``cli_stream`` (extract, strip, transcode)."""

from __future__ import annotations

import argparse
import importlib
from typing import Callable

_MODULES = ("cli_eval", "cli_stream")


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]",
             add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add the extra subcommands to ``sub`` (each module defines ``register(sub, add_common)``)."""
    for name in _MODULES:
        try:
            module = importlib.import_module(f"hevc_ext.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"hevc_ext.{name}":
                raise
            continue
        module.register(sub, add_common)
