"""The files of an adapter folder, opened and read within bounds.

Every file is opened only after it is known to resolve inside the allowed roots, to be a regular
file and to be within the size cap (`ReadLimits`). The weights file can be read two ways: its
safetensors header alone (names, shapes, dtypes: what registration validates, no tensor bytes),
or whole (the first use, which also checks the values).
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import pickle
import re
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# A LoRA header holds a few hundred entries of ~100 bytes each; parsing a huge JSON would take far
# more memory than the file, so headers have a cap of their own (safetensors' own is 100 MB).
MAX_HEADER_BYTES = 16 * 2**20
# Parsed headers up to this size are kept, 32 of them (8 MB and their parsed form at worst; a
# folder of adapters trained alike keeps a handful). An adapter on all seven modules of a 32-layer
# model has a header of about 60 KB, of an 80-layer one about 150 KB.
_MEMO_HEADER_BYTES = 256 * 2**10
_CHUNK_BYTES = 64 * 2**10  # below malloc's mmap threshold: small files cost no mmap / munmap
# bytes per element of each safetensors dtype torch can hold
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
# LoRA factors are trained weights: an integer or bool tensor is a file of something else (a
# quantized or mislabelled export), and casting it to float would serve made-up deltas
_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


class AdapterError(ValueError):
    """The adapter cannot be used; the message names it and says why."""


def without_name(error, name: str) -> str:
    """An adapter error's message less the adapter's name it starts with, for a message of the
    caller's that names the adapter already."""
    text = str(error)
    for head in (f"adapter {name!r} refused: ", f"adapter {name!r}: "):
        text = text.removeprefix(head)
    return text


class RegistryFullError(AdapterError):
    """adapters.max_registered adapters are registered: the operator's limit, not the adapter's fault."""


class AdapterReadError(AdapterError):
    """A read failed for a reason of the machine's, not the adapter's (an I/O error, no file
    descriptors or memory left): this use fails, the next one reads again."""


# OSErrors that say something about the files themselves (the adapter is broken until fixed);
# any other one (EIO, EMFILE, ENOMEM, EINTR, ...) may pass
_LASTING = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def read_failed(name: str, what: str, path: Path, e: BaseException) -> AdapterError:
    """The error of a failed open or read of `path`: AdapterReadError when it may pass."""
    passing = isinstance(e, MemoryError) or (isinstance(e, OSError) and not isinstance(e, _LASTING))
    kind = AdapterReadError if passing else AdapterError
    return kind(f"adapter {name!r}: {what} {path} ({e})")


@dataclass(frozen=True)
class ReadLimits:
    """What reading an adapter may touch; HostStore passes the engine's adapters.* settings."""

    max_file_bytes: int | None = None  # any adapter file larger than this is refused; None: no cap
    roots: tuple[Path, ...] | None = None  # resolved folders every read file must lie in; None: anywhere
    max_rank: int | None = None  # larger ranks are refused before any weights are stacked; None: no cap

    def check_inside(self, name: str, path: Path, real: Path) -> None:
        if self.roots is not None and not any(real == r or real.is_relative_to(r) for r in self.roots):
            raise AdapterError(
                f"adapter {name!r}: {path} resolves to {real}, outside the allowed adapter roots "
                f"({', '.join(map(str, self.roots))}; adapters.allowed_roots)"
            )


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise AdapterError(
            f"adapter name {name!r} is not a plain name (up to 128 ASCII letters, digits, '.', '_', '-', starting "
            "with a letter or digit; no path separators or '..')"
        )
    return name


def _check_stat(name: str, path: Path, st: os.stat_result, limits: ReadLimits, cap: int | None) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise AdapterError(f"adapter {name!r}: {path} is not a regular file")
    if cap is not None and st.st_size > cap:
        knob = f"adapters.max_file_bytes={limits.max_file_bytes}" if cap == limits.max_file_bytes else \
            f"the adapter_config.json cap of {cap} bytes"
        raise AdapterError(f"adapter {name!r}: {path} is {st.st_size} bytes, more than {knob}")


