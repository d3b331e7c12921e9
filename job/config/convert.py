"""Convert config values (YAML scalars, environment strings) to their dataclass field's type.

YAML 1.1 reads `1e-5` as a string and environment variables are always strings, so every value
goes through here; one that cannot be converted is a ConfigError naming its key.
"""

from __future__ import annotations

import math
import types
import typing
from enum import Enum
from typing import Any, Literal

import yaml

from job.errors import ConfigError


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert `value` to the type `hint`, or raise ConfigError naming `key`."""
    try:
        return _coerce(value, hint)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot use {value!r}: {exc}") from None


def _coerce(value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any or hint is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        is_null = value is None or (isinstance(value, str) and value.strip().lower() in ("", "null", "none"))
        if is_null and type(None) in args:
            return None
        errors = []
        for arg in sorted((a for a in args if a is not type(None)), key=_union_order):
            try:
                return _coerce(value, arg)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(errors) or "null is not allowed")
    if origin is Literal:
        text = value.value if isinstance(value, Enum) else value
        if text not in args:
            raise ValueError(f"expected one of {', '.join(map(str, args))}")
        return text
    if value is None:
        raise ValueError("a value is required (null given)")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.strip().lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError("expected true or false")
    if hint is int:
        if isinstance(value, bool):
            raise ValueError("expected an integer, got a boolean")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            number = float(value.strip().replace("_", ""))
            if number.is_integer():
                return int(number)
        raise ValueError("expected an integer")
    if hint is float:
        if isinstance(value, bool):
            raise ValueError("expected a number, got a boolean")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            number = float(value.strip().replace("_", ""))
            if not math.isfinite(number):
                raise ValueError("expected a finite number")
            return number
        raise ValueError("expected a number")
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ValueError("expected a string")
        return value.value if isinstance(value, Enum) else str(value)
    if isinstance(hint, type) and issubclass(hint, Enum):
        return hint(value.value if isinstance(value, Enum) else value).value
    if origin in (list, tuple) or hint in (list, tuple):
        items = value if isinstance(value, (list, tuple)) else [value]
        inner = args[0] if args else Any
        return [_coerce(item, inner) for item in items]
    if origin is dict or hint is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ValueError("expected a mapping")
        return dict(value)
    return value


def _union_order(arg: Any) -> int:
    """Try strict types before `str`, which would accept anything."""
    return {bool: 0, int: 1, float: 2}.get(arg, 5 if arg is str else 3)
