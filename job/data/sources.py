"""Fetch every source of `data.train` (and `data.eval`) to a local path, whatever its kind.

A source is a local file or directory, an `s3://` object or prefix (pulled into scratch by
`job.storage.fetch_input`) or a Hub dataset `hf://datasets/OWNER/NAME[@REVISION][/PATTERN]`
(`job.data.hub`, pinned to a commit). Each keeps the name reports show: the path as given, with
any credentials masked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from job.config.schema import DataConfig, SourceConfig, StorageConfig
from job.data.hub import SYNTAX, fetch_hub_dataset, is_hub_uri, parse_hub_uri
from job.errors import ConfigError, InputNotFound
from job.logs import get_logger, redact_urls, shorten
from job.storage import fetch_input, is_remote

log = get_logger(__name__)

__all__ = ["FetchedSource", "fetch_source", "fetch_sources", "source_name"]

SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
HUB_ID_LIKE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[^/]+)?$")


@dataclass(frozen=True)
class FetchedSource:
    config: SourceConfig
    index: int
    """Position in `data.train` (0 for a single path)."""
    name: str
    """What reports, `validate --json` and the model card show: the path or URI as given, credentials masked."""
    root: Path
    """A local file or directory holding the source's data files."""
    revision: str | None
    """The Hub commit the source was read at; None for local and S3 sources."""


def source_name(path: str) -> str:
    return redact_urls(path)


def fetch_sources(
    data: DataConfig, scratch: Path, storage: StorageConfig, pins: dict[str, str] | None = None
) -> list[FetchedSource]:
    """Every training source, fetched in `data.train` order. `pins`: Hub commits an earlier start of the run
    read, by source path: a restart reads the same commit even when the branch has moved since."""
    return [
        fetch_source(source, index, scratch, storage, pin=(pins or {}).get(source.path))
        for index, source in enumerate(data.sources())
    ]


def fetch_source(
    source: SourceConfig, index: int, scratch: Path, storage: StorageConfig, *, pin: str | None = None
) -> FetchedSource:
    """One source to a local path (use `SourceConfig(data.eval, data.format)` for the eval data)."""
    path = source.path
    name = source_name(path)
    if is_hub_uri(path):
        uri = parse_hub_uri(path)
        pinned = str(replace(uri, revision=pin)) if pin and pin != uri.revision else path
        if pinned != path:
            log.info("hub_source_pinned", source=name, commit=pin, reason="the commit an earlier start read")
        fetched = fetch_hub_dataset(pinned, scratch)
        return FetchedSource(source, index, name, fetched.root, fetched.commit)
    scheme = SCHEME.match(path)
    if scheme and not is_remote(path) and scheme.group(1).lower() != "file":
        raise ConfigError(
            f"data source {shorten(name)!r}: {scheme.group(1)}:// is not supported",
            hint=f"use a local path, s3://bucket/prefix or {SYNTAX}",
        )
    try:
        root = fetch_input(path, scratch, storage)
    except InputNotFound as exc:
        if not is_remote(path) and HUB_ID_LIKE.match(path):
            # `OWNER/NAME` is how the Hub names datasets; say how to ask for one instead of "check the path".
            raise InputNotFound(
                f"data source {shorten(name)!r} is not a local file or directory",
                hint=f"for a Hub dataset write hf://datasets/{path}",
            ) from None
        raise exc
    return FetchedSource(source, index, name, root, None)