def open_file(name: str, path: Path, limits: ReadLimits, cap: int | None) -> tuple[int, str] | None:
    """(fd, a path that reads that fd) of an adapter file after the checks that must come before
    any read: it resolves inside the roots, is a regular file, is within the size cap. None: no
    file. `path`'s folder is already resolved (the callers pass the adapter's real folder), so
    only a file that is itself a link needs resolving: one lstat instead of one per component,
    which is most of a start-up scan of thousands of adapters."""
    try:
        st = os.lstat(path)
        if not stat.S_ISLNK(st.st_mode):
            real = path
        else:
            real, st = path.resolve(), None  # not strict: a dangling link out of the roots is refused as such
    except FileNotFoundError:
        return None
    except (OSError, RuntimeError) as e:  # symlink loops
        raise AdapterError(f"adapter {name!r}: cannot resolve {path} ({e})") from e
    limits.check_inside(name, path, real)
    try:
        # before opening: FIFOs and devices stay unopened (the lstat of a file that is no link is its stat)
        _check_stat(name, path, st if st is not None else os.stat(real), limits, cap)
        # the file may be swapped between the checks and the open: a FIFO must not block the open,
        # a symlink must not be followed, and the opened file itself is checked again
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise read_failed(name, "cannot open", path, e) from e
    try:
        _check_stat(name, path, os.fstat(fd), limits, cap)
        proc = f"/proc/self/fd/{fd}"
        try:  # Linux: where the open really landed (a folder swapped for a link)
            landed = os.readlink(proc)
        except OSError:  # no /proc
            return fd, str(real)
        if limits.roots is not None:  # (a Path per file costs more than the rest of this check)
            limits.check_inside(name, path, Path(landed))
        return fd, proc
    except BaseException:
        os.close(fd)
        raise


