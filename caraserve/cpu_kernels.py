"""C kernels for the CPU decode step: the LoRA delta (`csrc/lora_cpu.c`) and decode attention
(`csrc/attention_cpu.c`, decode rows and prompt tokens alike).

A decode step on CPU adds, for every adapted module, one small matmul pair per adapter in the
batch; through torch each pair costs ~20 us of call overhead around ~3 us of arithmetic. The
LoRA kernel does all runs of one module in one call, with no allocation, reading packed copies
of the slots' weights (column panels read front to back; the pool's own layout made it walk
them with a stride, and a step finds them in L3 or memory, not in cache). Decode attention
through torch's SDPA takes a mask over the longest context and ~0.4 ms a layer for a 32-row
batch of the embedded model; the attention kernel reads each row's own positions only.

They are built once per machine with the system C compiler (`$CC`, else `cc`) into
`$CARASERVE_CACHE/kernels` (default `~/.cache/caraserve/kernels`), keyed by the sources, the
compiler and the CPU's flags, and loaded with ctypes. Without a compiler, or with
`CARASERVE_CPU_KERNELS=0`, torch runs those parts instead (same results to float rounding).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import weakref
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCES = (Path(__file__).parent / "csrc" / "lora_cpu.c", Path(__file__).parent / "csrc" / "attention_cpu.c")
MAX_RANK = 1024  # the kernel's block buffer (csrc/lora_cpu.c)
MAX_ROWS = 16  # runs longer than this (prefill segments) go to torch's GEMMs, which win there


class LoraRun(ctypes.Structure):
    _fields_ = [("start", ctypes.c_int64), ("end", ctypes.c_int64), ("a", ctypes.c_void_p),
                ("b", ctypes.c_void_p), ("rank", ctypes.c_int64), ("packed", ctypes.c_int64),
                ("scale", ctypes.c_float)]


_lock = threading.Lock()
_lib: ctypes.CDLL | None | bool = False  # False: not tried yet; None: unavailable


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return os.uname().machine


def _build(cc: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
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
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> ctypes.CDLL | None:
    if os.environ.get("CARASERVE_CPU_KERNELS", "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.info("no C compiler: the CPU LoRA delta and decode attention run through torch")
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        text = b"".join(p.read_bytes() for p in SOURCES) + version.encode() + _cpu_flags().encode()
        key = hashlib.sha256(text).hexdigest()[:16]
        root = Path(os.environ.get("CARASERVE_CACHE", Path.home() / ".cache" / "caraserve"))
        path = root / "kernels" / f"cpu-{key}.so"
        if not path.is_file():
            _build(cc, path)
        lib = ctypes.PyDLL(str(path))  # keeps the GIL: a call lasts microseconds
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("CPU kernels unavailable (%s); the LoRA delta and decode attention run through torch", e)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.lora_runs.restype = ctypes.c_int
    lib.lora_runs.argtypes = [ptr, i64, ptr, i64, i64, i64, ctypes.POINTER(LoraRun), i64]
    lib.slot_attention.restype = ctypes.c_int
    lib.slot_attention.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, i64, ctypes.c_float]
    return lib


def _library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (built on first use; thread-safe)."""
    global _lib
    if _lib is False:
        with _lock:
            if _lib is False:
                _lib = _load()
    return _lib


def kernel():
    """The LoRA kernel function, or None when the kernels are unavailable."""
    lib = _library()
    return lib.lora_runs if lib is not None else None


class RunTable:
    """The runs of one module of one step, as the kernel's argument array. `fits` is False when
    the kernel should not take them (long runs, big ranks, weights that are not contiguous
    float32): then the caller uses torch. Runs whose rank and output width are multiples of 8
    point at packed copies of their weights (`packed`); the table keeps what it points at alive."""

    def __init__(self, runs):
        runs = list(runs)  # (start, end, A [in, R], B [R, out], scale)
        self.fits = all(
            end - start <= MAX_ROWS and a.shape[1] <= MAX_RANK and a.dtype == torch.float32 and
            b.dtype == torch.float32 and a.is_contiguous() and b.is_contiguous() and not a.is_cuda
            for start, end, a, b, _ in runs)
        self.n = len(runs)
        self._tensors, entries = [], []
        for start, end, a, b, scale in runs:
            rank = a.shape[1]
            pair = packed(a, b) if self.fits else None
            a, b = pair or (a, b)
            self._tensors += [a, b]
            entries.append(LoraRun(start, end, a.data_ptr(), b.data_ptr(), rank, pair is not None, scale))
        self.array = (LoraRun * max(1, self.n))(*entries)

    def apply(self, fn, y: torch.Tensor, x: torch.Tensor) -> None:
        """y[rows] += scale * (x[rows] @ A) @ B for every run; y and x float32 rows with unit column stride."""
        if self.n == 0:
            return
        if fn(y.data_ptr(), y.stride(0), x.data_ptr(), x.stride(0), x.shape[1], y.shape[1], self.array, self.n):
            raise RuntimeError("CPU LoRA kernel refused a run (rank beyond its buffer)")


