"""Convert config values (YAML scalars, environment strings) to their dataclass field's type.

YAML 1.1 reads `1e-5` as a string and environment variables are always strings, so every value
goes through here; one that cannot be converted is a ConfigError naming its key. Every YAML text
(the config file, flow values in variables and `--set`) is read by `load_yaml`, which refuses alias
bombs, deep nesting and oversized input before building anything.
"""

from __future__ import annotations

import math
import types
import typing
from enum import Enum
from typing import Any, Literal

import yaml

from job.errors import ConfigError
from job.logs import shorten

MAX_YAML_BYTES = 1024 * 1024
"""A config is a few KB; a larger text is a mistake (or an attack), refused before parsing."""
MAX_ALIAS_EXPANSION = 10_000
"""Nodes that aliases may add once expanded: a few shared mappings add dozens, a billion laughs 10^9."""
MAX_DEPTH = 32
"""Nesting of mappings and lists: the deepest real config (an fsdp_config) has 3 or 4 levels."""


class _AliasMarkingLoader(yaml.SafeLoader):
    """A SafeLoader that remembers where each alias is, so that a refusal can name the line."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.alias_marks: list[Any] = []

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.alias_marks.append(self.peek_event().start_mark)
        return super().compose_node(parent, index)


def load_yaml(text: str, origin: str) -> Any:
    """`yaml.safe_load(text)` with bounds: ConfigError naming `origin` (and the line) for input larger
    than MAX_YAML_BYTES, nesting deeper than MAX_DEPTH, or aliases whose expansion would add more than
    MAX_ALIAS_EXPANSION nodes (or refer to themselves). safe_load shares aliased objects cheaply; it is
    whoever walks the result later (deepcopy, dumps, drift) that would expand a bomb, so it is stopped here,
    on the composed node graph, before any Python object exists."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{origin}: {len(text)} characters of YAML, more than the {MAX_YAML_BYTES} allowed")
    loader = _AliasMarkingLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise ConfigError(f"{origin}: YAML nested deeper than {MAX_DEPTH} levels") from None
        if node is None:
            return None
        _check_graph(node, origin, loader.alias_marks)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_graph(root: Any, origin: str, alias_marks: list[Any]) -> None:
    distinct: dict[int, int] = {}  # id(node) -> nodes under it once aliases are expanded
    open_nodes: set[int] = set()
    where = f" (first alias at line {alias_marks[0].line + 1})" if alias_marks else ""

    def expanded(node: Any, depth: int) -> int:
        if id(node) in distinct:
            return distinct[id(node)]
        if depth > MAX_DEPTH:
            raise ConfigError(f"{origin}: line {node.start_mark.line + 1}: YAML nested deeper than {MAX_DEPTH} levels")
        if id(node) in open_nodes:
            raise ConfigError(f"{origin}: an alias refers to the mapping or list that contains it{where}")
        open_nodes.add(id(node))
        children: list[Any] = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [item for pair in node.value for item in pair]
        total = 1 + sum(expanded(child, depth + 1) for child in children)
        open_nodes.discard(id(node))
        distinct[id(node)] = total
        return total

    added = expanded(root, 0) - len(distinct)
    if added > MAX_ALIAS_EXPANSION:
        raise ConfigError(
            f"{origin}: YAML aliases would expand to {added} more nodes, more than the {MAX_ALIAS_EXPANSION} "
            f"allowed{where}",
            hint="repeat the values, or share fewer and smaller anchors",
        )


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert `value` to the type `hint`, or raise ConfigError naming `key`."""
    try:
        return _coerce(value, hint)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot use {shorten(repr(value))}: {shorten(str(exc))}") from None


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
            try:
                value = load_yaml(value, "YAML")
            except ConfigError as exc:
                raise ValueError(exc.message) from None
        if not isinstance(value, dict):
            raise ValueError("expected a mapping")
        return dict(value)
    return value


def _union_order(arg: Any) -> int:
    """Try strict types before `str`, which would accept anything."""
    if typing.get_origin(arg) is list or arg is list:
        return 6  # after `str`: a plain string is one value, not a list of one
    return {bool: 0, int: 1, float: 2}.get(arg, 5 if arg is str else 3)
