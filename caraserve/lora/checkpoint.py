"""Reads LoRA adapters saved by PEFT and validates them against the base model.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors` (or `.bin`).
`inspect_adapter` checks everything the config and the safetensors header show, reading no
weights (registration: its cost does not grow with the adapter's bytes); `load_adapter` reads the
weights, checks all that again plus their values, and stacks them. A broken adapter never reaches
the host store's memory or the device: each problem raises `AdapterError` naming the adapter and
the reason.
What a read may touch is bounded too (`ReadLimits`: file sizes, the folders files may resolve
into), and user regexes in the config are matched so that no pattern can hang the process.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import stat
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch

from caraserve.lora.adapter_config import TARGETS, read_adapter_config
from caraserve.lora.adapter_files import AdapterError, ReadLimits, check_name, read_weights
from caraserve.lora.adapter_info import AdapterInfo
from caraserve.lora.module_patterns import PARENT, ModuleRules, PatternError, module_names, module_rules

log = logging.getLogger(__name__)

# a decoder layer's LoRA tensor; a multimodal model's language model names its layers
# model.language_model.layers (transformers 5) or language_model.model.layers (earlier)
_MOE_KEY = re.compile(r"\.layers\.\d+\.(mlp|block_sparse_moe)\."
                      r"(experts|gate|router|input_linear|output_linear|shared_expert|shared_expert_gate)\.")
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.language_model\.|language_model\.model\.|model\.)layers\.(\d+)\."
    r"(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$"
)
# a multimodal model's parts besides its language model: their LoRA tensors are not used
_OTHER_TOWERS = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?(?:vision_tower|multi_modal_projector|visual)\.")


@dataclass(frozen=True)
class LoraWeights:
    """A validated adapter in host memory.

    a[m]: [L, in, r_m] and b[m]: [L, r_m, out] for each target module m (zeros in layers the
    adapter does not touch). Per-module scalings that differ from `scale` (alpha_pattern /
    rank_pattern) are folded into b, so one scalar per adapter remains.
    """

    name: str
    path: str
    rank: int  # largest rank over modules: decides the device rank bucket
    scale: float  # lora_alpha / r (or / sqrt(r) with rslora)
    a: dict  # module -> [L, in, r_m] float tensor
    b: dict  # module -> [L, r_m, out] float tensor
    digest: tuple = ()  # content_digest of what was read (() for weights made in memory)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.a, self.b) for t in d.values())

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(m for m in TARGETS if m in self.a)


@dataclass(frozen=True)
class AdapterMeta:
    """What registration learns from the config and the safetensors header, no weights read."""

    name: str
    path: str
    rank: int  # largest rank over modules
    scale: float  # lora_alpha / r (or / sqrt(r) with rslora)
    targets: tuple[str, ...]  # modules with LoRA, in TARGETS order
    numel: int  # elements of the stacked a and b tensors together

    def nbytes(self, dtype: torch.dtype) -> int:
        """Host bytes of the stacked weights in `dtype`, as LoraWeights.nbytes will report them."""
        return self.numel * dtype.itemsize


@dataclass(frozen=True)
class _Layout:
    """An adapter's validated structure: which tensors feed which stacked (layer, module) entry."""

    rank: int
    scale: float
    ranks: Mapping  # module -> rank
    # (layer, module) -> (module key, key of lora_A, key of lora_B, ratio folded into b, B's first
    # and end row: a part of a fused checkpoint module takes its rows of the fused B)
    pairs: Mapping
    targets: tuple[str, ...]  # the modules in ranks, in TARGETS order
    numel: int  # elements of the stacked a and b tensors together


