"""The C kernels' build cache (caraserve/kernel_library.py) and the library's integrity: unsafe
cache folders and libraries that are not what was built are refused, and every refusal falls
back to torch with the same results."""

import ctypes
import hashlib
import logging
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import assert_lora_runs_exact, make_runs
from helpers import lora_reference as reference

from caraserve import cpu_kernels, kernel_library
from caraserve.lora import kernel_runs

# --- the build cache and the library's integrity ------------------------------------------------
# Every test below points CARASERVE_CACHE at a folder of its own and makes the module forget the
# library it loaded (monkeypatch puts the session's back afterwards).


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """This test's own cache folder (its kernels folder returned), the library not loaded yet."""
    monkeypatch.setenv("CARASERVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CARASERVE_CPU_KERNELS", raising=False)
    monkeypatch.setattr(kernel_library, "_lib", False)
    return tmp_path / "cache" / "kernels"


def reload(monkeypatch):
    """The LoRA kernel as a process starting now finds it."""
    monkeypatch.setattr(kernel_library, "_lib", False)
    return kernel_library.kernel()


def compiler():
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def the_library(kernels: Path) -> Path:
    (lib,) = kernels.glob("cpu-*.so")
    return lib


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256(path: Path) -> str:
    return sha256_of(path.read_bytes())


def replace_file(path: Path, data: bytes) -> None:
    """Writes through a rename, as an attacker or a half-finished copy would: never into the file,
    which this process may have mapped."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def check_kernel_works(fn):
    g = torch.Generator().manual_seed(21)
    runs, rows = make_runs([3, 5], 16, 24, (8,), g)
    x, y = torch.randn(rows, 16, generator=g), torch.randn(rows, 24, generator=g)
    want = reference(y, x, runs)
    kernel_runs.RunTable(runs).apply(fn, y, x)
    assert torch.allclose(y.double(), want, rtol=1e-5, atol=1e-5)


def test_cache_folder_is_private_and_the_library_hashed(fresh_cache, monkeypatch):
    fn = kernel_library.kernel()
    assert fn is not None
    assert stat.S_IMODE(fresh_cache.stat().st_mode) == 0o700
    lib = the_library(fresh_cache)
    digest = lib.with_name(lib.name + ".sha256")
    assert digest.read_text().strip() == sha256(lib)
    assert not stat.S_IMODE(lib.stat().st_mode) & 0o222  # read-only: rebuilt by rename, never edited
    assert sorted(p.name for p in fresh_cache.iterdir() if not p.name.startswith(".")) == [lib.name, digest.name]
    check_kernel_works(fn)


def stub_library(path: Path, source: str) -> None:
    src = path.with_name("stub.c")
    src.write_text(source)
    subprocess.run([compiler(), "-shared", "-fPIC", str(src), "-o", str(path)], check=True, capture_output=True)
    src.unlink()


@pytest.mark.parametrize("how", ["flipped", "truncated", "replaced"])
def test_tampered_library_is_rebuilt_not_loaded(fresh_cache, monkeypatch, caplog, how):
    assert kernel_library.kernel() is not None
    lib = the_library(fresh_cache)
    good = lib.read_bytes()
    if how == "flipped":
        bad = good[:1] + bytes([good[1] ^ 0xFF]) + good[2:]
    elif how == "truncated":
        bad = good[: len(good) // 8]
    else:  # another library, with a plausible function
        stub_library(fresh_cache / "other.so", "int lora_runs(void) { return 0; }\n")
        bad = (fresh_cache / "other.so").read_bytes()
        (fresh_cache / "other.so").unlink()
    replace_file(lib, bad)
    opened = []  # the SHA-256 of each file handed to dlopen, as it was at that moment
    real = ctypes.PyDLL
    monkeypatch.setattr(ctypes, "PyDLL", lambda name, *a, **k: opened.append(sha256(Path(name))) or real(name, *a, **k))
    with caplog.at_level(logging.WARNING, logger=kernel_library.__name__):
        fn = reload(monkeypatch)
    assert "SHA-256" in caplog.text and str(lib) in caplog.text
    assert opened and sha256_of(bad) not in opened
    assert fn is not None  # built again, and what is on disk now is what was recorded
    assert lib.read_bytes() != bad
    assert lib.with_name(lib.name + ".sha256").read_text().strip() == sha256(lib)
    check_kernel_works(fn)


def test_tampered_library_that_cannot_be_rebuilt_falls_back_to_torch(fresh_cache, monkeypatch, caplog):
    assert kernel_library.kernel() is not None
    lib = the_library(fresh_cache)
    good = lib.read_bytes()
    replace_file(lib, good[:1] + bytes([good[1] ^ 0xFF]) + good[2:])
    builds = []
    monkeypatch.setattr(kernel_library, "_build", lambda cc, out: builds.append(out))  # a build that changes nothing
    with caplog.at_level(logging.WARNING, logger=kernel_library.__name__):
        assert reload(monkeypatch) is None
    assert builds == [lib]
    assert "unavailable" in caplog.text and "SHA-256" in caplog.text
    q, cache = torch.randn(1, 2, 8), torch.randn(2, 4, 2, 8)
    assert cpu_kernels.paged_attention(q, cache, cache, torch.tensor([[0]]), torch.tensor([0]), torch.tensor([2]),
                                       None) is None


@pytest.fixture(scope="module")
def session_kernels(fn):
    """The session's kernels folder (built by `fn`), before any test points the cache elsewhere."""
    return Path(os.environ["CARASERVE_CACHE"]) / "kernels"


