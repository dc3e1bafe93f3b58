"""The checks every configuration goes through: values against their field's annotation, keys
against the known ones, errors that name the key as the command line spells it.

An int field takes an int or a whole float such as 8e9, never a bool or a string; a float field
takes an int too; lists become tuples; an unknown key suggests the closest known one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


class UnsupportedModelError(ConfigError):
    """The checkpoint's architecture or an option of it is not supported: a configuration error
    (model.path names a model this engine cannot run; an entry point says it in one line)."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def show(value: Any) -> str:
    """A value as it would be written in YAML or on the command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return repr(value)


def _join(where: str, name: Any) -> str:
    return f"{where}.{name}" if where else str(name)


def unknown_key(key: str, known: Iterable[str], where: str = "") -> str:
    """'unknown key engine.max_batchsize; did you mean engine.max_batch_size?'"""
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"unknown key {_join(where, key)}; did you mean {_join(where, close[0])}?"
    return f"unknown key {_join(where, key)}" + (f" (known: {', '.join(known)})" if known else "")


def check_keys(data: Mapping, known: Iterable[str], where: str = "") -> None:
    """Refuses keys of `data` not in `known`, suggesting the closest known key."""
    known = set(known)
    _check(set(map(str, data)) <= known,
           "; ".join(unknown_key(k, known, where) for k in sorted(set(map(str, data)) - known)))


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if tp is tuple or origin is tuple:
        return f"a list of {_plural(args[0])}" if args else "a list"
    if tp is dict or origin is dict:
        return f"a mapping of {_plural(args[1])}" if args else "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _plural(tp: Any) -> str:
    return {bool: "booleans", int: "integers", float: "numbers", str: "strings"}.get(tp, _describe(tp))


_REFUSED = object()


def _as_bool(value):
    return value if isinstance(value, bool) else _REFUSED


def _as_int(value):
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and float(value).is_integer():
        return int(value)
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        return _REFUSED
    return int(value)  # (a numpy integer too)


def _as_float(value):
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or math.isnan(value):
        return _REFUSED
    return float(value)


def _as_str(value):
    # An int is taken as its digits (an API key or a name may be all digits, and Hydra reads a
    # bare 12345 as an int); a float or a bool would not round-trip, so it is refused. A path
    # object (pathlib.Path) is its path.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value if isinstance(value, str) else _REFUSED


_SCALARS = {bool: _as_bool, int: _as_int, float: _as_float, str: _as_str}


def check_type(value: Any, tp: Any, key: str) -> Any:
    """`value` checked against the annotation `tp`, as it is to be stored: a whole float as an
    int (40e9 for an int of bytes), a list as a tuple, a nested mapping as its dataclass. Raises
    ConfigError naming `key`, the value and the expected type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        out = _check_union(value, args, key)
    elif dataclasses.is_dataclass(tp):
        out = value if isinstance(value, tp) else \
            dataclass_from_dict(tp, value, key) if isinstance(value, Mapping) else _REFUSED
    elif tp in _SCALARS:
        out = _SCALARS[tp](value)
    elif tp is tuple or origin is tuple:
        elem = args[0] if args else Any
        out = tuple(check_type(v, elem, f"{key}[{i}]") for i, v in enumerate(value)) \
            if isinstance(value, (list, tuple)) else _REFUSED
    elif tp is dict or origin is dict:
        out = _check_dict(value, args or (Any, Any), key)
    else:
        out = value
    if out is _REFUSED:
        raise ConfigError(f"{key}={show(value)} must be {_describe(tp)}")
    return out


def _check_union(value: Any, args: tuple, key: str) -> Any:
    """The first of the union's types `value` passes as (None where the union allows it)."""
    if value is None and type(None) in args:
        return None
    for a in args:
        if a is not type(None):
            try:
                return check_type(value, a, key)
            except ConfigError:
                pass
    return _REFUSED


def _check_dict(value: Any, kv_types: tuple, key: str) -> Any:
    if value is None:  # YAML null: conf/model/tiny.yaml writes an empty budget so, as Hydra
        # cannot override an empty mapping in place
        return {}
    if not isinstance(value, Mapping):
        return _REFUSED
    kt, vt = kv_types
    out = {}
    for k, v in value.items():
        try:
            k = check_type(k, kt, "")
        except ConfigError:
            raise ConfigError(f"{key}: the key {show(k)} must be {_describe(kt)}") from None
        out[k] = check_type(v, vt, _join(key, k))
    return out


def dataclass_from_dict(cls, data: Mapping[str, Any] | None, where: str):
    """cls(**data) with every value checked against its field's annotation (see check_type)."""
    if data is None:
        data = {}
    _check(isinstance(data, Mapping), f"{where}={show(data)} must be a mapping of keys")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    check_keys(data, names, where)
    return cls(**{name: check_type(value, hints[name], _join(where, name)) for name, value in data.items()})


def check_fields(obj, where: str) -> None:
    """Every field of the frozen dataclass `obj` checked against its annotation and stored as
    check_type converts it: a config built in Python (`EngineConfig(max_batch_size="8")`, a
    nested section given as a mapping) is checked as one read from YAML, naming the key."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        object.__setattr__(obj, f.name, check_type(getattr(obj, f.name), hints[f.name], _join(where, f.name)))


def inline_template(value: str) -> bool:
    """Whether server.chat_template is the template itself rather than a file's path (a long one
    is no file name: the system refuses it as one)."""
    return "{{" in value or "{%" in value


def _check_template(template: str) -> None:
    """server.chat_template (a file or the template itself) parses as Jinja, with the loop
    controls transformers' chat templates may use."""
    import jinja2

    try:
        text = template if inline_template(template) else Path(template).read_text()
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(text)
    except (OSError, UnicodeDecodeError, jinja2.TemplateSyntaxError) as e:
        raise ConfigError(f"server.chat_template: not a usable Jinja template ({type(e).__name__}: {e})") from None


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    _check(device == "cpu" or device.startswith("cuda"), f"engine.device={device!r} must be auto|cpu|cuda[:N]")
    if device.startswith("cuda"):
        _check(torch.cuda.is_available(), f"engine.device={device!r} but CUDA is not available")
    return device


def check_devices(max_memory_bytes: dict) -> None:
    """A placement budget (model.max_memory_bytes) may name only CUDA devices this machine has."""
    import torch

    for dev in max_memory_bytes:
        _check(dev == "cpu" or int(dev) < torch.cuda.device_count(), f"model.max_memory_bytes: CUDA device {dev} "
               f"does not exist (this machine has {torch.cuda.device_count()})")