def read_capped(name: str, path: Path, fd: int, cap: int) -> bytes:
    """The file's bytes, at most cap + 1 of them (one more than allowed: the caller refuses a file
    that grew past its cap after the size check); closes fd. Read in chunks, so a small file never
    costs a buffer of the cap's size."""
    chunks, got = [], 0
    try:
        while got <= cap:
            chunk = os.read(fd, min(_CHUNK_BYTES, cap + 1 - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    except OSError as e:
        raise read_failed(name, "cannot read", path, e) from e
    finally:
        os.close(fd)
    return b"".join(chunks)


def read_weights(name: str, folder: Path, limits: ReadLimits,
                 header_only: bool) -> dict[str, torch.Tensor | tuple[int, ...]]:
    """The weights file's tensors by key, or with header_only their shapes alone (a safetensors
    file's header: no tensor bytes are read). A legacy `.bin` is a pickle without a header, so it
    is always read whole (rare: PEFT has written safetensors by default for years)."""
    for path in (folder / f for f in WEIGHT_FILES):
        opened = open_file(name, path, limits, limits.max_file_bytes)
        if opened is None:
            continue
        fd, readable = opened
        if path.suffix == ".safetensors" and header_only:
            try:
                return _header_shapes(name, path, fd)
            finally:
                os.close(fd)
        if path.suffix == ".bin":
            # read here, parsed from memory: an I/O error is told apart from a file torch cannot parse
            cap = limits.max_file_bytes or sys.maxsize
            data = read_capped(name, path, fd, cap)
            if len(data) > cap:  # it grew after the size check
                raise AdapterError(f"adapter {name!r}: {path} is more than adapters.max_file_bytes={cap} bytes")
            try:
                tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except MemoryError as e:  # the machine's, not the file's: the next use reads again
                raise read_failed(name, "cannot read", path, e) from e
            except pickle.UnpicklingError as e:  # torch's message advises weights_only=False: never here
                raise AdapterError(f"adapter {name!r}: cannot read {path} as tensors only (it is truncated, or "
                                   "holds other objects, which are never loaded: save the adapter as "
                                   "safetensors)") from e
            except Exception as e:  # the library's errors for a truncated or corrupt file
                raise AdapterError(f"adapter {name!r}: cannot read {path}: not a whole PyTorch checkpoint "
                                   f"(truncated or corrupt? {type(e).__name__}: {e})") from e
        else:
            with os.fdopen(fd, "rb"):
                try:
                    from safetensors.torch import load_file

                    tensors = load_file(readable)
                except Exception as e:  # truncated or corrupt files raise library-specific errors
                    raise read_failed(name, "cannot read", path, e) from e
        if not isinstance(tensors, dict) or not all(
                isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in tensors.items()):
            raise AdapterError(f"adapter {name!r}: {path} does not hold a mapping of names to tensors")
        for key, t in tensors.items():
            if not t.is_floating_point():
                raise AdapterError(f"adapter {name!r}: tensor {key!r} in {path} has dtype {t.dtype}: "
                                   "LoRA weights must be floating point")
        return tensors
    raise AdapterError(f"adapter {name!r}: no adapter_model.safetensors or adapter_model.bin in {folder}")


def _header_shapes(name: str, path: Path, fd: int) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header (an 8-byte little-endian length, then JSON), with
    the checks safetensors makes on open, so a truncated or corrupt file is refused here too."""

    def bad(why: str) -> AdapterError:
        return AdapterError(f"adapter {name!r}: cannot read {path} (not a valid safetensors file: {why})")

    try:
        size = os.fstat(fd).st_size
        prefix = os.pread(fd, 8, 0)
        n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 <= n <= min(MAX_HEADER_BYTES, size - 8):
            raise bad(f"header length {n} does not fit the file's {size} bytes (or the cap {MAX_HEADER_BYTES})")
        raw = os.pread(fd, n, 8)
    except OSError as e:
        raise read_failed(name, "cannot read", path, e) from e
    if len(raw) != n:  # it shrank after the size check
        raise bad(f"header of {n} bytes is truncated")
    # thousands of adapters trained alike have byte-identical headers: each is parsed once
    shapes, end, why = (_parse_header if n <= _MEMO_HEADER_BYTES else _parse_header.__wrapped__)(raw)
    if why is not None:
        raise bad(why)
    if end != size - 8 - n:
        raise bad(f"the header describes {end} bytes of tensor data, the file holds {size - 8 - n} (truncated?)")
    for key, _, dtype in shapes:
        if dtype not in _FLOAT_DTYPES:
            raise AdapterError(f"adapter {name!r}: tensor {key!r} in {path} has dtype {dtype}: "
                               "LoRA weights must be floating point")
    return {key: shape for key, shape, _ in shapes}


@functools.lru_cache(maxsize=32)
def _parse_header(raw: bytes) -> tuple[tuple[tuple[str, tuple[int, ...], str], ...], int, str | None]:
    """(the tensors' (key, shape, dtype) triples, the end of their data, None) for a valid safetensors
    header, or ((), 0, why not) for an invalid one."""
    try:
        header = json.loads(raw)
    except ValueError as e:  # UnicodeDecodeError included
        return (), 0, f"header is not JSON ({e})"
    if not isinstance(header, dict):
        return (), 0, "header is not a JSON object"
    shapes, spans = [], []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        entry = entry if isinstance(entry, dict) else {}
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(dtype, str) and dtype in _DTYPE_BYTES and _ints(shape) and _ints(offsets)
                and len(offsets) == 2 and offsets[1] - offsets[0] == math.prod(shape) * _DTYPE_BYTES[dtype]):
            return (), 0, f"tensor {key!r} has dtype {dtype!r}, shape {shape!r} and data_offsets {offsets!r}"
        shapes.append((key, tuple(shape), dtype))
        spans.append(offsets)
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            return (), 0, "the tensors' data overlap or leave gaps"
        end = stop
    return tuple(shapes), end, None


def _ints(v) -> bool:
    return type(v) is list and all(type(x) is int and x >= 0 for x in v)  # JSON ints: not bools
