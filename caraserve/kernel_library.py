"""The built C library of the CPU kernels (`csrc/lora_cpu.c`, `csrc/attention_cpu.c`,
`csrc/layer_ops_cpu.c`): finding the compiler, building, caching, checking and loading it, and
binding the functions the wrappers in `caraserve.cpu_kernels` and `caraserve.lora.kernel_runs`
call, with `LoraRun` and `LoraPart`, the structs both sides of the ABI share.

The library is built once per machine with the system C compiler (`$CC`, else `cc`) into
`$CARASERVE_CACHE/kernels` (default `~/.cache/caraserve/kernels`), keyed by the sources, the
compiler and the CPU's flags, and loaded with ctypes. Without a compiler, or with
`CARASERVE_CPU_KERNELS=0`, `library()` is None and torch runs those parts instead.

Whoever can write into that folder chooses code this process runs, so: the folder is made
0700 and refused (torch then) unless it is this user's and nobody else may write into it; a
build records the library's SHA-256 next to it, and a library is loaded only after its bytes
match (else it is built again, and if that fails too, torch); a library that lacks a function
is not used.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import hmac
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)
SOURCES = tuple(Path(__file__).parent / "csrc" / f for f in ("lora_cpu.c", "attention_cpu.c", "layer_ops_cpu.c"))
HEADERS = tuple(Path(__file__).parent / "csrc" / f for f in ("attention_vec.h",))  # included by SOURCES


class LoraRun(ctypes.Structure):
    """csrc/lora_cpu.c's lora_run, field for field (the library's lora_run_bytes() must agree)."""
    _fields_ = [("start", ctypes.c_int64), ("end", ctypes.c_int64), ("a", ctypes.c_void_p),
                ("b", ctypes.c_void_p), ("rank", ctypes.c_int64), ("a_in", ctypes.c_int64),
                ("b_out", ctypes.c_int64), ("a_len", ctypes.c_int64), ("b_len", ctypes.c_int64),
                ("packed", ctypes.c_int64), ("scale", ctypes.c_float)]


class LoraPart(ctypes.Structure):
    """csrc/lora_cpu.c's lora_part (the library's lora_part_bytes() must agree): one adapted
    module's columns [col, col + out) of a projection's output and its runs."""
    _fields_ = [("col", ctypes.c_int64), ("out", ctypes.c_int64), ("runs", ctypes.c_void_p),
                ("nruns", ctypes.c_int64)]


_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
# Every function the wrappers call, as (restype, argtypes): a library that lacks one is not used.
SYMBOLS = {
    "lora_run_bytes": (_I64, []),
    # y, ldy, x, ldx, rows, in, out, runs, nruns
    "lora_runs": (ctypes.c_int, [_PTR, _I64, _PTR, _I64, _I64, _I64, _I64, _PTR, _I64]),
    "lora_part_bytes": (_I64, []),
    # y, ldy, y_cols, x, ldx, rows, in, parts, nparts
    "lora_parts": (ctypes.c_int, [_PTR, _I64, _I64, _PTR, _I64, _I64, _I64, _PTR, _I64]),
    # out, q, k_cache, v_cache, block_tables, row_seq, lens, rows, heads, kv_heads, head_dim, num_blocks,
    # block_size, num_seqs, table_width, window, scale
    "paged_attention": (ctypes.c_int, [_PTR] * 7 + [_I64] * 9 + [ctypes.c_float] * 2),
    # out, residual, x, w, rows, dim, ld_x, eps
    "add_rms_norm": (ctypes.c_int, [_PTR] * 4 + [_I64] * 3 + [ctypes.c_float]),
    # q_out, q, k, v, cos, sin, k_cache, v_cache, slots, tokens, heads, kv_heads, head_dim, rot_dim, ld_q, ld_k,
    # ld_v, num_slots, interleaved
    "rotary_write_kv": (ctypes.c_int, [_PTR] * 9 + [_I64] * 10),
}

# The process's one loaded library (dlopen'ed code cannot be unloaded); `reset()` forgets it.
_lock = threading.Lock()
_lib: ctypes.CDLL | None | bool = False  # False: not tried yet; None: unavailable


class _Refused(RuntimeError):
    """A cache folder or file that this process will not load code from."""


def cpu_flags() -> str:
    """This CPU's feature flags as /proc/cpuinfo lists them (the machine's name elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return os.uname().machine


def cache_dir() -> Path:
    """Where the built kernels live: `$CARASERVE_CACHE/kernels` (default ~/.cache/caraserve/kernels)."""
    return Path(os.environ.get("CARASERVE_CACHE", Path.home() / ".cache" / "caraserve")) / "kernels"


