"""Argument types for the profiling scripts' command lines: a bad value is argparse's one-line
usage error naming the option (exit status 2), before anything is built or measured."""

from __future__ import annotations

import argparse
from pathlib import Path

from caraserve.paths import cannot_write


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def positive_ints(text: str) -> list[int]:
    """A comma-separated list of integers >= 1, e.g. 1,4,8."""
    parts = [p.strip() for p in text.split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers")
    return [positive_int(p) for p in parts]


def output_file(text: str) -> Path:
    """A file the results can be written to: its folder is made and tried now, so a long sweep's
    results are not lost at the end to a path that cannot be written."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder")
    why = cannot_write(path.parent, make=True)
    if why is not None:
        raise argparse.ArgumentTypeError(f"cannot write in {path.parent} ({why})")
    return path
