"""Load the config: defaults < YAML file < `SFT_<SECTION>__<KEY>` variables < `--set`, then validate.

Every value is converted to its field's type (YAML 1.1 reads `1e-5` as a string) and every
unknown key is an error naming the closest valid one. `to_yaml`/`redacted` write it back out
with secret-looking values hidden.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from job.config.convert import coerce
from job.config.schema import ALIASES, OWNED_ELSEWHERE, SECTION_TYPES, JobConfig, TrainConfig
from job.errors import ConfigError

ENV_PREFIX = "SFT_"
CONFIG_ENV = "SFT_CONFIG"


def load_config(
    path: str | None = None,
    overrides: typing.Sequence[str] = (),
    environ: typing.Mapping[str, str] | None = None,
    read_text: typing.Callable[[str], str] | None = None,
) -> JobConfig:
    """Merge defaults < file < environment < overrides and validate the result.

    `read_text` fetches a config given as a URI (e.g. `s3://`); local paths are read directly.
    """
    environ = os.environ if environ is None else environ
    path = path or environ.get(CONFIG_ENV) or None
    layers: list[tuple[str, dict[str, Any]]] = []
    if path:
        layers.append((f"config file {path}", _read_file_layer(path, read_text)))
    layers.append(("environment", _env_layer(environ)))
    layers.append(("--set", _overrides_layer(overrides)))

    merged: dict[str, dict[str, Any]] = {name: {} for name in SECTION_TYPES}
    for origin, layer in layers:
        for section, values in layer.items():
            _check_section(section, origin)
            if not isinstance(values, dict):
                raise ConfigError(f"{origin}: section '{section}' must be a mapping, got {type(values).__name__}")
            for key, value in values.items():
                merged[section][_canonical_key(section, str(key), origin)] = value
    return build_config(merged)


def build_config(raw: dict[str, dict[str, Any]]) -> JobConfig:
    """Typed, validated JobConfig from a {section: {key: value}} dict."""
    sections = {}
    for section, cls in SECTION_TYPES.items():
        values = dict(raw.get(section) or {})
        if section == "train":
            values = _split_train_extra(values)
        hints = typing.get_type_hints(cls)
        kwargs = {key: coerce(value, hints[key], f"{section}.{key}") for key, value in values.items()}
        sections[section] = cls(**kwargs)
    config = JobConfig(**sections)
    if not config.data.train:
        raise ConfigError(
            "data.train is not set", hint="set data.train to a JSONL file or directory (or SFT_DATA__TRAIN)"
        )
    return config


def _read_file_layer(path: str, read_text: typing.Callable[[str], str] | None) -> dict[str, Any]:
    if "://" in path and not path.startswith("file://"):
        if read_text is None:
            raise ConfigError(f"cannot read config from {path}: no reader for that scheme")
        text = read_text(path)
    else:
        local = Path(path.removeprefix("file://"))
        if not local.is_file():
            raise ConfigError(f"config file {path} does not exist", hint="check --config / SFT_CONFIG")
        text = local.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of sections, got {type(data).__name__}")
    return data


def _env_layer(environ: typing.Mapping[str, str]) -> dict[str, dict[str, Any]]:
    layer: dict[str, dict[str, Any]] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].partition("__")
        _check_section(section.lower(), f"environment variable {name}")
        layer.setdefault(section.lower(), {})[key.lower()] = _parse_scalar(value)
    return layer


def _overrides_layer(overrides: typing.Sequence[str]) -> dict[str, dict[str, Any]]:
    layer: dict[str, dict[str, Any]] = {}
    for item in overrides:
        dotted, sep, value = item.partition("=")
        section, dot, key = dotted.strip().partition(".")
        if not sep or not dot or not key:
            raise ConfigError(f"--set {item!r} is not of the form section.key=value", hint="e.g. train.seed=1")
        _check_section(section, f"--set {item}")
        layer.setdefault(section, {})[key] = _parse_scalar(value)
    return layer


def _parse_scalar(text: str) -> Any:
    """Environment and --set values are YAML scalars (or flow lists/maps)."""
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        return text


def _check_section(section: str, origin: str) -> None:
    if section not in SECTION_TYPES:
        raise ConfigError(f"{origin}: unknown section '{section}'{_suggest(section, SECTION_TYPES)}")


def _canonical_key(section: str, key: str, origin: str) -> str:
    if section == "train":
        key = ALIASES.get(key, key)
        if key in OWNED_ELSEWHERE:
            raise ConfigError(f"{origin}: train.{key} is set by {OWNED_ELSEWHERE[key]}, not under train:")
        if key == "extra" or (key not in _field_names(TrainConfig) and key not in sft_config_fields()):
            valid = (_field_names(TrainConfig) - {"extra"}) | set(sft_config_fields())
            raise ConfigError(f"{origin}: unknown key 'train.{key}'{_suggest(key, valid)}")
        return key
    fields = _field_names(SECTION_TYPES[section])
    if key not in fields:
        raise ConfigError(f"{origin}: unknown key '{section}.{key}'{_suggest(key, fields)}")
    return key


def _split_train_extra(values: dict[str, Any]) -> dict[str, Any]:
    own = _field_names(TrainConfig)
    extra = {k: v for k, v in values.items() if k not in own}
    kept = {k: v for k, v in values.items() if k in own}
    kept["extra"] = {k: coerce(v, sft_config_fields()[k], f"train.{k}") for k, v in sorted(extra.items())}
    return kept


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


@cache
def sft_config_fields() -> dict[str, Any]:
    """SFTConfig field name -> type, resolved lazily (importing trl costs seconds)."""
    from trl import SFTConfig

    hints = typing.get_type_hints(SFTConfig)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(SFTConfig) if f.init}


def _suggest(word: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, sorted(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


SECRET_PATTERN = re.compile(r"(secret|token|password|credential|access_key|session_key)", re.IGNORECASE)


def redacted(data: Any) -> Any:
    """A copy safe to log: values under secret-looking keys are replaced."""
    if isinstance(data, dict):
        return {
            k: ("***" if SECRET_PATTERN.search(str(k)) and v not in (None, "") else redacted(v))
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [redacted(v) for v in data]
    return data


def to_yaml(config: JobConfig) -> str:
    return yaml.safe_dump(redacted(config.to_dict()), sort_keys=False, allow_unicode=True)
