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
    values over the file's, a null dropping the file's, as vLLM's --override-generation-config).
    As vLLM reads them: the FIELDS set (GenerationConfig.to_diff_dict), max_new_tokens as
    max_tokens. ConfigError when the file cannot be read, an override is not one of FIELDS, or
    the file's or the overrides' values are not valid sampling parameters (naming which)."""
    found, source = _file_fields(model_path, setting)
    _check(found, f"{source}: its sampling defaults", "; model.generation_config=none serves without them")
    unknown = sorted(set(overrides or ()) - set(FIELDS))
    if unknown:
        raise ConfigError(f"model.override_generation_config: {unknown} are not sampling defaults (one of {FIELDS})")
    for k, v in (overrides or {}).items():
        if v is None:
            found.pop(k, None)
        else:
            found[k] = v
    if overrides:
        _check(found, "model.override_generation_config: the sampling defaults with it", "")
    defaults = _as_params(found)
    if defaults:
        log.warning("sampling defaults (of the model's generation config and model.override_generation_config: "
                    "what a request that does not set them gets): %s", defaults)
    return defaults


def _as_params(fields: dict) -> dict:
    """Generation-config FIELDS as SamplingParams fields: max_new_tokens as max_tokens, and top_k 0
    (transformers' "no top-k") as -1 (ours and vLLM's)."""
    out = dict(fields)
    if "max_new_tokens" in out:
        out["max_tokens"] = out.pop("max_new_tokens")
    if out.get("top_k") == 0:
        out["top_k"] = -1
    return out


def _check(fields: dict, what: str, hint: str) -> None:
    try:
        SamplingParams(**_as_params(fields))
    except (RequestError, TypeError) as e:
        raise ConfigError(f"{what} {fields} are not valid ({e}){hint}") from e


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

    # transformers warns (and logs) that values its own generate would ignore without do_sample
    # "may be ignored": here they are applied, and the start-up log says so
    quiet = logging.getLogger("transformers.generation.configuration_utils")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            diff = GenerationConfig.from_pretrained(str(folder)).to_diff_dict()
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"{file} cannot be read: {type(e).__name__}: {e}") from e
    finally:
        quiet.setLevel(level)
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
