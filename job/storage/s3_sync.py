"""Parallel directory transfers for S3: push a directory with its manifest, pull a prefix with skips.

Both go through one s3transfer manager per call, so files and their multipart parts share
`storage.max_concurrency` threads. A push hashes each file (sha256 for the manifest, MD5 for
the expected ETag) while it uploads, verifies what the store holds, then commits the manifest.
A pull remembers each file's size and ETag in a small record inside its destination, so a
restarted container with the same scratch volume does not download unchanged files again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import structlog
from s3transfer.subscribers import BaseSubscriber
from s3transfer.utils import ChunksizeAdjuster

from job.errors import JobError
from job.storage.base import AlreadyCommitted, ObjectInfo, commit_manifest, join_key, plan_pull, safe_relative_path
from job.storage.manifest import MANIFEST_NAME, FileEntry, Manifest
from job.storage.progress import Progress
from job.storage.s3_client import translate_errors

log = structlog.get_logger(__name__)


class S3Prefix(Protocol):
    """What a transfer needs of the store: `S3Store` provides it (this module never imports that one)."""

    bucket: str
    settings: Any
    connection: Any

    def full_key(self, key: str) -> str: ...
    def uri_of(self, key: str) -> str: ...
    def is_committed(self, prefix: str) -> bool: ...
    def transfer_manager(self) -> Any: ...


PULL_RECORD = ".sft-pull.json"
_RECORD_SAVE_SECONDS = 2.0
_BLOCK = 8 * 1024 * 1024
_SSE_WITHOUT_MD5_ETAG = {"aws:kms", "aws:kms:dsse"}


class ProgressSubscriber(BaseSubscriber):
    """Feeds s3transfer's callbacks into our progress, and tells it what we already know of an object."""

    def __init__(
        self,
        progress: Progress,
        size: int | None = None,
        etag: str | None = None,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        self._progress, self._size, self._etag, self._on_done = progress, size, etag, on_done

    def on_queued(self, future: Any, **kwargs: Any) -> None:
        if self._size is not None:
            future.meta.provide_transfer_size(self._size)
        if self._etag is not None:
            future.meta.provide_object_etag(f'"{self._etag}"')  # no HEAD; GETs use IfMatch: the listed version or 412

    def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
        self._progress.add(bytes_transferred)

    def on_done(self, future: Any, **kwargs: Any) -> None:
        if self._on_done is not None:
            try:
                future.result()
            except BaseException:  # the caller sees the error through its own result() call
                return
            self._on_done()


class Digest:
    """sha256 of a file (for the manifest) and the ETag S3 gives it (MD5, or MD5 of part MD5s plus
    "-N" for a multipart upload, with s3transfer's part size), fed with the bytes in order."""

    def __init__(self, size: int, threshold: int, chunksize: int) -> None:
        self.size, self.count = size, 0
        self.multipart = size >= threshold
        self.part_size = ChunksizeAdjuster().adjust_chunksize(chunksize, size) if self.multipart else 0
        self._sha, self._md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
        self._parts: list[bytes] = []
        self._in_part = 0

    def update(self, data: bytes) -> None:
        self.count += len(data)
        self._sha.update(data)
        view = memoryview(data)
        while view.nbytes:
            take = view.nbytes if not self.multipart else min(view.nbytes, self.part_size - self._in_part)
            self._md5.update(view[:take])
            view = view[take:]
            self._in_part += take
            if self.multipart and self._in_part == self.part_size:
                self._parts.append(self._md5.digest())
                self._md5, self._in_part = hashlib.md5(usedforsecurity=False), 0

    def result(self) -> tuple[int, str, str]:
        """(size, sha256, ETag)."""
        if not self.multipart:
            return self.count, self._sha.hexdigest(), self._md5.hexdigest()
        parts = self._parts + ([self._md5.digest()] if self._in_part or not self._parts else [])
        return (
            self.count,
            self._sha.hexdigest(),
            f"{hashlib.md5(b''.join(parts), usedforsecurity=False).hexdigest()}-{len(parts)}",
        )


def hash_file(path: Path, threshold: int, chunksize: int) -> tuple[int, str, str]:
    """(size, sha256, the ETag S3 computes) in one read."""
    digest = Digest(path.stat().st_size, threshold, chunksize)
    with path.open("rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.result()


class HashingReader:
    """The file as s3transfer reads it, hashed on the way: each byte is read from disk once.

    s3transfer reads a multipart upload's parts in order; any other pattern (a retried single
    PUT reading its body again) marks the digest unusable, and the file is hashed separately."""

    def __init__(self, path: Path, threshold: int, chunksize: int) -> None:
        self.path, self._sizes = path, (threshold, chunksize)
        self._file = path.open("rb")
        self.digest = Digest(path.stat().st_size, threshold, chunksize)
        self._position = 0
        self.in_order = True

    def read(self, amount: int = -1) -> bytes:
        data = self._file.read(amount)
        if self._position != self.digest.count:
            self.in_order = False
        elif self.in_order:
            self.digest.update(data)
        self._position += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        self._position = self._file.seek(offset, whence)
        return self._position

    def tell(self) -> int:
        return self._position

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> HashingReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def result(self) -> tuple[int, str, str]:
        if self.in_order and self.digest.count == self.digest.size:
            return self.digest.result()
        return hash_file(self.path, *self._sizes)


def push_directory(store: S3Prefix, source: Path, prefix: str, meta: dict | None, *, commit: bool = True) -> Manifest:
    uri = store.uri_of(prefix)
    if store.is_committed(prefix):
        raise AlreadyCommitted(f"{uri} is already committed; it is never overwritten")
    files = sorted(p for p in source.rglob("*") if p.is_file() and p.relative_to(source).as_posix() != MANIFEST_NAME)
    names = [p.relative_to(source).as_posix() for p in files]
    transfer = store.connection.transfer
    total = sum(p.stat().st_size for p in files)
    readers = [HashingReader(path, transfer.multipart_threshold, transfer.multipart_chunksize) for path in files]
    try:
        with Progress("push", uri, total, store.settings.progress_interval_seconds, files=len(files)) as progress:
            with translate_errors(uri, store.connection), store.transfer_manager() as manager:
                uploads = [
                    manager.upload(
                        reader,
                        store.bucket,
                        store.full_key(join_key(prefix, name)),
                        None,
                        [ProgressSubscriber(progress, reader.digest.size)],
                    )
                    for reader, name in zip(readers, names, strict=True)
                ]
                for name, upload in zip(names, uploads, strict=True):
                    with translate_errors(store.uri_of(join_key(prefix, name)), store.connection):  # name the object
                        upload.result()
            digests = [reader.result() for reader in readers]
    finally:
        for reader in readers:
            reader.close()
    problems = [
        problem
        for name, (size, _, etag) in zip(names, digests, strict=True)
        if (problem := _verify(store, join_key(prefix, name), size, etag))
    ]
    if problems:
        raise JobError(f"upload to {uri} did not verify: {'; '.join(problems[:5])}", hint="no manifest was written")
    manifest = Manifest(
        files=[FileEntry(name, size, sha) for name, (size, sha, _) in zip(names, digests, strict=True)],
        meta=dict(meta or {}),
    )
    if commit:
        commit_manifest(store, prefix, manifest)
        log.info("storage_committed", uri=uri, files=len(files), bytes=total)
    return manifest


def _verify(store: S3Prefix, key: str, size: int, etag: str) -> str | None:
    """What is wrong with the stored object (None when its size and, where meaningful, its ETag match)."""
    with translate_errors(store.uri_of(key), store.connection):
        head = store.connection.client.head_object(Bucket=store.bucket, Key=store.full_key(key))
    if head["ContentLength"] != size:
        return f"{key}: size {head['ContentLength']} != {size}"
    stored = str(head.get("ETag", "")).strip('"')
    md5_based = head.get("ServerSideEncryption") not in _SSE_WITHOUT_MD5_ETAG and not head.get("SSECustomerAlgorithm")
    if store.settings.verify_etag and md5_based and stored and stored != etag:
        return f"{key}: ETag {stored} != local {etag} (storage.verify_etag: false if the store's ETags are not MD5s)"
    return None


# ---------------------------------------------------------------- pull


class PullRecord:
    """What an earlier pull wrote into a destination: relative path -> size, ETag, local mtime.

    A file is skipped only when all three still match, so a file edited or truncated locally
    is downloaded again. Entries are relative paths inside the destination, checked like keys.
    """

    def __init__(self, path: Path, source: str) -> None:
        self.path, self.source = path, source
        self._lock = threading.Lock()
        self._saved = time.monotonic()
        self.files: dict[str, dict[str, Any]] = {}
        try:
            body = json.loads(path.read_text())
            if body.get("source") == source and isinstance(body.get("files"), dict):
                self.files = body["files"]
        except (OSError, ValueError, AttributeError):
            pass  # no record, or a damaged one: download everything

    def unchanged(self, relative: str, target: Path, info: ObjectInfo) -> bool:
        entry = self.files.get(relative)
        try:
            stat = target.stat()
        except OSError:
            return False
        return bool(
            entry
            and info.etag
            and entry.get("etag") == info.etag
            and entry.get("size") == info.size == stat.st_size
            and entry.get("mtime_ns") == stat.st_mtime_ns
        )

    def remember(self, relative: str, target: Path, info: ObjectInfo) -> None:
        with self._lock:
            self.files[relative] = {"size": info.size, "etag": info.etag, "mtime_ns": target.stat().st_mtime_ns}
            if time.monotonic() - self._saved >= _RECORD_SAVE_SECONDS:  # not once per file: O(files²)
                self._save()

    def forget_others(self, keep: set[str], destination: Path) -> None:
        """Delete files an earlier pull wrote that the source no longer has (a stale shard would be read),
        and the directories they leave empty (a new object may need that name)."""
        with self._lock:
            for relative in sorted(set(self.files) - keep):
                path = destination / safe_relative_path(relative)
                path.unlink(missing_ok=True)
                del self.files[relative]
                for parent in path.parents:
                    if parent == destination or not parent.is_relative_to(destination):
                        break
                    with contextlib.suppress(OSError):  # not empty: keep it and everything above
                        parent.rmdir()
            self._save()

    def save(self) -> None:
        with self._lock:
            self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f"{self.path.name}.partial-{os.getpid()}")
        temporary.write_text(json.dumps({"version": 1, "source": self.source, "files": self.files}, indent=1))
        os.replace(temporary, self.path)
        self._saved = time.monotonic()


def pull_objects(
    store: S3Prefix,
    objects: list[ObjectInfo],
    prefix: str,
    destination: Path,
    record_path: Path | None,
    uri: str | None = None,
) -> list[Path]:
    """Download `objects` (keys relative to `store`, under `prefix`) into `destination`, skipping unchanged ones.

    `uri` names the source in logs and errors (default: the prefix's URI)."""
    uri = uri or store.uri_of(prefix)
    plan = plan_pull(objects, prefix)  # every key checked before anything is written
    record = PullRecord(record_path or destination / PULL_RECORD, uri)
    record.forget_others({rel.as_posix() for _, rel in plan}, destination)
    todo = [(info, rel) for info, rel in plan if not record.unchanged(rel.as_posix(), destination / rel, info)]
    total = sum(info.size for info, _ in todo)
    with Progress("pull", uri, total, store.settings.progress_interval_seconds, files=len(plan)) as progress:
        pending = {id(info) for info, _ in todo}
        for info, _ in plan:
            if id(info) not in pending:
                progress.skip(info.size)
        try:
            with translate_errors(uri, store.connection), store.transfer_manager() as manager:
                downloads = []
                for info, relative in todo:
                    target = destination / relative
                    target.parent.mkdir(parents=True, exist_ok=True)
                    done = _remember(record, relative.as_posix(), target, info)
                    subscriber = ProgressSubscriber(progress, info.size, info.etag, done)
                    key = store.full_key(info.key)
                    downloads.append(manager.download(store.bucket, key, str(target), None, [subscriber]))
                for (info, _), download in zip(todo, downloads, strict=True):
                    with translate_errors(store.uri_of(info.key), store.connection):  # name the object
                        download.result()
        finally:
            record.save()  # what did arrive is not downloaded again
        for info, relative in todo:
            got = (destination / relative).stat().st_size
            if got != info.size:
                raise JobError(f"download of {store.uri_of(info.key)} is {got} bytes, expected {info.size}")
    return [destination / rel for _, rel in plan]


def _remember(record: PullRecord, relative: str, target: Path, info: ObjectInfo) -> Callable[[], None]:
    return lambda: record.remember(relative, target, info)
