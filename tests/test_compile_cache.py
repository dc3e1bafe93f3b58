"""What a crash, a full disk or a read-only folder can leave in the compile cache
(caraserve.compile_cache): damaged compiled kernels are removed before inductor loads them,
unreadable artifacts and failed saves are one warning each, never a failed compile."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from filelock import FileLock

from caraserve import kernel_library
from caraserve.compile_cache import CompileCache, cache_file, drop_damaged_kernels, elf_whole
from caraserve.config import AdapterConfig, EngineConfig
from caraserve.engine import Engine


@pytest.fixture(scope="module")
def shared_object():
    lib = kernel_library.library()
    if lib is None:
        pytest.skip("no C compiler: no shared object to damage")
    return lib._name


def test_elf_whole_tells_a_cut_short_shared_object(shared_object, tmp_path):
    data = open(shared_object, "rb").read()
    assert elf_whole(type(tmp_path)(shared_object))
    for size in (0, 10, 1000, len(data) // 2, len(data) - 1):
        cut = tmp_path / f"c{size}.so"
        cut.write_bytes(data[:size])
        assert not elf_whole(cut), size
    assert not elf_whole(tmp_path / "missing.so")


def test_damaged_kernels_are_removed_unless_another_process_builds_them(shared_object, tmp_path):
    data = open(shared_object, "rb").read()
    inductor = tmp_path / "inductor"
    (inductor / "ab").mkdir(parents=True)
    (inductor / "locks").mkdir()
    whole, cut, busy = (inductor / "ab" / f"{name}.main.so" for name in ("cwhole", "ccut", "cbusy"))
    whole.write_bytes(data)
    cut.write_bytes(data[:1000])
    busy.write_bytes(b"")
    with FileLock(str(inductor / "locks" / "cbusy.lock")):  # being linked right now
        assert drop_damaged_kernels(inductor) == [cut]
    assert whole.exists() and not cut.exists() and busy.exists()
    assert drop_damaged_kernels(inductor) == [busy]


@pytest.mark.slow
def test_unreadable_artifacts_and_a_failed_save_are_warnings(tmp_path, caplog):
    file = tmp_path / "cache" / "decode-x.bin"
    file.parent.mkdir()
    file.write_bytes(b"not artifacts")
    with caplog.at_level(logging.INFO, logger="caraserve.compile_cache"):
        cache = CompileCache(file)
    assert cache.writable and "could not be loaded" in caplog.text and "loaded compile artifacts" not in caplog.text
    cfg = EngineConfig(compile="true", adapters=AdapterConfig(dir="none"), max_batch_size=2, max_seq_len=64,
                       compile_cache_dir=str(tmp_path / "blocked"))
    engine = Engine(cfg)
    engine.graphs.cache.file.mkdir(parents=True)  # a folder where the artifacts file goes
    caplog.clear()
    engine.warm_up()
    assert "cannot save the compile cache" in caplog.text
    assert engine.graphs._fns and not engine.graphs.failed  # the compiled step is kept
    (done,) = engine.generate([[5, 6, 7]])
    assert done.output_ids


def test_the_default_cache_folder_is_beside_the_embedded_model_not_in_the_current_folder(monkeypatch, tmp_path):
    """engine.compile_cache_dir=auto (the default) keeps artifacts under $CARASERVE_CACHE, so a
    server started from any folder leaves nothing in it; "" keeps none; a path is that path."""
    monkeypatch.setenv("CARASERVE_CACHE", str(tmp_path / "cc"))
    assert EngineConfig().compile_cache_dir == "auto"
    assert cache_file("auto", "k") == tmp_path / "cc" / "compiled" / "decode-k.bin"
    assert cache_file("", "k") is None
    assert cache_file("rel/dir", "k") == Path("rel/dir/decode-k.bin")


def test_the_artifact_key_follows_the_step_sources(tmp_path):
    """The compiled step's artifacts are keyed by its sources: an edit to one of them (a new
    release, a local change) gives a new key; files outside them do not."""
    import shutil

    import torch

    from caraserve import graphs

    package = Path(graphs.__file__).parent
    shutil.copytree(package, tmp_path / "pkg", ignore=shutil.ignore_patterns("__pycache__"))
    root = tmp_path / "pkg"
    before = graphs.step_digest(root)
    assert before == graphs.step_digest(package)
    (root / "serve" / "service.py").write_text("# not the step\n")
    assert graphs.step_digest.__wrapped__(root) == before
    with open(root / "model" / "llama.py", "a") as f:
        f.write("\n# an edit\n")
    assert graphs.step_digest.__wrapped__(root) != before
    key = graphs.DecodeGraphs.cache_key("/m", torch.float32, torch.device("cpu"), 8, (8, 16))
    assert key == graphs.DecodeGraphs.cache_key("/m", torch.float32, torch.device("cpu"), 8, (8, 16))
    assert key != graphs.DecodeGraphs.cache_key("/m", torch.float32, torch.device("cpu"), 16, (8, 16))