def artifact(cc: str) -> Path:
    """The library built by compiler `cc` on this machine, keyed by the sources, the compiler's
    version and the CPU's flags (another CPU or compiler builds its own)."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    text = b"".join(p.read_bytes() for p in SOURCES + HEADERS) + version.encode() + cpu_flags().encode()
    return cache_dir() / f"cpu-{hashlib.sha256(text).hexdigest()[:16]}.so"


def digest_path(lib: Path) -> Path:
    """The SHA-256 of `lib` recorded when it was built (hex, one line)."""
    return lib.with_name(lib.name + ".sha256")


def _private_dir(path: Path) -> None:
    """Makes `path` with mode 0700 unless it exists; refuses it unless it is a folder of this user
    that nobody else may write into (anyone who can would choose the code this process runs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
        os.chmod(path, 0o700)  # mkdir's mode goes through the umask
    except FileExistsError:
        pass
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise _Refused(f"{path} is not a folder")
    if st.st_uid != os.getuid():
        raise _Refused(f"{path} belongs to uid {st.st_uid}, not to this user (uid {os.getuid()})")
    if st.st_mode & 0o022:
        raise _Refused(f"{path} is writable by its group or by others (mode {st.st_mode & 0o777:o}; "
                       f"`chmod 700 {path}` if it is yours and nobody else wrote into it)")


def _read_own(path: Path) -> bytes:
    """The bytes of `path`: a regular file (not a link) of this user that nobody else may write."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise _Refused(f"{path} is not a file of this user that only it may write")
        return f.read()


def _unverified(lib: Path) -> str | None:
    """Why `lib` may not be loaded, or None: it is the very bytes whose SHA-256 `_build` recorded."""
    try:
        data = _read_own(lib)
        recorded = _read_own(digest_path(lib)).decode("ascii", "replace").strip()
    except FileNotFoundError as e:
        return f"{e.filename} is missing"
    except (OSError, _Refused) as e:
        return str(e)
    if not hmac.compare_digest(hashlib.sha256(data).hexdigest(), recorded):
        return f"{lib} is not the file that was built (its SHA-256 differs from the recorded one)"
    return None


def _build(cc: str, out: Path) -> None:
    """Compiles the sources into `out`, then records its SHA-256 next to it, each by a rename, so
    no reader sees half a file. Both are read-only: a loaded library is mapped from its file, so
    a new build replaces the file rather than writing into it."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent, prefix=".build-")
    os.close(fd)
    try:
        base = [cc, "-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno", *map(str, SOURCES), "-o", tmp]
        # OpenMP shares a call's work over the caller's team (torch's: the same libgomp once torch
        # has loaded it); a compiler without it builds the single-threaded form
        for cmd in (base + ["-fopenmp", "-lm"], base + ["-lm"]):
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if proc.returncode == 0:
                break
        else:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.chmod(tmp, 0o500)
        digest = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
        os.replace(tmp, out)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".digest-")
        with os.fdopen(fd, "w") as f:
            f.write(f"{digest}\n")
        os.chmod(tmp, 0o400)
        os.replace(tmp, digest_path(out))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def _build_lock(directory: Path):
    """One process at a time checks and builds (a second waits, then finds the first's build)."""
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _load() -> ctypes.CDLL | None:
    if os.environ.get("CARASERVE_CPU_KERNELS", "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.info("no C compiler: the CPU LoRA delta and decode attention run through torch")
        return None
    try:
        path = artifact(cc)
        _private_dir(path.parent)
        with _build_lock(path.parent):
            why = _unverified(path)
            if why is not None:
                if os.path.lexists(path):
                    log.warning("CPU kernels: %s; building them again", why)
                _build(cc, path)
                why = _unverified(path)
                if why is not None:
                    raise _Refused(f"built again, but {why}")
            lib = ctypes.PyDLL(str(path))  # keeps the GIL: a call lasts microseconds
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("CPU kernels unavailable (%s); the LoRA delta and decode attention run through torch", e)
        return None
    return _bind(lib, path)


def _bind(lib: ctypes.CDLL, path: Path) -> ctypes.CDLL | None:
    """`lib` with the signatures of SYMBOLS set, or None when it lacks one or its lora_run differs."""
    for name, (restype, argtypes) in SYMBOLS.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            log.warning("CPU kernels unavailable (%s has no function %s: built from other sources); the "
                        "LoRA delta and decode attention run through torch", path, name)
            return None
        fn.restype, fn.argtypes = restype, argtypes
    for struct, size in (("lora_run", lib.lora_run_bytes()), ("lora_part", lib.lora_part_bytes())):
        ours = ctypes.sizeof(LoraRun if struct == "lora_run" else LoraPart)
        if size != ours:
            log.warning("CPU kernels unavailable (%s: a %s of %d bytes, this wrapper's has %d); torch runs "
                        "those parts", path, struct, size, ours)
            return None
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (built on first use; thread-safe)."""
    global _lib
    if _lib is False:
        with _lock:
            if _lib is False:
                _lib = _load()
    return _lib


def reset() -> None:
    """Forgets the loaded library (or its absence): the next use checks, and if need be builds,
    it again under the environment of then (tests that point `CARASERVE_CACHE` elsewhere). A
    library once loaded stays mapped: the old one keeps serving calls already made."""
    global _lib
    with _lock:
        _lib = False


def kernel():
    """The LoRA kernel function, or None when the kernels are unavailable."""
    lib = library()
    return lib.lora_runs if lib is not None else None


def parts_kernel():
    """The LoRA kernel over a projection's parts (lora_parts), or None when the kernels are unavailable."""
    lib = library()
    return lib.lora_parts if lib is not None else None

