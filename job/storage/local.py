"""Local-directory store: the embedded default, and plain paths or `file://` URIs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from job.errors import InputNotFound
from job.storage.base import AlreadyExists, ObjectInfo, Store, copy_atomically, safe_relative_path


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
            if path.is_file() and ".partial-" not in path.name
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

    def write_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.partial-{os.getpid()}")
        temporary.write_bytes(data)
        if not if_absent:
            os.replace(temporary, path)
            return
        try:
            os.link(temporary, path)  # atomic create-if-absent
        except FileExistsError:
            raise AlreadyExists(f"{path} already exists") from None
        finally:
            temporary.unlink(missing_ok=True)

    def upload_file(self, source: Path, key: str) -> None:
        copy_atomically(source, self._path(key))

    def download_file(self, key: str, destination: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise InputNotFound(f"{source} does not exist")
        copy_atomically(source, destination)

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            path = self._path(key)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
