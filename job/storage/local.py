"""Local-directory store: the embedded default, and plain paths or `file://` URIs."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from job.errors import InputNotFound
from job.storage.base import (
    AlreadyExists,
    ETagMismatch,
    ObjectInfo,
    Store,
    copy_atomically,
    delete_order,
    safe_relative_path,
)


def content_etag(data: bytes) -> str:
    """Local files have no ETag; the MD5 of the content plays its role (as S3's does for simple uploads)."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


class LocalStore(Store):
    def __init__(self, root: Path | str) -> None:
        self.root = Path(str(root).removeprefix("file://")).absolute()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / safe_relative_path(key) if key else self.root

    def child(self, prefix: str) -> LocalStore:
        return LocalStore(self._path(prefix))

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        base = self._path(prefix.rstrip("/"))
        if base.is_file():
            return [ObjectInfo(prefix, base.stat().st_size)]
        if not base.is_dir():
            return []
        found = [
            ObjectInfo(path.relative_to(self.root).as_posix(), path.stat().st_size)
            for path in base.rglob("*")
            if path.is_file() and not _is_internal(path.name)
        ]
        return sorted(found, key=lambda info: info.key)

    def stat(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        return ObjectInfo(key, path.stat().st_size) if path.is_file() else None

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise InputNotFound(f"{path} does not exist")
        return path.read_bytes()

    def write_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Unique per write, not per process: two threads of one process may write the same key at once.
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial-{os.getpid()}")
        temporary.write_bytes(data)
        if not if_absent:
            os.replace(temporary, path)
            return content_etag(data)
        try:
            os.link(temporary, path)  # atomic create-if-absent
        except FileExistsError:
            raise AlreadyExists(f"{path} already exists") from None
        finally:
            temporary.unlink(missing_ok=True)
        return content_etag(data)

    def read_bytes_with_etag(self, key: str) -> tuple[bytes, str]:
        data = self.read_bytes(key)
        return data, content_etag(data)

    def write_bytes_if_match(self, key: str, data: bytes, etag: str) -> str:
        path = self._path(key)
        with _locked(path):
            current = path.read_bytes() if path.is_file() else None
            if current is None or content_etag(current) != etag.strip('"'):
                raise ETagMismatch(f"{path} changed since it was read (or is gone)")
            return self.write_bytes(key, data)

    def abort_incomplete_uploads(self, prefix: str = "") -> int:
        base = self._path(prefix)
        leftovers = [path for path in base.rglob("*.partial-*") if path.is_file()] if base.is_dir() else []
        for path in leftovers:
            path.unlink(missing_ok=True)
        return len(leftovers)

    def upload_file(self, source: Path, key: str) -> None:
        copy_atomically(source, self._path(key))

    def download_file(self, key: str, destination: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise InputNotFound(f"{source} does not exist")
        copy_atomically(source, destination)

    def delete(self, keys: list[str]) -> None:
        for batch in delete_order(keys):
            for key in batch:
                path = self._path(key)
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


def _is_internal(name: str) -> bool:
    """Temporary copies and lock files: ours, never objects."""
    return ".partial-" in name or (name.startswith(".") and name.endswith(".lock"))


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock beside `path`, so two processes' conditional replaces cannot interleave."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.with_name(f".{path.name}.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
