"""The sampling defaults a model's creator recommends in its generation_config.json, which a
request that does not set a parameter gets, as vLLM's server gives them (its
`--generation-config auto`, the default since vLLM 0.8; `model.generation_config` here)."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from caraserve.config_checks import ConfigError
from caraserve.request import RequestError, SamplingParams

log = logging.getLogger(__name__)

# The generation config's fields that are sampling defaults (max_new_tokens becomes a limit on
# every request's max_tokens, as in vLLM)
FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")


def sampling_defaults(model_path: str | os.PathLike, setting: str, overrides: dict | None = None) -> dict:
    """{SamplingParams field: value} of the generation config `setting` names: "auto" the model
    folder's generation_config.json (none there: no defaults), "none" no defaults, else a folder
    holding one; then `overrides` (model.override_generation_config: generation-config names and
    values, over the file's, as vLLM's --override-generation-config). As vLLM reads them: the
    FIELDS set (GenerationConfig.to_diff_dict), max_new_tokens as max_tokens. ConfigError when
    the file cannot be read, an override is not one of FIELDS, or the values are not valid
    sampling parameters."""
    found, source = _file_fields(model_path, setting)
    unknown = sorted(set(overrides or ()) - set(FIELDS))
    if unknown:
        raise ConfigError(f"model.override_generation_config: {unknown} are not sampling defaults (one of {FIELDS})")
    found.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if "max_new_tokens" in found:
        found["max_tokens"] = found.pop("max_new_tokens")
    if found.get("top_k") == 0:  # transformers' "no top-k" is 0; here (and in vLLM) -1
        found["top_k"] = -1
    try:
        SamplingParams(**found)
    except (RequestError, TypeError) as e:
        raise ConfigError(f"{source}: its sampling defaults {found} are not valid ({e}); "
                          "model.generation_config=none serves without the file's") from e
    if found:
        log.warning("sampling defaults of the model's generation config (what a request that does not set "
                    "them gets): %s; model.generation_config=none for the engine's own", found)
    return found


def _file_fields(model_path, setting: str) -> tuple[dict, str]:
    """(the FIELDS the generation config `setting` names sets, what they came from)."""
    if setting == "none":
        return {}, "model.override_generation_config"
    folder = Path(model_path) if setting == "auto" else Path(setting).expanduser()
    file = folder / "generation_config.json"
    if not file.is_file():
        if setting == "auto":
            return {}, "model.override_generation_config"
        raise ConfigError(f"model.generation_config={setting}: no generation_config.json in that folder")
    from transformers import GenerationConfig

    try:
        with warnings.catch_warnings():  # (transformers warns of values its own generate would ignore)
            warnings.simplefilter("ignore")
            diff = GenerationConfig.from_pretrained(str(folder)).to_diff_dict()
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"{file} cannot be read: {type(e).__name__}: {e}") from e
    return {k: diff[k] for k in FIELDS if diff.get(k) is not None}, str(file)


def with_defaults(values: dict, given, defaults: dict) -> dict:
    """`values` ({field: value} of a request) with each of `defaults` that the request did not
    give (`given`: the names it set). A default max_tokens (the file's max_new_tokens) caps the
    request's, or SamplingParams' default when it has none, as vLLM caps it; a RequestError when
    the cap leaves less than the request's min_tokens."""
    out = dict(values)
    for k, v in defaults.items():
        if k == "max_tokens":
            asked = out.get(k) if out.get(k) is not None else SamplingParams.max_tokens
            out[k] = min(asked, v)
            if out.get("min_tokens", 0) > out[k]:
                raise RequestError(f"min_tokens={out['min_tokens']} is more than max_tokens can be: the model's "
                                   f"generation_config.json caps it at {v} (max_new_tokens; the server's "
                                   "model.generation_config=none lifts the cap)")
        elif k not in given:
            out[k] = v
    return out
