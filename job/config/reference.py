"""The config reference (`config --reference`, README): each field's docstring, default and variable.

Field docstrings are written under each field (litgpt style) and read here from the source, so
the documentation cannot drift from the code.
"""

from __future__ import annotations

import ast
import inspect
from functools import cache
from typing import Any

import yaml

from job.config.load import ENV_PREFIX
from job.config.schema import SECTION_TYPES, JobConfig


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field (litgpt style), read from the source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, [*body[1:], None], strict=True):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def env_var_name(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section.upper()}__{key.upper()}"


def reference_rows() -> list[tuple[str, str, str, str]]:
    """(key, default, environment variable, description) for every documented field."""
    rows = []
    defaults = JobConfig().to_dict()
    for section, cls in SECTION_TYPES.items():
        for name, doc in field_docs(cls).items():
            if name == "extra":
                continue
            default = defaults[section].get(name)
            rows.append((f"{section}.{name}", _yaml_scalar(default), env_var_name(section, name), doc))
    return rows


def _yaml_scalar(value: Any) -> str:
    return "null" if value is None else yaml.safe_dump(value, default_flow_style=True).replace("\n...", "").strip()
