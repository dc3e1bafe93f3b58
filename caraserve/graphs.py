"""DecodeGraphs: the decode step as one compiled tensor function over preallocated buffers.

One variant per (batch-size bucket, LoRA form): the batch is padded to a power-of-two row
count (padding rows write into the scratch KV block, block 0, that no request owns). Attention
reads the paged KV cache through each row's block table (`caraserve.attention`): on CPU an
opaque op runs the C kernel, on GPUs the gathered form, which the compiler fuses. The
LoRA delta has two forms. On GPUs, a multi-bucket BGMV (two Triton kernels per adapted module
whatever the adapter mix, `triton_multi.bgmv_multi`; each row carries its rank bucket, slot,
rank and scale), one variant per batch bucket. On CPU, where a gather of every row's weights
costs more than the whole step, an opaque op per module runs the eager form (`add_lora_runs`:
every adapter's rows of the module in one call of a C kernel) on the step's LoraBatch, which
the op reads from the thread running the step: one variant serves every adapter mix. On CUDA
the block-table width is a dynamic dimension, so a longer context does not recompile, and each
variant is replayed as a CUDA graph (mode="reduce-overhead"), recorded once per power-of-two
width.
Compiled artifacts are saved to, and loaded from, a cache folder keyed by model, dtype, device
and torch version, so a restarted engine skips the compile.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from caraserve.attention import paged_attention, write_kv
from caraserve.kv_cache import blocks_for
from caraserve.lora.batch import LoraBatch
from caraserve.lora.ops import add_lora_runs
from caraserve.model.layers import apply_rotary
from caraserve.model.llama import CausalLM

log = logging.getLogger(__name__)
_USER_INDUCTOR_DIR = "TORCHINDUCTOR_CACHE_DIR" in os.environ
STEP_VERSION = 6  # of the compiled step's code (part of the artifact cache key)


def _own_code(fn, name: str):
    """fn with a code object of its own. Dynamo keeps its compiled entries (and its recompile
    limit, 8) per code object; variants made from one closure would share that limit and, past
    it, silently run eagerly."""
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


HOST_RUNS = -1  # the "rank buckets" of a variant whose LoRA runs through cpu_lora_runs_
_step = threading.local()  # .lora: the LoraBatch of the compiled step running on this thread


# A plain dispatcher op (a Python kernel registered for CPU): ~3 us a call, where a
# torch.library.custom_op costs ~25 us, and a step makes one call per adapted module.
_lib = torch.library.Library("caraserve", "FRAGMENT")
_lib.define("cpu_lora_runs_(Tensor(a!) y, Tensor x, int layer, str module) -> ()")


def _cpu_lora_runs(y: torch.Tensor, x: torch.Tensor, layer: int, module: str) -> None:
    """y += the LoRA delta of module `module` of `layer` for the running step's rows (CPU)."""
    lora = getattr(_step, "lora", None)
    if lora is not None:
        add_lora_runs(y, x, lora.groups, layer, module, lora.cpu_tables)


_lib.impl("cpu_lora_runs_", _cpu_lora_runs, "CPU")


@torch.library.register_fake("caraserve::cpu_lora_runs_")
def _(y, x, layer, module) -> None:
    return None


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