def inspect_adapter(folder: str | Path, model_args, name: str | None = None,
                    limits: ReadLimits | None = None) -> AdapterMeta:
    """Validates the PEFT adapter in `folder` for a base model with `model_args` from what its
    config and safetensors header show, reading no weights (a legacy .bin is read whole and its
    values checked too). NaN/Inf in a safetensors file is found by load_adapter, on first use."""
    name, folder, real, cfg, rules, limits = _open_folder(folder, name, limits, model_args)
    found = read_weights(name, real, limits, header_only=True)
    # all shapes (a safetensors header) or all tensors (a .bin, read whole)
    tensors = isinstance(next(iter(found.values()), None), torch.Tensor)
    shapes = {k: tuple(t.shape) for k, t in found.items()} if tensors else found
    layout = _layout(name, cfg, shapes, model_args)
    if tensors:
        _check_finite(name, layout, found)
    return AdapterMeta(name, str(folder), layout.rank, layout.scale, layout.targets, layout.numel)


def load_adapter(folder: str | Path, model_args, name: str | None = None,
                 limits: ReadLimits | None = None) -> LoraWeights:
    """Reads and validates the PEFT adapter in `folder` for a base model with `model_args`;
    `limits` bounds what the read may touch (default: nothing)."""
    name, folder, real, cfg, rules, limits = _open_folder(folder, name, limits, model_args)
    tensors = read_weights(name, real, limits, header_only=False)
    digest = content_digest(cfg, tensors)
    layout = _layout(name, cfg, {k: tuple(t.shape) for k, t in tensors.items()}, model_args)
    out_a, out_b = {}, {}
    covered: dict[str, int] = {}
    for _, module in layout.pairs:
        covered[module] = covered.get(module, 0) + 1
    for (_, module), (_, ka, *_) in layout.pairs.items():
        if tensors[ka].shape[0] < layout.ranks[module]:
            covered[module] = -1  # a layer of a lower rank (rank_pattern): its extra rank columns are zero
    for module, r in layout.ranks.items():  # stacked per module, zeros in untouched layers
        fan_in, fan_out = model_args.module_shape(module)
        new = torch.empty if covered.get(module) == model_args.num_layers else torch.zeros
        out_a[module] = new(model_args.num_layers, fan_in, r)
        out_b[module] = new(model_args.num_layers, r, fan_out)
    for (layer, module), (_, ka, kb, _, lo, hi) in layout.pairs.items():
        r = tensors[ka].shape[0]  # zero-padded up to the module's rank: the delta is the same
        out_a[module][layer][:, :r] = tensors[ka].t()
        out_b[module][layer][:r] = tensors[kb][lo:hi].t()
    # The reads run beside the steps, so the values are checked in one pass per stacked module
    # without allocating: a sum is finite when every value is (huge finite values may overflow
    # it: then the exact check decides, and the per-tensor one names the culprit).
    stacked = (*out_a.values(), *out_b.values())
    if not all(bool(torch.isfinite(t.sum())) for t in stacked) and \
            not all(bool(torch.isfinite(t).all()) for t in stacked):
        _check_finite(name, layout, tensors)
        raise AdapterError(f"adapter {name!r}: holds values beyond float32's range")
    for (layer, module), (_, _, _, ratio, _, _) in layout.pairs.items():
        if ratio != 1.0:
            out_b[module][layer] *= ratio
    return LoraWeights(name, str(folder), layout.rank, layout.scale, out_a, out_b, digest)


def content_digest(cfg: dict, tensors: Mapping[str, torch.Tensor]) -> tuple:
    """What tells an adapter's content apart from another version of it: a CRC-32 of its config
    and of each tensor's bytes. The host tier re-reads an adapter its budget dropped, and a
    training job may have saved its next checkpoint into the folder meanwhile, of the same
    shapes; file times cannot tell that from a copy or a `touch` of the same bytes, this can.
    (A checksum, not a cryptographic hash: it guards against versions, not against an attacker,
    who could write any weights into the folder anyway. CRC-32 runs at several GB/s and
    releases the GIL, so the reads beside the steps pay little for it.)"""
    digest = [zlib.crc32(json.dumps(cfg, sort_keys=True, default=str).encode())]
    for key in sorted(tensors):
        data = tensors[key].contiguous().reshape(-1).view(torch.uint8).numpy()
        digest.append(zlib.crc32(data, zlib.crc32(key.encode())))
    return tuple(digest)