@pytest.mark.parametrize("how", ["world-writable", "group-writable", "someone else's"])
def test_unsafe_cache_folder_is_refused(session_kernels, fresh_cache, monkeypatch, caplog, how):
    """A library in a folder others may write into is not loaded, even one whose hash matches."""
    fresh_cache.mkdir(parents=True)
    for p in session_kernels.glob("cpu-*.so*"):
        shutil.copy(p, fresh_cache / p.name)
    os.chmod(fresh_cache, {"world-writable": 0o777, "group-writable": 0o770, "someone else's": 0o700}[how])
    if how == "someone else's":
        uid = os.getuid()
        monkeypatch.setattr(os, "getuid", lambda: uid + 1)
    before = sorted(p.name for p in fresh_cache.iterdir())
    with caplog.at_level(logging.WARNING, logger=kernel_library.__name__):
        assert kernel_library.kernel() is None
    assert "unavailable" in caplog.text and str(fresh_cache) in caplog.text
    assert sorted(p.name for p in fresh_cache.iterdir()) == before  # nothing built there either
    q, cache = torch.randn(1, 2, 8), torch.randn(2, 4, 2, 8)
    assert cpu_kernels.paged_attention(q, cache, cache, torch.tensor([[0]]), torch.tensor([0]), torch.tensor([2]),
                                       None) is None


def test_unsafe_cache_folder_still_computes_the_same_tokens(session_kernels, fresh_cache, monkeypatch):
    """The engine with the session's kernels, then with the cache refused (torch): same tokens."""
    from caraserve.config import AdapterConfig, EngineConfig, ModelConfig
    from caraserve.engine import Engine
    from caraserve.model.tiny import tiny_paths
    from caraserve.request import SamplingParams

    monkeypatch.setenv("CARASERVE_CACHE", str(session_kernels.parent))
    assert reload(monkeypatch) is not None
    model_dir, adapters = tiny_paths()
    engine = Engine(EngineConfig(model=ModelConfig(path=str(model_dir)),
                                 adapters=AdapterConfig(dir=str(adapters), device_slots=2), compile="false"))
    names = sorted(p.name for p in adapters.iterdir())
    prompts = [[1, 5, 7, 9], [1, 4, 4], [1, 8, 2, 6, 3], [1, 9]]
    chosen = [names[0], names[1 % len(names)], None, names[0]]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    with_kernels = [r.output_ids for r in engine.generate(prompts, params, chosen)]

    fresh_cache.mkdir(parents=True)
    os.chmod(fresh_cache, 0o777)
    monkeypatch.setenv("CARASERVE_CACHE", str(fresh_cache.parent))
    assert reload(monkeypatch) is None
    without = [r.output_ids for r in engine.generate(prompts, params, chosen)]
    assert without == with_kernels and all(len(t) == 4 for t in without)


def every_function(run_bytes: int, part_bytes: int) -> str:
    """A stub library with every function the wrappers call, its structs of the given sizes."""
    sizes = {"lora_run_bytes": run_bytes, "lora_part_bytes": part_bytes}
    return "".join(f"long {name}(void) {{ return {sizes.get(name, 0)}; }}\n" for name in kernel_library.SYMBOLS)


@pytest.mark.parametrize("source", [
    "int lora_runs(void) { return 0; }\n",  # a library of an older version: functions missing
    every_function(8, ctypes.sizeof(kernel_library.LoraPart)),  # every function, but another lora_run layout
    every_function(ctypes.sizeof(kernel_library.LoraRun), 8),  # ... another lora_part layout
], ids=["missing-function", "other-run-struct", "other-part-struct"])
def test_library_without_what_the_wrappers_call_is_not_used(fresh_cache, monkeypatch, caplog, source):
    """A library whose hash checks out but that lacks a function (or disagrees on lora_run):
    torch runs those parts, with a warning; no AttributeError."""
    lib = kernel_library.artifact(compiler())
    fresh_cache.mkdir(parents=True, mode=0o700)
    os.chmod(fresh_cache, 0o700)
    stub_library(lib, source)
    lib.with_name(lib.name + ".sha256").write_text(sha256(lib) + "\n")
    with caplog.at_level(logging.WARNING, logger=kernel_library.__name__):
        assert kernel_library.kernel() is None
    assert "unavailable" in caplog.text and str(lib) in caplog.text
    assert_lora_runs_exact()  # through torch


def test_reset_forgets_the_library(fresh_cache, monkeypatch):
    monkeypatch.setenv("CARASERVE_CPU_KERNELS", "0")
    assert kernel_library.kernel() is None
    monkeypatch.delenv("CARASERVE_CPU_KERNELS")
    assert kernel_library.kernel() is None  # remembered
    kernel_library.reset()
    assert kernel_library.kernel() is not None


def test_the_built_library_is_keyed_by_every_source_and_header(monkeypatch, tmp_path):
    """A change to a kernel's source or to a header it includes names another library (built
    anew), never the one built from the old text."""
    before = kernel_library.artifact(compiler())
    for name in ("SOURCES", "HEADERS"):
        files = getattr(kernel_library, name)
        changed = tmp_path / f"{name}-{files[0].name}"
        changed.write_bytes(files[0].read_bytes() + b"\n/* changed */\n")
        monkeypatch.setattr(kernel_library, name, (changed, *files[1:]))
        assert kernel_library.artifact(compiler()) != before
        monkeypatch.setattr(kernel_library, name, files)
    assert kernel_library.artifact(compiler()) == before
