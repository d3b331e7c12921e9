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
from job.storage.manifest import MANIFEST_NAME, Manifest, build_manifest

MAX_NAME_BYTES = 255


class AlreadyCommitted(JobError):
    """A write to a prefix that already has a MANIFEST.json (a bug or a second writer)."""

    exit_code = 1


class AlreadyExists(JobError):
    """A conditional create found the key already present."""

    exit_code = 1


class ETagMismatch(JobError):
    """A conditional replace found the object changed (or gone) since its ETag was read."""

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
    def write_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> str | None:
        """Write atomically and return the new ETag; with `if_absent`, raise AlreadyExists instead of replacing."""

    def read_bytes_with_etag(self, key: str) -> tuple[bytes, str]:
        """The object's content and ETag (for a later `write_bytes_if_match`); InputNotFound when absent."""
        raise NotImplementedError

    def write_bytes_if_match(self, key: str, data: bytes, etag: str) -> str:
        """Replace `key` only if its ETag is still `etag`; return the new ETag, or raise ETagMismatch."""
        raise NotImplementedError

    def abort_incomplete_uploads(self, prefix: str = "") -> int:
        """Clean up what crashed uploads under `prefix` left behind; return how many were removed."""
        return 0

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

    def push_directory(self, source: Path, prefix: str, meta: dict | None = None, *, commit: bool = True) -> Manifest:
        """Upload every file under `source` to `prefix`, verify sizes, then commit the manifest.

        `commit=False` leaves the manifest to the caller (a checkpoint whose files come from several nodes)."""
        if self.is_committed(prefix):
            raise AlreadyCommitted(f"{self.uri}/{prefix} is already committed; it is never overwritten")
        manifest = build_manifest(source, meta)
        for entry in manifest.files:
            self.upload_file(source / entry.name, join_key(prefix, entry.name))
        for entry in manifest.files:
            info = self.stat(join_key(prefix, entry.name))
            if info is None or info.size != entry.size:
                raise JobError(f"upload of {entry.name} to {self.uri}/{prefix} did not verify (size differs)")
        if commit:
            commit_manifest(self, prefix, manifest)
        return manifest

    def pull(self, destination: Path, prefix: str = "") -> list[Path]:
        """Download every object under `prefix` into `destination`, keeping relative paths."""
        paths = []
        for info, relative in plan_pull(self.list(prefix), prefix):
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            self.download_file(info.key, target)
            paths.append(target)
        return paths


def commit_manifest(store: Store, prefix: str, manifest: Manifest) -> None:
    """Write the manifest, the commit point, only if no other writer committed first."""
    try:
        store.write_bytes(join_key(prefix, MANIFEST_NAME), manifest.to_json(), if_absent=True)
    except AlreadyExists:
        raise AlreadyCommitted(f"{store.uri}/{prefix} was committed by another writer meanwhile") from None


def plan_pull(objects: list[ObjectInfo], prefix: str) -> list[tuple[ObjectInfo, PurePosixPath]]:
    """Each object under `prefix` with its safe relative path, every key checked before anything is written.

    Zero-byte `dir/` markers (made by consoles) are skipped; a key that would escape the destination, or
    that needs a path both as a file and as a directory, stops the pull with a DataError naming it.
    """
    plan: list[tuple[ObjectInfo, PurePosixPath]] = []
    prefix = prefix.strip("/")
    for info in objects:
        relative = info.key[len(prefix) + 1 :] if prefix else info.key  # "p//x" keeps its "/": refused
        if info.key.endswith("/"):
            if info.size:
                raise DataError(f"refusing object key {info.key!r}: a non-empty object named like a directory")
            continue
        plan.append((info, safe_relative_path(relative)))
    files = {path: info.key for info, path in plan}
    for info, path in plan:
        for parent in path.parents:
            if parent in files:
                raise DataError(f"object keys {files[parent]!r} and {info.key!r} need {parent} as file and directory")
    return plan


def delete_order(keys: list[str]) -> list[list[str]]:
    """Manifests first, then the rest: a crash mid-delete never leaves a committed but incomplete prefix."""
    manifests = [key for key in keys if key.rsplit("/", 1)[-1] == MANIFEST_NAME]
    rest = [key for key in keys if key.rsplit("/", 1)[-1] != MANIFEST_NAME]
    return [batch for batch in (manifests, rest) if batch]


def copy_atomically(source: Path, destination: Path) -> None:
    """Copy through a temporary sibling so a reader never sees half a file."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(f".{destination.name}.partial-{os.getpid()}")
    shutil.copyfile(source, temporary)
    os.replace(temporary, destination)
