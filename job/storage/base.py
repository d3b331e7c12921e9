"""The storage interface every part of the job reads and writes through.

A `Store` is a root (a local directory or `s3://bucket/prefix`) with
'/'-separated keys below it. Implementations provide the primitive object
operations; this module builds the job's two transfer rules on top of them:

- a prefix is committed by its `MANIFEST.json`, written last; a committed
  prefix is never overwritten, and a prefix without one does not exist;
- keys are untrusted: a key never writes outside the destination directory.
"""

from __future__ import annotations

import os
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from job.errors import DataError, JobError
from job.manifest import MANIFEST_NAME, Manifest, build_manifest

MAX_NAME_BYTES = 255


class AlreadyCommitted(JobError):
    """A write to a prefix that already has a MANIFEST.json (a bug or a second writer)."""

    exit_code = 1


class AlreadyExists(JobError):
    """A conditional create found the key already present."""

    exit_code = 1


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    """Key relative to the store's root."""
    size: int
    etag: str | None = None
    """The store's entity tag (S3 ETag without quotes); None for local files."""


def join_key(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def safe_relative_path(key: str) -> PurePosixPath:
    """`key` as a relative path that cannot leave its destination, or DataError naming the key."""
    path = PurePosixPath(key)
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise DataError(f"refusing object key {key!r}: absolute or malformed", hint="rename the object")
    if any(part in ("..", ".", "") for part in key.split("/")):
        raise DataError(f"refusing object key {key!r}: it would escape the destination directory")
    if any(len(part.encode()) > MAX_NAME_BYTES for part in path.parts):
        raise DataError(f"refusing object key {key[:80]!r}...: a path segment exceeds {MAX_NAME_BYTES} bytes")
    return path


class Store(ABC):
    """A root URI with keys below it; see the module docstring for the rules."""

    uri: str

    # ---- primitives each implementation provides

    @abstractmethod
    def child(self, prefix: str) -> Store:
        """The store rooted at `prefix` below this one."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object under `prefix` (recursive), keys relative to this root, sorted."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo | None:
        """The object at `key`, or None."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """The object's content; InputNotFound when absent."""

    @abstractmethod
    def write_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        """Write atomically; with `if_absent`, raise AlreadyExists instead of replacing."""

    @abstractmethod
    def upload_file(self, source: Path, key: str) -> None:
        """Copy a local file to `key` (multipart and parallel where the store allows)."""

    @abstractmethod
    def download_file(self, key: str, destination: Path) -> None:
        """Copy `key` to a local file (written to a temporary name, then renamed)."""

    @abstractmethod
    def delete(self, keys: list[str]) -> None:
        """Delete objects; absent keys are not an error."""

    # ---- the job's rules, built on the primitives

    def exists(self, key: str) -> bool:
        return self.stat(key) is not None

    def is_committed(self, prefix: str = "") -> bool:
        return self.exists(join_key(prefix, MANIFEST_NAME))

    def read_manifest(self, prefix: str = "") -> Manifest | None:
        if not self.is_committed(prefix):
            return None
        return Manifest.from_json(self.read_bytes(join_key(prefix, MANIFEST_NAME)))

    def push_directory(self, source: Path, prefix: str, meta: dict | None = None) -> Manifest:
        """Upload every file under `source` to `prefix`, verify sizes, then commit the manifest."""
        if self.is_committed(prefix):
            raise AlreadyCommitted(f"{self.uri}/{prefix} is already committed; it is never overwritten")
        manifest = build_manifest(source, meta)
        for entry in manifest.files:
            self.upload_file(source / entry.name, join_key(prefix, entry.name))
        for entry in manifest.files:
            info = self.stat(join_key(prefix, entry.name))
            if info is None or info.size != entry.size:
                raise JobError(f"upload of {entry.name} to {self.uri}/{prefix} did not verify (size differs)")
        self.write_bytes(join_key(prefix, MANIFEST_NAME), manifest.to_json(), if_absent=True)
        return manifest

    def pull(self, destination: Path, prefix: str = "") -> list[Path]:
        """Download every object under `prefix` into `destination`, keeping relative paths."""
        paths = []
        for info in self.list(prefix):
            relative = info.key[len(prefix) :].lstrip("/") if prefix else info.key
            if info.key.endswith("/"):
                continue  # zero-byte "directory" markers made by consoles
            target = destination / safe_relative_path(relative)
            target.parent.mkdir(parents=True, exist_ok=True)
            self.download_file(info.key, target)
            paths.append(target)
        return paths


def copy_atomically(source: Path, destination: Path) -> None:
    """Copy through a temporary sibling so a reader never sees half a file."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(f".{destination.name}.partial-{os.getpid()}")
    shutil.copyfile(source, temporary)
    os.replace(temporary, destination)
