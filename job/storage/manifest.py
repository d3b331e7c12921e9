"""sha256 manifests: the commit point of every prefix the job writes.

A prefix without its `MANIFEST.json` does not exist for a reader. The manifest
lists every file's name, size and sha256, and is written last.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_NAME = "MANIFEST.json"
_CHUNK = 8 * 1024 * 1024


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class FileEntry:
    name: str
    """Path relative to the manifest's prefix, '/'-separated."""
    size: int
    sha256: str


@dataclass
class Manifest:
    files: list[FileEntry]
    created: float = field(default_factory=time.time)
    meta: dict[str, Any] = field(default_factory=dict)
    """Free-form facts about the prefix (e.g. the step of a checkpoint)."""

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files)

    def to_json(self) -> bytes:
        body = {
            "version": 1,
            "created": self.created,
            "total_bytes": self.total_bytes,
            "meta": self.meta,
            "files": [entry.__dict__ for entry in self.files],
        }
        return (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        body = json.loads(data)
        files = [FileEntry(str(f["name"]), int(f["size"]), str(f["sha256"])) for f in body["files"]]
        return cls(files=files, created=float(body.get("created", 0.0)), meta=dict(body.get("meta") or {}))


def build_manifest(directory: Path, meta: dict[str, Any] | None = None) -> Manifest:
    """Hash every regular file under `directory` (except an existing manifest), sorted by name."""
    entries = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = path.relative_to(directory).as_posix()
        if name == MANIFEST_NAME:
            continue
        entries.append(FileEntry(name, path.stat().st_size, sha256_file(path)))
    return Manifest(files=entries, meta=dict(meta or {}))


def verify_directory(directory: Path, manifest: Manifest) -> list[str]:
    """Problems found comparing `directory` with `manifest` (empty when it matches)."""
    problems = []
    for entry in manifest.files:
        path = directory / entry.name
        if not path.is_file():
            problems.append(f"{entry.name}: missing")
        elif path.stat().st_size != entry.size:
            problems.append(f"{entry.name}: size {path.stat().st_size} != {entry.size}")
        elif sha256_file(path) != entry.sha256:
            problems.append(f"{entry.name}: sha256 mismatch")
    return problems