class DecodeGraphs:
    def __init__(self, model: CausalLM, kv_layers, pool, max_seq_len: int, max_batch_size: int,
                 cache_file: Path | None = None, background: bool = False):
        self.model = model
        self.kv_layers = kv_layers
        self.pool = pool
        self.batch_buckets = batch_buckets(max_batch_size)
        self.block_size = kv_layers[0][0].shape[1]
        self.max_blocks = blocks_for(max_seq_len, self.block_size)  # block-table width a request can need
        self.cache_file = cache_file
        self.device = model.model.embed_tokens.weight.device
        self.cuda_graphs = self.device.type == "cuda"
        self.host_runs = self.device.type == "cpu"  # LoRA through cpu_lora_runs_ rather than BGMV
        # The BGMV form's kernels: Triton on CUDA; torch gathers elsewhere (CPU tests of that form)
        self.triton_lora = self.device.type == "cuda"
        self._fns: dict[tuple[int, int], object] = {}
        self.compile_s = 0.0
        # background: a missing variant compiles on a worker thread while steps run eagerly
        self._jobs: queue.Queue | None = queue.Queue() if background else None
        self._queued: set[tuple[int, int]] = set()
        if self.cuda_graphs:
            # The step writes the KV cache and reads the adapter slots, tensors it closes over
            # (graph inputs to the compiler). CUDA-graph trees skip graphs that mutate inputs
            # unless those inputs keep a fixed address, which these do for the engine's lifetime.
            lora = [w for bk in pool.buckets for ab in bk.weights.values() for w in ab]
            lora = [t for w in lora for t in (w if isinstance(w, list) else [w])]
            for t in [t for kv in kv_layers for t in kv] + lora:
                torch._dynamo.mark_static_address(t)
        if background:
            # Not a daemon thread: see _compile_worker
            threading.Thread(target=self._compile_worker, name="caraserve-compile").start()
        if cache_file is not None:
            # Inductor's own cache keeps the built kernels (on CPU, compiled C++), which the
            # portable artifacts below do not: keeping it beside them makes a restart cheap.
            # Only when the user has not chosen a folder (torch fills the variable in on first use).
            if not _USER_INDUCTOR_DIR:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_file.parent.resolve() / "inductor")
            if cache_file.is_file():
                torch.compiler.load_cache_artifacts(cache_file.read_bytes())
                log.info("loaded compile artifacts from %s", cache_file)

    @staticmethod
    def cache_key(model_path: str, dtype: torch.dtype, device: torch.device, max_batch_size: int,
                  rank_buckets) -> str:
        cfg = Path(model_path, "config.json")
        text = cfg.read_text() if cfg.is_file() else model_path
        # STEP_VERSION changes whenever the step function does, so stale artifacts are not reloaded
        raw = f"{STEP_VERSION}|{text}|{dtype}|{device.type}|{torch.__version__}|{max_batch_size}|{tuple(rank_buckets)}"
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    def __call__(self, tokens, starts, tables, lora: LoraBatch | None) -> torch.Tensor | None:
        """Logits [n, V] of the compiled step, or None when the caller should run it eagerly
        (the variant still compiling in the background)."""
        n = len(tokens)
        bsz = bucket_up(n, self.batch_buckets)
        nb = HOST_RUNS if lora is not None and self.host_runs else self._num_buckets(lora)
        if (bsz, nb) not in self._fns and self._jobs is not None:
            if (bsz, nb) not in self._queued:
                self._queued.add((bsz, nb))
                self._jobs.put((bsz, nb))
            return None
        pad = bsz - n
        bs = self.block_size
        # Block-table width: on CPU always the widest a request can need (the C kernel reads only
        # each row's own blocks, and one shape needs no dynamic dimension); on CUDA, where the
        # attention gathers the table's blocks and a CUDA graph is recorded per width, the
        # batch's widest rounded up to a power of two (a dynamic dimension).
        width = self.max_blocks
        if self.cuda_graphs:
            width = min(self.max_blocks, 1 << (max(map(len, tables)) - 1).bit_length())
        ids = torch.tensor([t[0] for t in tokens] + [0] * pad)
        pos = torch.tensor(list(starts) + [0] * pad)
        # padding rows write position 0 of the scratch block (block 0, offset 0) and read it back
        slot_mapping = torch.tensor([t[p // bs] * bs + p % bs for t, p in zip(tables, starts)] + [0] * pad)
        block_tables = torch.zeros(bsz, width, dtype=torch.int64)
        for i, t in enumerate(tables):
            block_tables[i, : len(t)] = torch.tensor(t)
        dev = self.device
        ids, pos, slot_mapping, block_tables = (t.to(dev) for t in (ids, pos, slot_mapping, block_tables))
        if self.cuda_graphs:
            torch._dynamo.maybe_mark_dynamic(block_tables, 1)
        row_slot, row_scale = self._lora_rows(lora, bsz, nb) if nb != HOST_RUNS else (None, None)
        _step.lora = lora
        try:
            with torch.inference_mode():
                logits = self._variant(bsz, nb)(ids, pos, slot_mapping, block_tables, row_slot, row_scale)
        finally:
            _step.lora = None
        return logits[:n]

    def _num_buckets(self, lora: LoraBatch | None) -> int:
        """Rank buckets the variant covers: all of the pool's (0 = no LoRA)."""
        return 0 if lora is None else len(self.pool.buckets)

    def _lora_rows(self, lora: LoraBatch | None, bsz: int, nb: int):
        """row_meta [3, B] int32 (rank bucket, -1 for none; slot; rank) and row_scale [B] float32."""
        if lora is None:
            return None, None
        meta = torch.zeros(3, bsz, dtype=torch.int32)
        meta[0] = -1
        row_scale = torch.zeros(bsz, dtype=torch.float32)
        for g in lora.groups:
            b = self.pool.rank_buckets.index(g.rank)
            for start, count, slot in g.index.segments:
                meta[:, start : start + count] = torch.tensor([b, slot, g.rank], dtype=torch.int32)[:, None]
                row_scale[start : start + count] = g.host_scale[slot]
        return meta.to(self.device), row_scale.to(self.device)

    def _compile_worker(self) -> None:
        """Compiles queued variants until the main thread has finished. At interpreter exit the
        interpreter then waits for the compile in progress (whose artifacts are saved) instead of
        ending the thread where it stands: a daemon thread inside torch is ended by pthread_exit
        when it next takes the GIL, and that unwind through torch's C++ frames aborts the process
        ("terminate called without an active exception", status 134). A server that must not
        wait ends its process with os._exit once drained (caraserve.serve)."""
        main = threading.main_thread()
        while True:
            try:
                bsz, nb = self._jobs.get(timeout=0.5)
            except queue.Empty:
                if not main.is_alive():
                    return
                continue
            if not main.is_alive():  # exiting: no new compile
                self._jobs.task_done()
                continue
            dev = self.device
            ids = torch.zeros(bsz, dtype=torch.int64, device=dev)
            pos = torch.zeros(bsz, dtype=torch.int64, device=dev)  # distinct from ids: dynamo guards aliasing
            slot_mapping = torch.zeros(bsz, dtype=torch.int64, device=dev)
            width = min(self.max_blocks, 4) if self.cuda_graphs else self.max_blocks
            block_tables = torch.zeros(bsz, width, dtype=torch.int64, device=dev)
            if self.cuda_graphs:
                torch._dynamo.maybe_mark_dynamic(block_tables, 1)
            rows = (torch.full((3, bsz), -1, dtype=torch.int32, device=dev),  # every row: no adapter
                    torch.zeros(bsz, dtype=torch.float32, device=dev)) if nb > 0 else (None, None)
            _step.lora = None  # HOST_RUNS variants: no LoRA rows in this run
            try:
                with torch.inference_mode():  # every row writes the scratch KV block only
                    self._variant(bsz, nb)(ids, pos, slot_mapping, block_tables, *rows)
            except Exception:
                log.exception("background compile of batch bucket %d failed; those steps stay eager", bsz)
            finally:
                self._jobs.task_done()

    def wait_compiled(self) -> None:
        """Blocks until every queued background compile has finished."""
        if self._jobs is not None:
            self._jobs.join()

    def _variant(self, bsz: int, nb: int):
        fn = self._fns.get((bsz, nb))
        if fn is not None:
            return fn
        mode = "reduce-overhead" if self.cuda_graphs else None  # reduce-overhead = CUDA graph replay
        name = f"decode_b{bsz}_" + ("runs" if nb == HOST_RUNS else f"r{nb}")
        # The step reads the model's modules (weights, layer indices, windows), which never change
        # for the engine's lifetime: guarding them cost ~0.2 ms of a ~10 ms CPU step, where a
        # step's host time is its time. (GPU steps replay CUDA graphs: their guards are left alone.)
        options = None if self.cuda_graphs else {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        compiled = torch.compile(_own_code(self._step_fn(bsz, nb), name), fullgraph=True, mode=mode, options=options)
        log.info("compiling the decode step for batch bucket %d (LoRA: %s)", bsz,
                 "per-adapter runs" if nb == HOST_RUNS else f"BGMV over {nb} rank bucket(s)" if nb else "none")

        def first_call(*args):
            t0 = time.perf_counter()
            out = compiled(*args)
            self.compile_s += time.perf_counter() - t0
            self._fns[(bsz, nb)] = compiled
            self._save()
            return out

        return first_call

    def _save(self) -> None:
        if self.cache_file is None:
            return
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is not None:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_file.with_suffix(".tmp")
            tmp.write_bytes(artifacts[0])
            tmp.replace(self.cache_file)

    def _step_fn(self, bsz: int, nb: int):
        m, kv_layers = self.model, self.kv_layers
        a = m.args
        buckets = self.pool.buckets[:max(nb, 0)]
        triton_lora = self.triton_lora
        if triton_lora:
            from caraserve.lora import triton_multi

        def lora(y, x, name, layer, meta, row_scale):
            if triton_lora:
                triton_multi.bgmv_multi(y, x, [bk.weights[name][0][layer] for bk in buckets],
                                        [bk.weights[name][1][layer] for bk in buckets], meta, row_scale)
                return y
            # The same rows in torch ops (CPU tests of the GPU form): gather every row's slot
            slot = meta[1].long()
            for b, bucket in enumerate(buckets):
                la, lb = bucket.weights[name]
                v = torch.bmm(x.unsqueeze(1), la[layer][slot])  # [B, 1, R]
                d = torch.bmm(v, lb[layer][slot]).squeeze(1)  # [B, out]
                y = y + (d * torch.where(meta[0] == b, row_scale, 0.0).unsqueeze(1)).to(y.dtype)
            return y

        def proj(mod, x, row_slot, row_scale):
            y = F.linear(x, mod.weight, mod.bias)
            if nb == HOST_RUNS and mod.name in self.pool.targets:
                torch.ops.caraserve.cpu_lora_runs_(y, x, mod.layer, mod.name)
            elif nb and mod.name in self.pool.targets:
                y = lora(y, x, mod.name, mod.layer, row_slot, row_scale)
            return y

        def step(ids, pos, slot_mapping, block_tables, row_slot, row_scale):
            h = m.model.embed_tokens(ids)
            cos, sin = m.rotary.cos_sin(pos, h.dtype)
            rows = torch.arange(bsz, device=ids.device)
            lens = pos + 1
            for layer, (kc, vc) in zip(m.model.layers, kv_layers):
                at = layer.self_attn
                x = layer.input_layernorm(h)
                q = proj(at.q_proj, x, row_slot, row_scale).view(bsz, a.num_heads, a.head_dim)
                k = proj(at.k_proj, x, row_slot, row_scale).view(bsz, a.num_kv_heads, a.head_dim)
                v = proj(at.v_proj, x, row_slot, row_scale).view(bsz, a.num_kv_heads, a.head_dim)
                q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
                write_kv(kc, vc, slot_mapping, k, v)
                o = paged_attention(q, kc, vc, block_tables, rows, lens, at.window)
                h = h + proj(at.o_proj, o.reshape(bsz, -1), row_slot, row_scale)
                x = layer.post_attention_layernorm(h)
                mlp = layer.mlp
                g = proj(mlp.gate_proj, x, row_slot, row_scale)
                u = proj(mlp.up_proj, x, row_slot, row_scale)
                h = h + proj(mlp.down_proj, F.silu(g) * u, row_slot, row_scale)
            return m.head(m.model.norm(h))

        return step
