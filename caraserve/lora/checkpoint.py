"""Reads LoRA adapters saved by PEFT and validates them against the base model.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors` (or `.bin`).
Everything is checked before the weights are returned, so a broken adapter never reaches the
host store or the device: each problem raises `AdapterError` naming the adapter and the reason.
What a read may touch is bounded too (`ReadLimits`: file sizes, the folders files may resolve
into), and user regexes in the config are matched so that no pattern can hang the process.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import torch

from caraserve.lora.module_patterns import (
    MAX_PATTERN_KEYS,
    ModuleRules,
    PatternError,
    check_regex,
    key_regex,
    module_names,
    module_rules,
)

log = logging.getLogger(__name__)

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$"
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# PEFT configs are a few KB (a few hundred with a key per module); parsing a huge JSON would
# take far more memory than the file, so the config has a cap of its own below max_file_bytes.
MAX_CONFIG_BYTES = 16 * 2**20


class AdapterError(ValueError):
    """The adapter cannot be used; the message names it and says why."""


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

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.a, self.b) for t in d.values())

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(m for m in TARGETS if m in self.a)


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
            f"adapter name {name!r} is not a plain name (letters, digits, '.', '_', '-'; no path separators or '..')"
        )
    return name


def _check_stat(name: str, path: Path, st: os.stat_result, limits: ReadLimits, cap: int | None) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise AdapterError(f"adapter {name!r}: {path} is not a regular file")
    if cap is not None and st.st_size > cap:
        knob = f"adapters.max_file_bytes={limits.max_file_bytes}" if cap == limits.max_file_bytes else \
            f"the adapter_config.json cap of {cap} bytes"
        raise AdapterError(f"adapter {name!r}: {path} is {st.st_size} bytes, more than {knob}")


def _open_file(name: str, path: Path, limits: ReadLimits, cap: int | None) -> tuple[int, str] | None:
    """(fd, a path that reads that fd) of an adapter file after the checks that must come before
    any read: it resolves inside the roots, is a regular file, is within the size cap. None: no file."""
    try:
        real = path.resolve()  # not strict: a dangling link out of the roots is refused as such
    except (OSError, RuntimeError) as e:  # symlink loops
        raise AdapterError(f"adapter {name!r}: cannot resolve {path} ({e})") from e
    limits.check_inside(name, path, real)
    try:
        _check_stat(name, path, os.stat(real), limits, cap)  # before opening: FIFOs and devices stay unopened
        # the file may be swapped between the checks and the open: a FIFO must not block the open,
        # a symlink must not be followed, and the opened file itself is checked again
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise AdapterError(f"adapter {name!r}: cannot open {path} ({e})") from e
    try:
        _check_stat(name, path, os.fstat(fd), limits, cap)
        proc = f"/proc/self/fd/{fd}"
        if os.path.islink(proc):  # Linux: where the open really landed (a folder swapped for a link)
            limits.check_inside(name, path, Path(os.readlink(proc)))
            return fd, proc
        return fd, str(real)
    except BaseException:
        os.close(fd)
        raise


def _read_config(name: str, folder: Path, limits: ReadLimits) -> dict:
    path = folder / "adapter_config.json"
    cap = min(MAX_CONFIG_BYTES, limits.max_file_bytes or MAX_CONFIG_BYTES)
    opened = _open_file(name, path, limits, cap)
    if opened is None:
        raise AdapterError(f"adapter {name!r}: {path} is missing")
    with os.fdopen(opened[0], "rb") as f:
        try:
            data = f.read(cap + 1)
        except OSError as e:
            raise AdapterError(f"adapter {name!r}: cannot read {path} ({e})") from e
    if len(data) > cap:  # it grew after the check
        raise AdapterError(f"adapter {name!r}: {path} is more than {cap} bytes")
    try:
        cfg = json.loads(data)
    except ValueError as e:
        raise AdapterError(f"adapter {name!r}: {path} is not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise AdapterError(f"adapter {name!r}: {path} must hold a JSON object")
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type {peft_type} is not supported (only LORA)")
    if cfg.get("use_dora"):
        raise AdapterError(f"adapter {name!r}: use_dora=true (DoRA) is not supported")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"adapter {name!r}: modules_to_save={cfg['modules_to_save']} is not supported")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"adapter {name!r}: bias={cfg['bias']!r} is not supported (only 'none')")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise AdapterError(f"adapter {name!r}: r={r!r} must be a positive integer")
    alpha = cfg.get("lora_alpha", r)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise AdapterError(f"adapter {name!r}: lora_alpha={alpha!r} must be a number")
    if cfg.get("alora_invocation_tokens"):
        raise AdapterError(f"adapter {name!r}: activated LoRA (alora_invocation_tokens) is not supported")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        for t in targets:
            if not isinstance(t, str):
                raise AdapterError(f"adapter {name!r}: target_modules entries must be strings, got {t!r}")
            if t in ("embed_tokens", "lm_head"):
                raise AdapterError(f"adapter {name!r}: LoRA on {t} is not supported")
            if t.split(".")[-1] not in TARGETS:
                raise AdapterError(f"adapter {name!r}: target module {t!r} does not exist in the model")
    elif isinstance(targets, str):
        _check_regex(name, "target_modules regex", targets, targets)
    elif targets is not None:
        raise AdapterError(f"adapter {name!r}: target_modules must be a list of names or a regex string")
    layers = cfg.get("layers_to_transform")
    if layers is not None and not (
        (isinstance(layers, int) and not isinstance(layers, bool))
        or (isinstance(layers, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in layers))
    ):
        raise AdapterError(f"adapter {name!r}: layers_to_transform={layers!r} must be an int or a list of ints")
    patterns = {key: cfg.get(key) or {} for key in ("rank_pattern", "alpha_pattern")}
    for key, pattern in patterns.items():
        if not isinstance(pattern, dict):
            raise AdapterError(f"adapter {name!r}: {key} must be an object of pattern -> value")
    n_keys = sum(map(len, patterns.values()))
    if n_keys > MAX_PATTERN_KEYS:
        raise AdapterError(f"adapter {name!r}: rank_pattern and alpha_pattern hold {n_keys} keys, "
                           f"more than {MAX_PATTERN_KEYS}")
    for key, pattern in patterns.items():
        for k, v in pattern.items():
            _check_regex(name, f"{key} key", k, key_regex(k))
            wrong_type = not isinstance(v, int) if key == "rank_pattern" else not isinstance(v, (int, float))
            if wrong_type or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise AdapterError(f"adapter {name!r}: {key}[{k!r}]={v!r} must be a positive number")
    if cfg.get("fan_in_fan_out"):
        # PEFT turns it off for nn.Linear targets, which is all a Llama has.
        log.warning("adapter %r: fan_in_fan_out=true ignored for Linear layers (as PEFT does)", name)
    return cfg


def _check_regex(name: str, what: str, pattern: str, regex: str) -> None:
    try:
        check_regex(what, pattern, regex)
    except PatternError as e:
        raise AdapterError(f"adapter {name!r}: {e}") from e


def _read_tensors(name: str, folder: Path, limits: ReadLimits) -> dict[str, torch.Tensor]:
    for path in (folder / "adapter_model.safetensors", folder / "adapter_model.bin"):
        opened = _open_file(name, path, limits, limits.max_file_bytes)
        if opened is None:
            continue
        fd, readable = opened
        try:
            with os.fdopen(fd, "rb") as f:
                if path.suffix == ".safetensors":
                    from safetensors.torch import load_file

                    return load_file(readable)
                return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated or corrupt files raise library-specific errors
            raise AdapterError(f"adapter {name!r}: cannot read {path} ({e})") from e
    raise AdapterError(f"adapter {name!r}: no adapter_model.safetensors or adapter_model.bin in {folder}")


def load_adapter(folder: str | Path, model_args, name: str | None = None,
                 limits: ReadLimits | None = None) -> LoraWeights:
    """Reads and validates the PEFT adapter in `folder` for a base model with `model_args`;
    `limits` bounds what the read may touch (default: nothing)."""
    folder = Path(folder)
    name = check_name(folder.name if name is None else name)
    limits = limits or ReadLimits()
    try:
        real = folder.resolve()
    except (OSError, RuntimeError) as e:  # symlink loops
        raise AdapterError(f"adapter {name!r}: cannot resolve folder {folder} ({e})") from e
    limits.check_inside(name, folder, real)
    if not real.is_dir():
        raise AdapterError(f"adapter {name!r}: folder {folder} does not exist")
    cfg = _read_config(name, folder, limits)
    try:  # before the weights: a refused pattern costs no weights read
        rules = module_rules(cfg, module_names(model_args.num_layers))
    except PatternError as e:
        raise AdapterError(f"adapter {name!r}: {e}") from e
    r, alpha = cfg["r"], cfg.get("lora_alpha", cfg["r"])
    top = max([r, *rules.rank.values()])
    if limits.max_rank is not None and top > limits.max_rank:  # stacking allocates layers x rank
        raise AdapterError(f"adapter {name!r}: rank {top} is larger than the largest rank bucket "
                           f"{limits.max_rank} (adapters.rank_buckets)")
    pairs = _collect_pairs(name, cfg, rules, _read_tensors(name, folder, limits), model_args)
    use_rslora = bool(cfg.get("use_rslora", False))

    def scaling(rank, alph):
        return alph / math.sqrt(rank) if use_rslora else alph / rank

    base_scale = scaling(r, alpha)
    ranks: dict[str, int] = {}
    per_layer: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for (layer, module), ab in sorted(pairs.items()):
        key = f"model.layers.{layer}.{_PARENT[module]}.{module}"
        want_r = rules.rank.get(key, r)
        a, b = _checked_pair(name, cfg, key, layer, module, ab, want_r, model_args)
        if ranks.setdefault(module, want_r) != want_r:
            raise AdapterError(f"adapter {name!r}: {module} has different ranks in different layers")
        ratio = scaling(want_r, rules.alpha.get(key, alpha)) / base_scale
        bt = b.t().float()
        per_layer.setdefault(module, {})[layer] = (a.t().float(), bt * ratio if ratio != 1.0 else bt)
    out_a, out_b = {}, {}
    for module, layers in per_layer.items():  # stacked per module, zeros in untouched layers
        fan_in, fan_out = model_args.module_shape(module)
        out_a[module] = torch.zeros(model_args.num_layers, fan_in, ranks[module])
        out_b[module] = torch.zeros(model_args.num_layers, ranks[module], fan_out)
        for layer, (a, b) in layers.items():
            out_a[module][layer] = a
            out_b[module][layer] = b
    return LoraWeights(name, str(folder), max(ranks.values()), base_scale, out_a, out_b)


def _collect_pairs(name: str, cfg: dict, rules: ModuleRules, tensors: dict,
                   model_args) -> dict[tuple[int, str], dict]:
    """(layer, module) -> {"A": tensor, "B": tensor} for the targeted modules; refuses keys of
    unsupported kinds (embedding/lm_head LoRA, DoRA) and modules or layers the model lacks."""
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if "lora_embedding" in key or "embed_tokens" in key:
            raise AdapterError(f"adapter {name!r}: embedding LoRA ({key}) is not supported")
        if "lm_head" in key:
            raise AdapterError(f"adapter {name!r}: LoRA on lm_head ({key}) is not supported")
        if "magnitude_vector" in key:
            raise AdapterError(f"adapter {name!r}: DoRA weights ({key}) are not supported")
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"adapter {name!r}: unexpected tensor {key!r}")
        layer, parent, module, ab = int(m[1]), m[2], m[3], m[4]
        if module not in TARGETS or _PARENT[module] != parent:
            raise AdapterError(f"adapter {name!r}: target module {parent}.{module} does not exist in the model")
        if layer >= model_args.num_layers:
            raise AdapterError(
                f"adapter {name!r}: tensor {key!r} is for layer {layer}, the model has {model_args.num_layers}"
            )
        if rules.targets is not None and f"model.layers.{layer}.{parent}.{module}" not in rules.targets:
            log.warning("adapter %r: ignoring %s, its module is not in target_modules (as PEFT does)", name, key)
            continue
        pairs.setdefault((layer, module), {})[ab] = t
    if not pairs:
        if isinstance(cfg.get("target_modules"), str):
            raise AdapterError(
                f"adapter {name!r}: target_modules regex {cfg['target_modules']!r} matches no module of the model"
            )
        raise AdapterError(f"adapter {name!r}: the checkpoint holds no LoRA tensors")
    return pairs


def _checked_pair(name: str, cfg: dict, key: str, layer: int, module: str, ab: dict, want_r: int,
                  model_args) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_A [r, in] and lora_B [out, r] of one module, after every check against the config
    and the base model."""
    if set(ab) != {"A", "B"}:
        raise AdapterError(f"adapter {name!r}: {key} has lora_{'B' if 'A' in ab else 'A'} missing")
    layers_ok = cfg.get("layers_to_transform")
    if isinstance(layers_ok, int):
        layers_ok = [layers_ok]
    if layers_ok is not None and layer not in layers_ok:
        raise AdapterError(f"adapter {name!r}: {key} is outside layers_to_transform={layers_ok}")
    a, b = ab["A"], ab["B"]
    fan_in, fan_out = model_args.module_shape(module)
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise AdapterError(f"adapter {name!r}: {key} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}")
    if a.shape[0] != want_r:
        raise AdapterError(f"adapter {name!r}: {key} has rank {a.shape[0]} but the config says r={want_r}")
    if a.shape[1] != fan_in or b.shape[0] != fan_out:
        raise AdapterError(
            f"adapter {name!r}: {key} shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit the "
            f"base model's {module} ({fan_in} -> {fan_out})"
        )
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise AdapterError(f"adapter {name!r}: {key} holds NaN or Inf values")
    return a, b
