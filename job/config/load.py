"""Load the config: defaults < YAML file < `SFT_<SECTION>__<KEY>` variables < `--set`, then validate.

Every value is converted to its field's type (YAML 1.1 reads `1e-5` as a string) and every
unknown key is an error naming the closest valid one; an unknown `SFT_*` variable names itself and
the closest valid variable. YAML goes through `convert.load_yaml` (bounded: no alias bombs).
`to_yaml`/`redacted` write it back out with secret-looking values and URL credentials hidden.
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

from job.config.convert import MAX_YAML_BYTES, coerce, load_yaml
from job.config.schema import ALIASES, OWNED_ELSEWHERE, SECTION_TYPES, JobConfig, TrainConfig
from job.config.trackers import check_trackers
from job.errors import ConfigError
from job.logs import redact_urls, shorten

ENV_PREFIX = "SFT_"
CONFIG_ENV = "SFT_CONFIG"
NOT_CONFIG_ENV = frozenset(
    {
        CONFIG_ENV,
        "SFT_LOG_LEVEL",  # job.logs
        "SFT_LOG_FORMAT",  # job.cli
        "SFT_HEARTBEAT_SECONDS",  # job.logs.Heartbeat
        "SFT_FAULTS",  # job.durability.faults (tests)
        "SFT_RANK_OUTCOMES",  # job.dist: set by the launcher for its ranks
        "SFT_IMAGE",  # scripts/submit-run.sh, often exported in the same shell
        "SFT_NAMESPACE",
        "SFT_OVERLAY",
        "SFT_POLL_SECONDS",
    }
)
"""`SFT_*` variables that are not config values: every other one must be `SFT_<SECTION>__<KEY>`."""
# Kubernetes injects `<SERVICE>_SERVICE_HOST`, `<SERVICE>_PORT_80_TCP`... for every Service in the namespace
# (enableServiceLinks): a Service named `sft` or `sft-x` must not stop the job.
_SERVICE_LINK = re.compile(r"SFT(_[A-Z0-9_]+)?_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_\d+_(TCP|UDP|SCTP)\w*)?)")


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
    config = build_config(merged)
    config.mark_given(frozenset(f"{section}.{key}" for section, values in merged.items() for key in values))
    return config


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
        size = local.stat().st_size
        if size > MAX_YAML_BYTES:  # before reading it: a config is a few KB
            raise ConfigError(f"config file {path}: {size} bytes, more than the {MAX_YAML_BYTES} allowed")
        text = local.read_text(encoding="utf-8")
    try:
        data = load_yaml(text, f"config file {path}")
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {shorten(str(exc), 1000)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of sections, got {type(data).__name__}")
    return data


def _env_layer(environ: typing.Mapping[str, str]) -> dict[str, dict[str, Any]]:
    layer: dict[str, dict[str, Any]] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name in NOT_CONFIG_ENV or _SERVICE_LINK.fullmatch(name):
            continue
        origin = f"environment variable {name}"
        if "__" not in name:
            raise ConfigError(
                f"{origin} is not a config variable (SFT_<SECTION>__<KEY>){_suggest_variable(name)}",
                hint="unset it, or see `entrypoint.py config --reference` for every variable",
            )
        section, _, key = name[len(ENV_PREFIX) :].partition("__")
        section, key = section.lower(), key.lower()
        if section not in SECTION_TYPES:
            raise ConfigError(f"{origin}: unknown section '{section}'{_suggest_variable(name)}")
        try:
            _canonical_key(section, key, origin)
        except ConfigError as exc:
            if "unknown key" not in exc.message:
                raise
            raise ConfigError(f"{origin}: unknown key '{section}.{key}'{_suggest_variable(name)}") from None
        layer.setdefault(section, {})[key] = _parse_scalar(value, origin)
    return layer


def _suggest_variable(name: str) -> str:
    """The valid variable closest to `name`: `SFT_TRAIN__LEARNIG_RATE` -> `SFT_TRAIN__LEARNING_RATE`."""
    valid = set(NOT_CONFIG_ENV)
    for section, cls in SECTION_TYPES.items():
        keys = (_field_names(cls) - {"extra"}) | (set(sft_config_fields()) if section == "train" else set())
        valid |= {f"{ENV_PREFIX}{section.upper()}__{key.upper()}" for key in keys}
    close = difflib.get_close_matches(name.upper(), sorted(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _overrides_layer(overrides: typing.Sequence[str]) -> dict[str, dict[str, Any]]:
    layer: dict[str, dict[str, Any]] = {}
    for item in overrides:
        dotted, sep, value = item.partition("=")
        section, dot, key = dotted.strip().partition(".")
        if not sep or not dot or not key:
            raise ConfigError(
                f"--set {shorten(repr(item))} is not of the form section.key=value", hint="e.g. train.seed=1"
            )
        _check_section(section, f"--set {shorten(item)}")
        layer.setdefault(section, {})[key] = _parse_scalar(value, f"--set {section}.{key}")
    return layer


def _parse_scalar(text: str, origin: str) -> Any:
    """Environment and --set values are YAML scalars (or flow lists/maps), bounded like the file."""
    try:
        return load_yaml(text, origin) if text.strip() else None
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
    if "report_to" in kept["extra"]:
        check_trackers(kept["extra"]["report_to"])
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
    """A copy safe to log and to publish: values under secret-looking keys are replaced, and every string
    has the credentials of its URLs masked (`http://user:pass@host` -> `http://***@host`)."""
    if isinstance(data, dict):
        return {
            k: ("***" if SECRET_PATTERN.search(str(k)) and v not in (None, "") else redacted(v))
            for k, v in data.items()
        }
    if isinstance(data, (list, tuple)):
        return [redacted(v) for v in data]
    if isinstance(data, str):
        return redact_urls(data)
    return data


def to_yaml(config: JobConfig) -> str:
    """The config as YAML, redacted: what `config.resolved.yaml`, the model card and `config` show.

    Drift compares two of these, so a restart with the same credentials in a URL is not drift
    (nor is one with changed credentials: they are not what is trained)."""
    return yaml.safe_dump(redacted(config.to_dict()), sort_keys=False, allow_unicode=True)
