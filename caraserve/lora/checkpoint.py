"""Reads LoRA adapters saved by PEFT and validates them against the base model.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors` (or `.bin`).
Everything is checked before the weights are returned, so a broken adapter never reaches the
host store or the device: each problem raises `AdapterError` naming the adapter and the reason.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$"
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


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


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise AdapterError(
            f"adapter name {name!r} is not a plain name (letters, digits, '.', '_', '-'; no path separators or '..')"
        )
    return name


def _pattern_value(patterns: dict, module_name: str, default):
    """PEFT's rule: the first pattern key that matches the end of the module's full name wins."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _read_config(name: str, folder: Path) -> dict:
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise AdapterError(f"adapter {name!r}: {path} is missing")
    try:
        cfg = json.loads(path.read_text())
    except (ValueError, OSError) as e:
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
        try:
            re.compile(targets)
        except re.error as e:
            raise AdapterError(f"adapter {name!r}: target_modules regex {targets!r} is invalid ({e})") from e
    elif targets is not None:
        raise AdapterError(f"adapter {name!r}: target_modules must be a list of names or a regex string")
    layers = cfg.get("layers_to_transform")
    if layers is not None and not (
        (isinstance(layers, int) and not isinstance(layers, bool))
        or (isinstance(layers, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in layers))
    ):
        raise AdapterError(f"adapter {name!r}: layers_to_transform={layers!r} must be an int or a list of ints")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = cfg.get(key) or {}
        if not isinstance(pattern, dict):
            raise AdapterError(f"adapter {name!r}: {key} must be an object of pattern -> value")
        for k, v in pattern.items():
            try:
                re.compile(k)
            except re.error as e:
                raise AdapterError(f"adapter {name!r}: {key} key {k!r} is not a valid regex ({e})") from e
            wrong_type = not isinstance(v, int) if key == "rank_pattern" else not isinstance(v, (int, float))
            if wrong_type or isinstance(v, bool) or v <= 0:
                raise AdapterError(f"adapter {name!r}: {key}[{k!r}]={v!r} must be a positive number")
    if cfg.get("fan_in_fan_out"):
        # PEFT turns it off for nn.Linear targets, which is all a Llama has.
        log.warning("adapter %r: fan_in_fan_out=true ignored for Linear layers (as PEFT does)", name)
    return cfg


def _read_tensors(name: str, folder: Path) -> dict[str, torch.Tensor]:
    st, binf = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
    try:
        if st.is_file():
            from safetensors.torch import load_file

            return load_file(str(st))
        if binf.is_file():
            return torch.load(str(binf), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or corrupt files raise library-specific errors
        bad = st if st.is_file() else binf
        raise AdapterError(f"adapter {name!r}: cannot read {bad} ({e})") from e
    raise AdapterError(f"adapter {name!r}: no adapter_model.safetensors or adapter_model.bin in {folder}")


def _is_target(cfg: dict, module_key: str) -> bool:
    """PEFT's rule for which modules get LoRA layers (tensors of other modules are ignored)."""
    targets = cfg.get("target_modules")
    if targets is None:
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, module_key) is not None
    return any(module_key == t or module_key.endswith("." + t) for t in targets)


def load_adapter(folder: str | Path, model_args, name: str | None = None) -> LoraWeights:
    """Reads and validates the PEFT adapter in `folder` for a base model with `model_args`."""
    folder = Path(folder)
    name = check_name(folder.name if name is None else name)
    if not folder.is_dir():
        raise AdapterError(f"adapter {name!r}: folder {folder} does not exist")
    cfg = _read_config(name, folder)
    pairs = _collect_pairs(name, cfg, _read_tensors(name, folder), model_args)
    use_rslora = bool(cfg.get("use_rslora", False))
    r, alpha = cfg["r"], cfg.get("lora_alpha", cfg["r"])

    def scaling(rank, alph):
        return alph / math.sqrt(rank) if use_rslora else alph / rank

    base_scale = scaling(r, alpha)
    ranks: dict[str, int] = {}
    per_layer: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for (layer, module), ab in sorted(pairs.items()):
        key = f"model.layers.{layer}.{_PARENT[module]}.{module}"
        want_r = _pattern_value(cfg.get("rank_pattern"), key, r)
        a, b = _checked_pair(name, cfg, key, layer, module, ab, want_r, model_args)
        if ranks.setdefault(module, want_r) != want_r:
            raise AdapterError(f"adapter {name!r}: {module} has different ranks in different layers")
        ratio = scaling(want_r, _pattern_value(cfg.get("alpha_pattern"), key, alpha)) / base_scale
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


def _collect_pairs(name: str, cfg: dict, tensors: dict, model_args) -> dict[tuple[int, str], dict]:
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
        if not _is_target(cfg, f"model.layers.{layer}.{parent}.{module}"):
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