# Packed copies of pool slots, per slot tensor: A [in, R] as [R/8, in, 8] and B [R, out] as
# [out/8, R, 8], so the kernel reads each column block front to back. Kept per pool tensor a
# slot view belongs to (a freed pool tensor takes its copies along) and checked against its
# version counter, which every write into the pool's slots bumps (a new adapter in any slot of
# the tensor makes the next table repack what it uses).
_packs: dict[int, tuple[weakref.ref, dict]] = {}  # id(pool tensor) -> (its weakref, {slot key: pack})


def packed(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(packed A, packed B) for the slot views a [in, R], b [R, out], or None when R or out is
    not a multiple of 8 (the unpacked kernel takes those)."""
    (in_f, rank), out = a.shape, b.shape[1]
    if rank % 8 or out % 8:
        return None
    a_base = a._base if a._base is not None else a
    b_base = b._base if b._base is not None else b
    entry = _packs.get(id(a_base))
    if entry is None or entry[0]() is not a_base:
        entry = _packs[id(a_base)] = (weakref.ref(a_base), {})
        weakref.finalize(a_base, _packs.pop, id(a_base), None)
    per_base = entry[1]
    key = (a.storage_offset(), in_f, rank, id(b_base), b.storage_offset(), out)
    hit = per_base.get(key)
    versions = (a._version, b._version)
    if hit is not None and hit[0]() is b_base and hit[1] == versions:
        return hit[2], hit[3]
    pa = a.reshape(in_f, rank // 8, 8).permute(1, 0, 2).contiguous()
    pb = b.reshape(rank, out // 8, 8).permute(1, 0, 2).contiguous()
    per_base[key] = (weakref.ref(b_base), versions, pa, pb)
    return pa, pb


def usable(y: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether the kernel can take these activations (then `kernel()` decides if it exists)."""
    return (y.dtype == torch.float32 and x.dtype == torch.float32 and y.device.type == "cpu"
            and x.device.type == "cpu" and y.dim() == 2 and x.dim() == 2
            and y.stride(1) == 1 and x.stride(1) == 1)


def slot_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     lens: torch.Tensor, window: int | None) -> torch.Tensor | None:
    """Attention of one query token per row over its own cache slot, positions [0, len) (or the
    last `window` of them), see csrc/attention_cpu.c: q [n, H, hd], caches [S, L, KV, hd],
    slots/lens [n] int64 (a row's token sits at position len - 1: a decode row, or a prompt
    token whose keys are already in the cache). None when the kernel is unavailable or does not
    take these tensors (or slots and lengths outside the cache)."""
    lib = _library()
    if lib is None or not attention_usable(q, k_cache, v_cache):
        return None
    slots, lens = slots.contiguous(), lens.contiguous()
    if slots.dtype != torch.int64 or lens.dtype != torch.int64:
        return None
    n, heads, hd = q.shape
    out = torch.empty_like(q)
    rc = lib.slot_attention(out.data_ptr(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                              slots.data_ptr(), lens.data_ptr(), n, heads, k_cache.shape[2], hd,
                              k_cache.shape[0], k_cache.shape[1], window or 0, hd ** -0.5)
    if rc == -2:
        raise MemoryError("decode attention: no memory for the score buffer")
    return out if rc == 0 else None


def attention_usable(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Float32 CPU tensors in the layouts the attention kernel reads."""
    return (q.dtype == k_cache.dtype == v_cache.dtype == torch.float32 and q.device.type == "cpu"
            and k_cache.device.type == "cpu" and q.dim() == 3 and k_cache.dim() == 4
            and k_cache.shape == v_cache.shape and q.is_contiguous() and k_cache.is_contiguous()
            and v_cache.is_contiguous() and q.shape[2] == k_cache.shape[3])
