"""Option values: coercion of what YAML, the command line and keywords give to each
field's type, and the checks of a single value against its field's declaration."""

from __future__ import annotations

import json
import math
import types
import typing
from pathlib import Path
from typing import Any

from edgezo.errors import ConfigError, read_user_text, read_yaml, unknown_choice

DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16",
                 "half": "fp16"}


def normalize_dtype(value: str | None) -> str | None:
    """fp32/bf16/fp16 from any common spelling (bfloat16, torch.float16, ...)."""
    if value is None:
        return None
    text = str(value).strip().lower().removeprefix("torch.")
    return DTYPE_ALIASES.get(text, text)


def _split(value: Any) -> list:
    if isinstance(value, str):
        return [t.strip() for t in value.split(",") if t.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ConfigError(f"expected a list or a comma-separated string, got {value!r}")


def coerce_value(name: str, value: Any, hint: Any) -> Any:
    """`value` as option `name`'s type `hint`: ints for int fields, floats from '1e-5'
    strings, lists from comma-separated strings, betas from 'b1,b2'; a wrong type is an
    error naming the option."""
    if value is None or callable(value):
        return value
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    kind = typing.get_origin(hint) or hint
    if kind in (typing.Union, types.UnionType):
        kind = typing.get_origin(args[0]) or args[0]
    if name == "dtype":
        return normalize_dtype(value)
    try:
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
                return value.lower() in ("true", "yes")
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if kind is tuple:  # betas
            items = [float(v) for v in _split(value)]
            if len(items) != 2:
                raise ValueError
            return tuple(items)
        if kind is list:
            return [str(v) for v in _split(value)]
        if kind is str:
            if not isinstance(value, (str, Path)):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        shown = "two numbers like 0.9,0.999" if kind is tuple else getattr(kind, "__name__",
                                                                           kind)
        raise ConfigError(f"option {name} takes {shown}, got {value!r}") from None
    return value


def yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def field_problems(name: str, value: Any, meta: dict) -> list[str]:
    """The choices and ranges a field's metadata declares, checked on its value."""
    if value is None:
        return []
    if meta["choices"] is not None and value not in meta["choices"]:
        return [str(unknown_choice(meta["kind"] or name.replace("_", " "), value,
                                   meta["choices"]))]
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if math.isnan(v) or math.isinf(v):
            return [f"{name} must be a finite number, got {v}"]
        if meta["min"] is not None and v < meta["min"]:
            return [f"{name} must be >= {meta['min']:g}, got {v}"]
        if meta["max"] is not None and v > meta["max"]:
            return [f"{name} must be <= {meta['max']:g}, got {v}"]
        if meta["above"] is not None and v <= meta["above"]:
            return [f"{name} must be > {meta['above']:g}, got {v}"]
        if meta["below"] is not None and v >= meta["below"]:
            return [f"{name} must be < {meta['below']:g}, got {v}"]
    return []


def read_config_file(path: Path) -> dict:
    """The mapping a recipe file holds: YAML (.yaml/.yml) or JSON (run.json)."""
    if path.suffix != ".json":
        return read_yaml(path, ConfigError) or {}
    try:
        return json.loads(read_user_text(path, ConfigError))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
