"""Where a run lives: one `Store` interface over local disk and S3-compatible object stores.

Manifests (sha256 of every file, written last) are the commit point of every durable prefix.
`open_store` picks the implementation from the URI; `fetch_input` turns an input URI (dataset
file or prefix, model directory) into a local path. No module outside this package imports boto3.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from job.config.schema import StorageConfig
from job.errors import InputNotFound
from job.storage.base import AlreadyCommitted, AlreadyExists, ETagMismatch, ObjectInfo, Store, join_key
from job.storage.local import LocalStore

__all__ = [
    "AlreadyCommitted",
    "AlreadyExists",
    "ETagMismatch",
    "LocalStore",
    "ObjectInfo",
    "Store",
    "fetch_input",
    "is_remote",
    "join_key",
    "open_store",
    "read_text",
]


def is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


def open_store(uri: str, settings: StorageConfig | None = None) -> Store:
    """The store rooted at `uri` (`s3://bucket/prefix`, `file://...` or a local path)."""
    if is_remote(uri):
        from job.storage.s3 import S3Store  # boto3 is imported only when S3 is used

        return S3Store(uri, settings or StorageConfig())
    if "://" in uri and not uri.startswith("file://"):
        from job.errors import ConfigError

        raise ConfigError(f"unsupported storage URI {uri!r}", hint="use s3://bucket/prefix or a local path")
    return LocalStore(uri)


def fetch_input(uri: str, scratch: Path, settings: StorageConfig | None = None) -> Path:
    """A local path holding `uri`: local inputs are used in place; remote ones are pulled into scratch.

    A remote URI names one object or a prefix of objects; the result is a file or a directory accordingly.
    """
    if not is_remote(uri):
        path = Path(uri.removeprefix("file://"))
        if not path.exists():
            raise InputNotFound(f"input {uri} does not exist", hint="check the path in the config")
        return path
    from job.storage.s3 import pull_uri

    destination = scratch / "inputs" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    return pull_uri(uri, destination, settings or StorageConfig())


def read_text(uri: str, settings: StorageConfig | None = None) -> str:
    """A small text object (e.g. a config file given as `s3://`)."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    return open_store(parent, settings).read_bytes(name).decode("utf-8")