def _open_folder(folder: str | Path, name: str | None, limits: ReadLimits | None, model_args):
    """(name, folder, its real path, config, module rules, limits) after every check that needs no
    weights file: the name, the folder's confinement, the config, its patterns, the rank cap."""
    folder = Path(folder)
    name = check_name(folder.name if name is None else name)
    limits = limits or ReadLimits()
    try:  # os.path.realpath and one stat: Path.resolve and is_dir cost two stats and much more time
        real = Path(os.path.realpath(folder))
        is_dir = stat.S_ISDIR(os.stat(real).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        is_dir = False
    except OSError as e:  # a symlink loop (non-strict realpath leaves it in place for stat to find), no access
        raise AdapterError(f"adapter {name!r}: cannot resolve folder {folder} ({e})") from e
    limits.check_inside(name, folder, real)
    if not is_dir:
        what = "is a file, not an adapter's folder" if real.is_file() else "does not exist"
        raise AdapterError(f"adapter {name!r}: folder {folder} {what}")
    cfg = read_adapter_config(name, real, limits, model_args.adapter_modules, model_args.peft_default_targets)
    try:  # before the weights: a refused pattern costs no weights read
        rules = module_rules(cfg, _module_names(model_args))
    except PatternError as e:
        raise AdapterError(f"adapter {name!r}: {e}") from e
    # (a rank_pattern entry for a module outside the targets, or excluded, allocates nothing)
    top = max([cfg["r"], *(r for n, r in rules.rank.items() if rules.targets is None or n in rules.targets)])
    if limits.max_rank is not None and top > limits.max_rank:  # stacking allocates layers x rank
        raise AdapterError(f"adapter {name!r}: rank {top} is larger than the largest rank bucket "
                           f"{limits.max_rank} (adapters.rank_buckets)")
    return name, folder, real, cfg, rules, limits


def _layout(name: str, cfg: dict, shapes: dict[str, tuple[int, ...]], model_args) -> _Layout:
    """Every check the tensor names and shapes allow, against the config and the base model.

    Done once per distinct (config fields it reads, tensor shapes, model): adapters trained alike
    share all three, and the checks walk every tensor. The key holds everything the checks read,
    so an adapter that differs in any of it is checked on its own."""
    fields = json.dumps([cfg.get(k) for k in _LAYOUT_FIELDS])
    key = tuple(shapes.items())
    try:
        if len(fields) > _MEMO_FIELDS_CHARS or len(key) > _MEMO_TENSORS:
            layout, ignored = _checked_layout.__wrapped__(fields, key, model_args)
        else:
            layout, ignored = _checked_layout(fields, key, model_args)
    except _Refused as e:
        raise AdapterError(f"adapter {name!r}: {e}") from None
    if ignored:  # one line per adapter: a large model's file may hold hundreds of such tensors
        log.warning("adapter %r: ignoring %d tensors of modules not in target_modules (as PEFT does) or of a "
                    "multimodal model's vision tower (not used for text), e.g. %s", name, len(ignored), ignored[0])
    return layout


# the config fields _checked_layout reads (the rest of the config was checked by read_adapter_config)
_LAYOUT_FIELDS = ("r", "lora_alpha", "use_rslora", "layers_to_transform", "target_modules", "rank_pattern",
                  "alpha_pattern", "exclude_modules")
# larger keys are checked each time, not kept (the memo holds 32 layouts); an adapter on all seven
# modules of 80 layers has 1120 tensors
_MEMO_FIELDS_CHARS = 64 * 1024
_MEMO_TENSORS = 4096


class _Refused(Exception):
    """A layout check failed; the message says why, without the adapter's name."""


# Layouts are shared between adapters: their maps are read-only views. Refusals raise, so they
# are not memoized.
@functools.lru_cache(maxsize=32)
def _checked_layout(fields: str, shapes: tuple, model_args) -> tuple[_Layout, tuple[str, ...]]:
    """(the layout, keys ignored as outside target_modules) of an adapter whose config has
    `fields` (JSON of _LAYOUT_FIELDS) and whose tensors have `shapes` ((key, shape) pairs)."""
    cfg = {k: v for k, v in zip(_LAYOUT_FIELDS, json.loads(fields)) if v is not None}
    try:
        rules = module_rules(cfg, _module_names(model_args))  # memoized: _open_folder resolved it
    except PatternError as e:
        raise _Refused(str(e)) from None
    shapes = dict(shapes)
    r, alpha = cfg["r"], cfg["lora_alpha"]
    use_rslora = bool(cfg.get("use_rslora", False))

    def scaling(rank, alph):
        value = alph / math.sqrt(rank) if use_rslora else alph / rank
        if not abs(value) <= torch.finfo(torch.float32).max:  # the slot's scale and the kernels' are float32
            raise _Refused(f"its scaling (lora_alpha {alph}, r {rank}{', rslora' if use_rslora else ''}) = {value:g} "
                           "is beyond float32's range")
        return value

    # A layer of another alpha or rank (alpha_pattern, rank_pattern) has its ratio to the scale folded
    # into its B; with lora_alpha 0 (adds nothing, as PEFT loads it) the scale is 1, each layer's folded in.
    base_scale = scaling(r, alpha) or 1.0
    ranks: dict[str, int] = {}
    pairs = {}
    found, ignored = _collect_pairs(cfg, rules, shapes, model_args)
    for (layer, module), ab in sorted(found.items()):
        key = f"{model_args.layer_prefix}.{layer}.{PARENT[module]}.{module}"
        want_r = rules.rank.get(key, r)
        _check_pair(cfg, key, layer, module, {k: shapes[v] for k, v in ab.items()}, want_r, model_args)
        ratio = scaling(want_r, rules.alpha.get(key, alpha)) / base_scale
        for part, lo, hi in model_args.module_parts(module):  # a fused module: its parts, B's rows split
            ranks[part] = max(ranks.get(part, 0), want_r)  # a lower-rank layer is zero-padded to it
            pairs[(layer, part)] = (key, ab["A"], ab["B"], ratio, lo, hi)
    targets = tuple(m for m in TARGETS if m in ranks)
    numel = sum(model_args.num_layers * sum(model_args.module_shape(m)) * ranks[m] for m in targets)
    layout = _Layout(max(ranks.values()), base_scale, MappingProxyType({m: ranks[m] for m in targets}),
                     MappingProxyType(pairs), targets, numel)
    return layout, tuple(ignored)


def _collect_pairs(cfg: dict, rules: ModuleRules, shapes: dict,
                   model_args) -> tuple[dict[tuple[int, str], dict[str, str]], list[str]]:
    """(layer, module) -> {"A": key, "B": key} for the targeted modules, and the keys of modules
    outside target_modules (ignored, as PEFT does); refuses keys of unsupported kinds
    (embedding/lm_head LoRA, DoRA) and modules or layers the model lacks."""
    pairs: dict[tuple[int, str], dict[str, str]] = {}
    ignored = []
    for key in shapes:
        if "lora_embedding" in key or "embed_tokens" in key:
            raise _Refused(f"embedding LoRA ({key}) is not supported")
        if "lm_head" in key:
            raise _Refused(f"LoRA on lm_head ({key}) is not supported")
        if "magnitude_vector" in key:
            raise _Refused(f"DoRA weights ({key}) are not supported")
        if model_args.multimodal and _OTHER_TOWERS.match(key):  # text in, text out: the vision tower's
            ignored.append(key)
            continue
        if getattr(model_args, "moe", None) is not None and _MOE_KEY.search(key):
            raise _Refused(f"LoRA on a mixture-of-experts model's experts or router ({key}) is not supported: "
                           f"adapt {', '.join(model_args.adapter_modules)}")
        m = _KEY.match(key)
        if m is None:
            raise _Refused(f"unexpected tensor {key!r}")
        layer, parent, module, ab = int(m[1]), m[2], m[3], m[4]
        if module not in model_args.adapter_modules or PARENT[module] != parent:
            raise _Refused(f"target module {parent}.{module} does not exist in the model")
        if layer >= model_args.num_layers:
            raise _Refused(f"tensor {key!r} is for layer {layer}, the model has {model_args.num_layers}")
        if rules.targets is not None and f"{model_args.layer_prefix}.{layer}.{parent}.{module}" not in rules.targets:
            ignored.append(key)
            continue
        pairs.setdefault((layer, module), {})[ab] = key
    if not pairs:
        if isinstance(cfg.get("target_modules"), str):
            raise _Refused(f"target_modules regex {cfg['target_modules']!r} matches no module of the model")
        raise _Refused("the checkpoint holds no LoRA tensors")
    return pairs, ignored


def _module_names(model_args) -> tuple[str, ...]:
    return module_names(model_args.num_layers, model_args.adapter_modules, model_args.layer_prefix)


def _check_pair(cfg: dict, key: str, layer: int, module: str, ab: dict, want_r: int, model_args) -> None:
    """Checks the shapes of lora_A [r, in] and lora_B [out, r] of one module against the config
    and the base model."""
    if set(ab) != {"A", "B"}:
        raise _Refused(f"{key} has lora_{'B' if 'A' in ab else 'A'} missing")
    layers_ok = cfg.get("layers_to_transform")
    if isinstance(layers_ok, int):
        layers_ok = [layers_ok]
    if layers_ok is not None and layer not in layers_ok:
        raise _Refused(f"{key} is outside layers_to_transform={layers_ok}")
    a, b = ab["A"], ab["B"]
    fan_in, fan_out = model_args.module_shape(module)
    if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
        raise _Refused(f"{key} has lora_A {a} and lora_B {b}")
    if a[0] != want_r:
        raise _Refused(f"{key} has rank {a[0]} but the config says r={want_r}")
    if a[1] != fan_in or b[0] != fan_out:
        raise _Refused(f"{key} shapes A {a}, B {b} do not fit the base model's {module} ({fan_in} -> {fan_out})")


def _check_finite(name: str, layout: _Layout, tensors: dict) -> None:
    for key, ka, kb, *_ in layout.pairs.values():
        if not (torch.isfinite(tensors[ka]).all() and torch.isfinite(tensors[kb]).all()):
            raise AdapterError(f"adapter {name!r}: {key} holds NaN or Inf values")


def check_unchanged(info: AdapterInfo, w: LoraWeights, dtype: torch.dtype) -> None:
    """Files whose rank, scale, modules or size changed since registration are refused: the
    scheduler and the device pool plan with what registration saw."""
    numel = sum(t.numel() for d in (w.a, w.b) for t in d.values())
    now, then = (w.rank, w.scale, w.targets, numel * dtype.itemsize), (info.rank, info.scale, info.targets, info.nbytes)
    if now != then:
        raise AdapterError(f"adapter {info.name!r}: its files in {info.path} changed since it was registered (rank, "
                           f"scale, modules, bytes were {then}, now {now}); unload it and load it again to serve them")


def changed_error(info: AdapterInfo) -> AdapterError:
    """A re-read of other weights than the adapter served before (a new checkpoint saved into its
    folder, of the same shapes): its prefix-cache blocks and device slot hold the old ones, so
    the new ones are refused, not mixed with them. The same bytes, copied or touched, are served."""
    return AdapterError(f"adapter {info.name!r}: its files in {info.path} changed since it was registered (other "
                        "weights than it served before); unload it and load it again to serve them")
