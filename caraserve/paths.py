"""Whether a folder can take new files, tried before work whose results go there (a long job's
output, a compile cache) rather than found out after it."""

from __future__ import annotations

import tempfile
from pathlib import Path


def cannot_write(folder: Path, make: bool = False) -> str | None:
    """Why files cannot be created in `folder`, or None when they can: tried with a temporary
    file (nothing is left behind). make: create the folder first (with its parents); else a
    folder not made yet is tried through its nearest existing ancestor, and nothing is made."""
    folder = Path(folder).absolute()
    try:
        if make:
            folder.mkdir(parents=True, exist_ok=True)
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as e:
        return e.strerror or str(e)
