"""The compiled decode step's cache across restarts (engine.compile_cache_dir): torch's portable
artifacts in one file, and inductor's own cache folder beside it, which on CPU holds the built
C++ kernels the artifacts do not.

Inductor loads whatever that folder holds, so opening the cache first checks what a crash can
leave there: a shared object cut short (a process killed while linking, a full disk) makes the
loader fault (SIGBUS) or fail on every later start. Such a file is removed, under inductor's own
lock for it, and inductor builds it again. A folder that cannot be written is still read: its
artifacts save the compile's tracing, and inductor keeps its files in its default folder.
"""

from __future__ import annotations

import logging
import os
import struct
import sys
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from caraserve.paths import cannot_write

log = logging.getLogger(__name__)
_USER_INDUCTOR_DIR = "TORCHINDUCTOR_CACHE_DIR" in os.environ


def elf_whole(path: Path) -> bool:
    """Whether the shared object at `path` holds every byte its ELF headers (64-bit) place in it:
    the program headers, the segments they map and the section headers."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:
                return False
            fmt = "<" if head[5] == 1 else ">"
            phoff, shoff = struct.unpack_from(fmt + "QQ", head, 32)
            phentsize, phnum, shentsize, shnum = struct.unpack_from(fmt + "HHHH", head, 54)
            if phoff + phnum * phentsize > size or shoff + shnum * shentsize > size or phentsize < 40:
                return False
            f.seek(phoff)
            table = f.read(phnum * phentsize)
    except OSError:
        return False
    for i in range(phnum):
        (offset,) = struct.unpack_from(fmt + "Q", table, i * phentsize + 8)
        (filesz,) = struct.unpack_from(fmt + "Q", table, i * phentsize + 32)
        if offset + filesz > size:
            return False
    return True


def drop_damaged_kernels(inductor: Path) -> list[Path]:
    """Removes the shared objects under inductor's cache folder that are cut short (Linux: ELF),
    each under inductor's lock for it, skipping one another process holds (it is being built);
    returns those removed."""
    if not sys.platform.startswith("linux") or not inductor.is_dir():
        return []
    removed = []
    for so in inductor.glob("*/*.so"):
        if elf_whole(so):
            continue
        key = so.name.split(".", 1)[0]  # c<hash>.main.so / c<hash>.so: inductor's locks/c<hash>.lock
        try:
            with FileLock(str(inductor / "locks" / f"{key}.lock"), timeout=0):
                if not elf_whole(so):
                    so.unlink(missing_ok=True)
                    removed.append(so)
        except Timeout:
            continue
        except OSError as e:
            log.warning("cannot remove the damaged compiled kernel %s (%s): delete the compile cache folder",
                        so, e.strerror or e)
    return removed


def cache_file(setting: str, key: str) -> Path | None:
    """The artifacts file of key in the folder engine.compile_cache_dir names: "auto" =
    $CARASERVE_CACHE/compiled (beside the embedded model; ~/.cache/caraserve by default), "" =
    none (every start compiles), else the path itself (relative to the current folder)."""
    if setting == "auto":
        from caraserve.model.tiny import cache_root

        return cache_root() / "compiled" / f"decode-{key}.bin"
    return Path(setting).expanduser() / f"decode-{key}.bin" if setting else None


class CompileCache:
    """The artifacts file (`file`) and whether new artifacts can be saved into it (`writable`)."""

    def __init__(self, file: Path):
        self.file = file
        folder = file.parent
        inductor = folder.resolve() / "inductor"
        why = cannot_write(folder) or (cannot_write(inductor) if inductor.is_dir() else None)
        self.writable = why is None
        if not self.writable:
            log.warning("the compile cache folder %s cannot be written (%s; engine.compile_cache_dir): its artifacts "
                        "are read, and this run's compiles are not kept for the next start", folder, why)
        elif not _USER_INDUCTOR_DIR:
            # (only when the user has not chosen a folder: torch fills the variable in on first use)
            removed = drop_damaged_kernels(inductor)
            if removed:
                log.warning("removed %d damaged compiled kernel(s) from %s (cut short, e.g. by a process killed "
                            "while building them): they are built again", len(removed), inductor)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor)
        if file.is_file():
            self._load()

    def _load(self) -> None:
        try:
            data = self.file.read_bytes()
        except OSError as e:
            log.warning("cannot read the compile cache %s (%s): compiling anew", self.file, e.strerror or e)
            return
        quiet = logging.getLogger("torch.compiler._cache")  # its un-pickling failure is a traceback
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            info = torch.compiler.load_cache_artifacts(data)
        except Exception as e:
            info, reason = None, f"{type(e).__name__}: {e}"
        else:
            reason = "not artifacts of this torch"
        finally:
            quiet.setLevel(level)
        if info is None:
            log.warning("the compile cache %s could not be loaded (%s): compiling anew, and it is rewritten",
                        self.file, reason)
        else:
            log.info("loaded compile artifacts from %s", self.file)

    def save(self) -> None:
        """Saves the artifacts of every compile so far; a failure (a full disk, a folder in the
        file's place) is a warning: the compiled step itself is fine."""
        if not self.writable:
            return
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is None:
            return
        tmp = self.file.with_suffix(".tmp")
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(artifacts[0])
            tmp.replace(self.file)
        except OSError as e:
            log.warning("cannot save the compile cache %s (%s): the next start compiles again", self.file,
                        e.strerror or e)
