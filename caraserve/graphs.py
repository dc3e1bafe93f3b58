"""DecodeGraphs: the model's own forward (`CausalLM.run`), compiled per batch bucket for decode
steps, over buffers of fixed address.

One variant per (batch-size bucket, LoRA form): the batch is padded to a power-of-two row count
(padding rows write position 0 of the scratch KV block, block 0, that no request owns). A step
fills its bucket's buffers (token ids, positions, KV slot mapping, block tables, and on GPUs the
LoRA row table), wraps them in a ForwardBatch and runs the compiled forward: no second copy of
any layer exists here. The LoRA delta reaches the forward through the layers' LoRA backend
(`caraserve.lora.backend`): on GPUs a multi-bucket BGMV over the row table (two Triton kernels
per adapted module whatever the adapter mix), on CPU an opaque op that hands the prepared step's
rows to the C kernel; either way one variant per batch bucket serves every adapter mix.
Attention reads the paged KV cache through the block tables (`caraserve.attention`: a kernel
that reads each row's own blocks, so the tables always have the widest width a request can need
and a longer context recompiles nothing). On CUDA each variant is replayed as a CUDA graph
(mode="reduce-overhead"), one per batch bucket; or, with capture (engine.cuda_graphs=capture),
the eager forward itself is captured with torch.cuda.graph per bucket, with no compile at all.
Compiled artifacts are saved to, and loaded from, a cache folder keyed by model, dtype, device
and torch version (`caraserve.compile_cache`), so a restarted engine skips the compile.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import logging
import time
import types
from pathlib import Path

import numpy as np
import torch

from caraserve.compile_cache import CompileCache, cache_file
from caraserve.graph_capture import GraphCapture
from caraserve.kv_cache import blocks_for
from caraserve.lora.backend import LORA_GROUPS, LORA_NONE, LORA_ROWS
from caraserve.lora.batch import LoraBatch, fill_row_table
from caraserve.model.batch import ForwardBatch
from caraserve.model.llama import CausalLM

log = logging.getLogger(__name__)
# The compiled step's code: the artifact cache key covers these sources, so a changed step never
# meets the artifacts of an earlier one (which torch would not load, but would keep on disk)
STEP_SOURCES = ("model/*.py", "lora/*.py", "attention*.py", "ops.py", "cpu_kernels.py", "layer_ops_triton.py",
                "graphs.py", "graph_capture.py", "csrc/*")


@functools.cache
def step_digest(root: Path = Path(__file__).parent) -> str:
    """A digest of the compiled step's sources (STEP_SOURCES, below the package's folder)."""
    h = hashlib.sha256()
    for path in sorted({p for pattern in STEP_SOURCES for p in root.glob(pattern) if p.is_file()}):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def _own_code(fn, name: str):
    """fn with a code object of its own. Dynamo keeps its compiled entries (and its recompile
    limit, 8) per code object; variants made from one closure would share that limit and, past
    it, silently run eagerly."""
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


HOST_RUNS = -1  # the "rank buckets" of a variant whose LoRA rows go to the CPU backend's op
ANY_BATCH = 0  # the "batch bucket" of a CPU variant: the batch size is a dynamic dimension


def bucket_up(n: int, buckets: tuple[int, ...]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    out, b = [], 1
    while b < max_batch_size:
        out.append(b)
        b *= 2
    return tuple(out) + (max_batch_size,)


STEP_INPUTS = ("input_ids", "positions", "slot_mapping", "row_lens", "block_tables")


def stage_step_inputs(out: dict[str, np.ndarray], tokens, starts, tables, block_size: int) -> None:
    """Writes a decode step of n rows into the bucket's host arrays (B >= n rows):
        input_ids[i] = tokens[i][0]; positions[i] = starts[i]; row_lens[i] = starts[i] + 1
        block_tables[i, :len(tables[i])] = tables[i], zeros after
        slot_mapping[i] = tables[i][starts[i] // bs] * bs + starts[i] % bs
    and the padding rows i >= n as position 0 of the scratch block (block 0), which they write
    and read back. Vectorised: a step's inputs cost the same few numpy calls at any batch size."""
    n = len(tokens)
    lens = np.fromiter(map(len, tables), np.int64, n)
    pos = np.fromiter(starts, np.int64, n)
    flat = np.fromiter(itertools.chain.from_iterable(tables), np.int64, int(lens.sum()))
    table = out["block_tables"]
    if lens.max(initial=0) > table.shape[1]:
        raise ValueError(f"a block table of {lens.max()} blocks exceeds the step's width {table.shape[1]}")
    short = np.flatnonzero(pos >= lens * block_size)
    if short.size:  # (its slot would be read from the table's zero padding: the scratch block)
        i = int(short[0])
        raise ValueError(f"row {i}: position {pos[i]} is past its {lens[i]} KV blocks of {block_size}")
    table[:] = 0
    table[np.repeat(np.arange(n), lens), np.arange(flat.size) - np.repeat(np.cumsum(lens) - lens, lens)] = flat
    out["input_ids"][:n] = np.fromiter((t[0] for t in tokens), np.int64, n)
    out["positions"][:n] = pos
    out["row_lens"][:n] = pos + 1
    out["slot_mapping"][:n] = table[np.arange(n), pos // block_size] * block_size + pos % block_size
    for k in ("input_ids", "positions", "slot_mapping"):
        out[k][n:] = 0
    out["row_lens"][n:] = 1


class DecodeGraphs:
    @classmethod
    def for_engine(cls, cfg, model: CausalLM, kv_layers, pool, max_seq_len: int, model_path: Path,
                   dtype: torch.dtype, device: torch.device) -> DecodeGraphs | None:
        """The compiled decode step an EngineConfig asks for (None: compile=false): true = each
        variant at its first use, or before serving (`warm_up`); auto = as true on CUDA, on CPU
        compiled when the engine idles (`compile_pending`) while steps run eagerly, so a job that
        never idles runs as compile=false."""
        if cfg.compile == "false":
            return None
        if model.args.moe is not None and device.type == "cuda":
            # the experts' op groups rows by the router's choices on the host: a CUDA graph cannot
            # hold that, so these steps run eagerly
            log.warning("a mixture-of-experts model's decode steps on CUDA run eagerly (engine.compile=%s is not "
                        "applied): its experts route rows on the host, which a CUDA graph cannot replay", cfg.compile)
            return None
        key = cls.cache_key(str(model_path), dtype, device, cfg.max_batch_size, cfg.adapters.rank_buckets,
                            blocks_for(max_seq_len, cfg.kv_block_size))
        deferred = cfg.compile == "auto" and device.type != "cuda"
        return cls(model, kv_layers, pool, max_seq_len, cfg.max_batch_size, cache_file(cfg.compile_cache_dir, key),
                   deferred, capture=cfg.cuda_graphs == "capture")

    def __init__(self, model: CausalLM, kv_layers, pool, max_seq_len: int, max_batch_size: int,
                 cache_path: Path | None = None, deferred: bool = False, capture: bool = False):
        self.model = model
        self.kv_layers = kv_layers
        self.pool = pool
        self.batch_buckets = batch_buckets(max_batch_size)
        self.block_size = kv_layers[0][0].shape[1]
        self.max_blocks = blocks_for(max_seq_len, self.block_size)  # block-table width a request can need
        self.device = model.model.embed_tokens.weight.device
        self.cuda_graphs = self.device.type == "cuda"
        # CUDA: graphs captured over the eager forward (no torch.compile), else compiled ones
        self.capture = capture and self.cuda_graphs
        self.capturer = GraphCapture(self.device)  # (used with capture only)
        devices = {*model.layer_devices(), model.model.norm_device, model.lm_head.weight.device}
        if self.capture and devices != {self.device}:
            # a capture records one device's stream: cross-device copies between layers would not
            # be recorded (or would synchronize), so a placed model gets the compiled variants
            log.warning("engine.cuda_graphs=capture needs the whole model on %s (it spans %s): "
                        "compiling the decode step instead", self.device, sorted(map(str, devices)))
            self.capture = False
        self.host_runs = self.device.type == "cpu"  # LoRA through the CPU backend's op rather than BGMV rows
        self._buffers: dict[int, dict[str, torch.Tensor]] = {}  # batch bucket -> the step's inputs
        self._staging: dict[int, dict[str, torch.Tensor]] = {}  # CUDA: their pinned host twins
        self._staged: dict[int, torch.cuda.Event] = {}  # CUDA: after the last copies out of _staging
        self._fns: dict[tuple[int, int], object] = {}
        self.compile_s = 0.0
        # deferred: a missing variant's steps run eagerly and it waits in `pending` (with how many
        # steps wanted it) until the engine is idle and calls compile_pending()
        self.deferred = deferred
        self.pending: dict[tuple[int, int], int] = {}
        self.failed: set[tuple[int, int]] = set()  # variants whose compile raised: their steps stay eager
        if self.cuda_graphs:
            # The step writes the KV cache and reads the adapter slots, tensors it closes over
            # (graph inputs to the compiler). CUDA-graph trees skip graphs that mutate inputs
            # unless those inputs keep a fixed address, which these do for the engine's lifetime.
            lora = [w for bk in pool.buckets for ab in bk.weights.values() for w in ab]
            lora = [t for w in lora for t in (w if isinstance(w, list) else [w])]
            for t in [t for kv in kv_layers for t in kv] + lora:
                torch._dynamo.mark_static_address(t)
        self.cache = CompileCache(cache_path) if cache_path is not None else None

    @staticmethod
    def cache_key(model_path: str, dtype: torch.dtype, device: torch.device, max_batch_size: int,
                  rank_buckets, max_blocks: int = 0) -> str:
        """max_blocks: the step's block-table width, a static dimension of its graphs."""
        cfg = Path(model_path, "config.json")
        text = cfg.read_text() if cfg.is_file() else model_path
        raw = (f"{step_digest()}|{text}|{dtype}|{device.type}|{torch.__version__}|{max_batch_size}|"
               f"{tuple(rank_buckets)}|{max_blocks}")
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    def __call__(self, tokens, starts, tables, lora: LoraBatch | None) -> torch.Tensor | None:
        """Logits [n, V] of the compiled step, or None when the caller should run it eagerly
        (deferred and the variant not compiled yet). The model's LoRA backends hold the step's
        LoraBatch already (CausalLM.prepare_lora)."""
        n = len(tokens)
        key = self.variant_key(n, lora)
        if key in self.failed:
            return None
        if self.deferred and key not in self._fns:
            self.pending[key] = self.pending.get(key, 0) + 1
            return None
        # CUDA: padded to the bucket (one CUDA graph per bucket); CPU: the batch is a dynamic
        # dimension, padded only to 2 rows (a size-1 batch would compile a second, specialized graph)
        bsz, nb = (key[0], key[1]) if self.cuda_graphs else (max(n, 2), key[1])
        pad = bsz - n
        with self._on_device():
            buf, stage = self._step_buffers(bsz)
            stage_step_inputs({k: stage[k].numpy() for k in STEP_INPUTS}, tokens, starts, tables, self.block_size)
            if nb > 0:
                fill_row_table(lora, self.pool.rank_buckets, stage["meta"].numpy(), stage["scale"].numpy())
            if stage is not buf:
                for k in (*STEP_INPUTS, "meta", "scale") if nb > 0 else STEP_INPUTS:
                    buf[k].copy_(stage[k], non_blocking=True)
                # the next step refills the staging tensors after these copies
                self._staged[bsz].record(torch.cuda.current_stream(self.device))
            fb = self._batch(bsz, nb, buf, tuple(p + 1 for p in starts) + (1,) * pad)
            if self.capture and key not in self._fns:  # (a variant warm_up did not capture)
                logits = self._capture_variant(key, fb)
                return None if logits is None else logits[:n]
            return self._run(key, fb)[:n]

    def _run(self, key: tuple[int, int], fb: ForwardBatch) -> torch.Tensor:
        with torch.inference_mode():
            return self._variant(*key)(fb)

    def _on_device(self):
        """CUDA: this engine's GPU as the current device (streams, events and captures are made on
        the current one, and an engine may run on another GPU than cuda:0)."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def _capture_variant(self, key: tuple[int, int], fb: ForwardBatch):
        """Captures the variant over fb (its bucket's buffers) and replays it once: its logits, or
        None when the capture failed (logged; the variant's steps then run eagerly)."""
        try:
            return self._run(key, fb)
        except Exception:
            log.exception("capturing the decode step's CUDA graph %s failed; those steps stay eager", key)
            self.failed.add(key)
            return None

    def variant_key(self, n: int, lora: LoraBatch | None) -> tuple[int, int]:
        """(batch bucket, LoRA form) of the variant a step of n rows runs: on CUDA the padded
        batch bucket and how many rank buckets its BGMV covers (0: no LoRA); on CPU ANY_BATCH
        (a dynamic batch dimension) and HOST_RUNS, one variant for every step (with no LoRA rows
        the op adds nothing but its calls)."""
        if not self.cuda_graphs:
            return ANY_BATCH, HOST_RUNS if self.host_runs and self.pool.targets else self._num_buckets(lora)
        return bucket_up(n, self.batch_buckets), self._num_buckets(lora)

    def _new_buffers(self, bsz: int, device: torch.device, pin: bool = False) -> dict[str, torch.Tensor]:
        """Zeroed step inputs of a bsz-row batch (pinned host memory with pin=True, a staging twin
        without `rows`). On CPU their batch dimension is marked dynamic once, here: one variant
        serves every batch size."""
        def z(*shape, dtype=torch.int64):
            return torch.zeros(*shape, dtype=dtype, device=device, pin_memory=pin)

        buf = {"input_ids": z(bsz), "positions": z(bsz), "slot_mapping": z(bsz), "row_lens": z(bsz),
               "block_tables": z(bsz, self.max_blocks),
               "meta": z(3, bsz, dtype=torch.int32), "scale": z(bsz, dtype=torch.float32)}
        if not pin:
            buf["rows"] = torch.arange(bsz, device=device)
        if not self.cuda_graphs:
            for t in buf.values():
                torch._dynamo.maybe_mark_dynamic(t, t.dim() - 1 if t is buf["meta"] else 0)
        return buf

    def _step_buffers(self, bsz: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(the bucket's device buffers, the host tensors a step fills): the same tensors on CPU;
        on CUDA pinned twins, copied in asynchronously, whose refill first waits for the last
        step's copies out of them."""
        buf = self._buffers.get(bsz)
        if buf is None:
            buf = self._buffers[bsz] = self._new_buffers(bsz, self.device)
            if self.device.type == "cuda":
                self._staging[bsz] = self._new_buffers(bsz, torch.device("cpu"), pin=True)
                self._staged[bsz] = torch.cuda.Event()
        if self.device.type != "cuda":
            return buf, buf
        self._staged[bsz].synchronize()
        return buf, self._staging[bsz]

    def _batch(self, bsz: int, nb: int, buf: dict, context_lens: tuple[int, ...]) -> ForwardBatch:
        """The step's ForwardBatch over the bucket's buffers."""
        tables = buf["block_tables"]
        mode = LORA_NONE if nb == 0 else LORA_GROUPS if nb == HOST_RUNS else LORA_ROWS
        return ForwardBatch(buf["input_ids"], buf["positions"], buf["slot_mapping"], tables, buf["rows"],
                            buf["row_lens"], (1,) * bsz, context_lens, True, mode,
                            (buf["meta"], buf["scale"]) if mode == LORA_ROWS else None)

    def _num_buckets(self, lora: LoraBatch | None) -> int:
        """Rank buckets the variant covers: all of the pool's (0 = no LoRA)."""
        return 0 if lora is None else len(self.pool.buckets)

    def warm_up(self) -> None:
        """Compiles now what a CPU step can ask for, so no step waits for a compile: one variant
        (the batch is a dynamic dimension, and LoRA rows of any adapter mix go through the
        backend's op). On CUDA every batch bucket is its own graph: compiled ones are made at
        first use, captured ones here, each over its bucket's buffers holding a dummy step."""
        if self.cuda_graphs:
            if self.capture:
                t0 = time.perf_counter()
                forms = (0, len(self.pool.buckets)) if self.pool.targets and self.pool.buckets else (0,)
                self.model.prepare_lora(None)  # a LoRA variant's dummy rows use no adapter (steps prepare their own)
                with self._on_device():
                    for bsz in reversed(self.batch_buckets):  # largest first: the smaller reuse its pool
                        for nb in forms:
                            if (bsz, nb) not in self._fns and (bsz, nb) not in self.failed:
                                self._capture_variant((bsz, nb), self._dummy_batch(bsz, nb))
                log.info("captured %d decode-step CUDA graphs in %.1f s", len(self._fns), time.perf_counter() - t0)
            return
        key = self.variant_key(2, None)
        if key not in self._fns and key not in self.failed:
            self.pending[key] = 1
            t0 = time.perf_counter()
            self.compile_pending()
            if key in self._fns:
                log.info("decode step compiled before serving in %.1f s", time.perf_counter() - t0)
            else:
                log.warning("the decode step did not compile (see above): steps run eagerly")

    def compile_pending(self) -> bool:
        """Compiles (or loads from the artifact cache) the pending variant the most steps wanted,
        in the calling thread, over a dummy step (every row: position 0 of the scratch block, no
        adapter). False when nothing is pending. The engine calls it when it has nothing to step:
        compiling then delays no step, and it runs in the thread that runs the steps (with
        several OpenMP threads, variants compiled on another thread made every later step
        several times slower)."""
        if not self.pending:
            return False
        key = max(self.pending, key=self.pending.get)
        del self.pending[key]
        bsz, nb = key if self.cuda_graphs else (2, key[1])
        buf = self._new_buffers(bsz, self.device)  # every row: position 0 of the scratch block, no adapter
        buf["row_lens"][:], buf["meta"][0] = 1, -1
        fb = self._batch(bsz, nb, buf, (1,) * bsz)
        self.model.prepare_lora(None)  # a LoRA variant's dummy rows use no adapter (steps prepare their own)
        try:
            with torch.inference_mode():
                self._variant(*key)(fb)
        except Exception:
            log.exception("compiling the decode step variant %s failed; those steps stay eager", key)
            self.failed.add(key)
        return True

    def _dummy_batch(self, bsz: int, nb: int) -> ForwardBatch:
        """The bucket's own buffers holding a step of bsz rows at position 0 of the scratch block
        (block 0), no adapter (what a CUDA graph is captured over)."""
        buf = self._step_buffers(bsz)[0]
        for k in STEP_INPUTS:
            buf[k].zero_()
        buf["row_lens"].fill_(1)
        buf["meta"].zero_()
        buf["meta"][0] = -1
        buf["scale"].zero_()
        return self._batch(bsz, nb, buf, (1,) * bsz)

    def _variant(self, bsz: int, nb: int):
        fn = self._fns.get((bsz, nb))
        if fn is not None:
            return fn
        if self.capture:
            return self._first_call(bsz, nb, self.capturer.step(self.step_fn()), "capturing")
        mode = "reduce-overhead" if self.cuda_graphs else None  # reduce-overhead = CUDA graph replay
        name = f"decode_b{bsz or 'any'}_" + ("runs" if nb == HOST_RUNS else f"r{nb}")
        # The step reads the model's modules (weights, layer indices, windows), which never change
        # for the engine's lifetime: guarding them is a few percent of a CPU step, where a step's
        # host time is its time. For the same reason the compiled code does not re-assert each
        # tensor's sizes and strides: Dynamo's guards check the inputs,
        # and the tests hold every custom op's output to the shape its fake implementation gives.
        # (GPU steps replay CUDA graphs: their guards and checks are left alone.)
        options = None if self.cuda_graphs else {
            "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe, "size_asserts": False}
        compiled = torch.compile(_own_code(self.step_fn(), name), fullgraph=True, mode=mode, options=options)
        return self._first_call(bsz, nb, compiled, "compiling")

    def _first_call(self, bsz: int, nb: int, fn, verb: str):
        """fn, whose first call (the compile or the capture) is timed into compile_s and, once
        it has succeeded, makes fn the variant's step function."""
        log.info("%s the decode step for batch bucket %s (LoRA: %s)", verb, bsz or "any",
                 "per-adapter runs" if nb == HOST_RUNS else f"BGMV over {nb} rank bucket(s)" if nb else "none")

        def first_call(*args):
            t0 = time.perf_counter()
            out = fn(*args)
            self.compile_s += time.perf_counter() - t0
            self._fns[(bsz, nb)] = fn
            if not self.capture and self.cache is not None:
                self.cache.save()
            return out

        return first_call

    def step_fn(self):
        """The function each variant compiles: the model's own forward over the engine's KV cache."""
        model, kv_layers = self.model, self.kv_layers

        def step(fb: ForwardBatch) -> torch.Tensor:
            return model.run(fb, kv_layers)

        return step
