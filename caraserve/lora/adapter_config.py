"""adapter_config.json: what a PEFT LoRA config may say, read and checked before any tensor.

Options that make PEFT compute something other than `y += scale * x A B` on the unchanged base
weights are refused, each naming itself: a variant of the layer (DoRA, KaSA, ...), an init that
rewrites the base weights when PEFT loads the adapter (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA), and
anything that is not a LoRA on q/k/v/o/gate/up/down. Where the config is silent, PEFT's defaults
hold (`lora_alpha` 8; `target_modules` the architecture's default, q_proj and v_proj).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from caraserve.lora.adapter_files import AdapterError, ReadLimits, open_file, read_capped
from caraserve.lora.module_patterns import MAX_PATTERN_KEYS, SPLIT_MODULES, PatternError, check_regex, key_regex

log = logging.getLogger(__name__)

TARGETS = SPLIT_MODULES  # the projections the device pool holds LoRA for
# PEFT configs are a few KB (a few hundred with a key per module); parsing a huge JSON would
# take far more memory than the file, so the config has a cap of its own below max_file_bytes.
MAX_CONFIG_BYTES = 16 * 2**20
# LoraConfig's default lora_alpha (a config that omits it is scaled 8 / r, as PEFT loads it)
PEFT_DEFAULT_ALPHA = 8
# PEFT's target_modules for Llama, Mistral, Qwen2, Qwen3 and Gemma when a config gives none (PEFT
# saves them in every config it writes; it has no default for Phi-3, refused below, or Granite)
PEFT_DEFAULT_TARGETS = ["q_proj", "v_proj"]
# init_lora_weights values whose adapters run as plain LoRA on the base weights; the others
# ("pissa...", "olora", "corda", "loftq", "lora_ga") rewrite the base weights at load
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")
# config fields that turn on something other than a plain LoRA: field -> what it is
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "lora_bias": "a bias on lora_B",
    "use_qalora": "QALoRA",
    "use_bdlora": "block-diagonal LoRA",
    "kasa_config": "KaSA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow routing",
    "alora_invocation_tokens": "activated LoRA",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable tokens",
    "target_parameters": "LoRA on parameters, such as a mixture-of-experts model's experts",
}


def read_adapter_config(name: str, folder: Path, limits: ReadLimits, modules: tuple[str, ...] = TARGETS,
                        defaults: tuple[str, ...] | None = None) -> dict:
    """The folder's adapter_config.json, checked; `lora_alpha` and `target_modules` filled in
    with PEFT's defaults where the file leaves them out. `modules`: the projections the base
    model's checkpoint names (ModelArgs.adapter_modules), which target_modules names; `defaults`:
    PEFT's target_modules for that model where they are not q_proj and v_proj (Phi's)."""
    path = folder / "adapter_config.json"
    cap = min(MAX_CONFIG_BYTES, limits.max_file_bytes or MAX_CONFIG_BYTES)
    opened = open_file(name, path, limits, cap)
    if opened is None:
        raise AdapterError(f"adapter {name!r}: {path} is missing")
    data = read_capped(name, path, opened[0], cap)
    if len(data) > cap:  # it grew after the check
        raise AdapterError(f"adapter {name!r}: {path} is more than {cap} bytes")
    try:
        cfg = json.loads(data)
    except ValueError as e:
        raise AdapterError(f"adapter {name!r}: {path} is not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise AdapterError(f"adapter {name!r}: {path} must hold a JSON object")
    _check_kind(name, cfg)
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise AdapterError(f"adapter {name!r}: r={r!r} must be a positive integer")
    alpha = cfg.setdefault("lora_alpha", PEFT_DEFAULT_ALPHA)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise AdapterError(f"adapter {name!r}: lora_alpha={alpha!r} must be a number")
    if cfg.get("target_modules") is None and defaults is not None:  # the model's own (ModelArgs.peft_default_targets)
        cfg["target_modules"] = list(defaults)
    elif cfg.get("target_modules") is None:
        if modules != TARGETS:  # PEFT has defaults for models with split projections only
            raise AdapterError(f"adapter {name!r}: target_modules is not set, and PEFT has no default for this "
                               f"model; name some of {', '.join(modules)}")
        cfg["target_modules"] = PEFT_DEFAULT_TARGETS
    elif cfg["target_modules"] == "all-linear":  # PEFT's word for every linear layer but the output one
        cfg["target_modules"] = list(modules)
    _check_targets(name, cfg, modules)
    layers = cfg.get("layers_to_transform")
    if layers is not None and not (
        (isinstance(layers, int) and not isinstance(layers, bool))
        or (isinstance(layers, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in layers))
    ):
        raise AdapterError(f"adapter {name!r}: layers_to_transform={layers!r} must be an int or a list of ints")
    _check_patterns(name, cfg)
    if cfg.get("fan_in_fan_out"):
        # PEFT turns it off for nn.Linear targets, which is all a Llama has.
        log.warning("adapter %r: fan_in_fan_out=true ignored for Linear layers (as PEFT does)", name)
    return cfg


def _check_kind(name: str, cfg: dict) -> None:
    """Refuses what is not a plain LoRA of the base weights, naming the option."""
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type {peft_type} is not supported (only LORA)")
    for field, what in _UNSUPPORTED.items():
        if cfg.get(field):
            raise AdapterError(f"adapter {name!r}: {field}={_show(cfg[field])} ({what}) is not supported")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"adapter {name!r}: modules_to_save={cfg['modules_to_save']} is not supported")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"adapter {name!r}: bias={cfg['bias']!r} is not supported (only 'none')")
    init = cfg.get("init_lora_weights", True)
    if not any(init is v if isinstance(v, bool) else init == v for v in _PLAIN_INITS):
        raise AdapterError(
            f"adapter {name!r}: init_lora_weights={_show(init)} is not supported: PEFT rewrites the base "
            "model's weights when it loads such an adapter (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA); save it "
            "converted to a plain LoRA (PEFT's path_initial_model_for_weight_conversion)")


def _check_targets(name: str, cfg: dict, modules: tuple[str, ...]) -> None:
    targets = cfg["target_modules"]
    if isinstance(targets, list):
        for t in targets:
            if not isinstance(t, str):
                raise AdapterError(f"adapter {name!r}: target_modules entries must be strings, got {t!r}")
            if t in ("embed_tokens", "lm_head"):
                raise AdapterError(f"adapter {name!r}: LoRA on {t} is not supported")
        # As PEFT: names the model lacks are ignored beside ones it has (a config shared across models)
        missing = [t for t in targets if t.split(".")[-1] not in modules]
        if missing and len(missing) == len(targets):
            raise AdapterError(f"adapter {name!r}: target module {missing[0]!r} does not exist in the model")
        if missing:
            log.warning("adapter %r: target_modules %s are not in the model: ignored, as PEFT does", name, missing)
    elif isinstance(targets, str):
        _check_regex(name, "target_modules regex", targets, targets)
    else:
        raise AdapterError(f"adapter {name!r}: target_modules must be a list of names or a regex string")
    exclude = cfg.get("exclude_modules")
    if isinstance(exclude, list):
        if not all(isinstance(t, str) for t in exclude):
            raise AdapterError(f"adapter {name!r}: exclude_modules entries must be strings, got {exclude!r}")
    elif isinstance(exclude, str):
        _check_regex(name, "exclude_modules regex", exclude, exclude)
    elif exclude is not None:
        raise AdapterError(f"adapter {name!r}: exclude_modules must be a list of names or a regex string")


def _check_patterns(name: str, cfg: dict) -> None:
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


def _check_regex(name: str, what: str, pattern: str, regex: str) -> None:
    try:
        check_regex(what, pattern, regex)
    except PatternError as e:
        raise AdapterError(f"adapter {name!r}: {e}") from e


def _show(value) -> str:
    """A config value as the JSON file spells it (true, not True), cut short."""
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."
