"""S3-compatible store (AWS S3, MinIO, Ceph RGW, R2, GCS interop): the only user of boto3.

Connection settings and error translation live in `s3_client`, directory transfers in
`s3_sync`; this module holds the object primitives of the `Store` interface, conditional
writes (commit markers with IfNoneMatch, the lease with IfMatch), crash clean-up, and
`pull_uri`, which turns an input URI (one object or a prefix) into a local path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog
from boto3.s3.transfer import create_transfer_manager
from botocore.exceptions import ClientError

from job.config.schema import StorageConfig
from job.errors import InputNotFound, JobError
from job.storage import s3_sync
from job.storage.base import (
    AlreadyExists,
    ETagMismatch,
    ObjectInfo,
    Store,
    delete_order,
    join_key,
    safe_relative_path,
)
from job.storage.manifest import Manifest
from job.storage.progress import Progress
from job.storage.s3_client import (
    Connection,
    connect,
    error_code,
    parse_s3_uri,
    raise_for_client_error,
    translate_errors,
)

log = structlog.get_logger(__name__)

_DELETE_BATCH = 1000  # DeleteObjects' limit per request
_CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict"}


class S3Store(Store):
    """`s3://bucket/prefix`, with keys relative to the prefix."""

    def __init__(self, uri: str, settings: StorageConfig | None = None, connection: Connection | None = None) -> None:
        self.bucket, self.root = parse_s3_uri(uri)
        self.settings = settings or StorageConfig()
        self.uri = f"s3://{self.bucket}/{self.root}" if self.root else f"s3://{self.bucket}"
        self.connection = connection or connect(self.settings)

    @property
    def client(self) -> Any:
        return self.connection.client

    def full_key(self, key: str) -> str:
        return join_key(self.root, key)

    def uri_of(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.full_key(key)}" if self.full_key(key) else f"s3://{self.bucket}"

    def _relative(self, full_key: str) -> str:
        return full_key[len(self.root) + 1 :] if self.root else full_key

    @contextmanager
    def transfer_manager(self) -> Iterator[Any]:
        """One s3transfer manager per operation; leaving with an error cancels what is still running."""
        with create_transfer_manager(self.client, self.connection.transfer) as manager:
            yield manager

    def child(self, prefix: str) -> S3Store:
        return S3Store(self.uri_of(prefix), self.settings, self.connection)

    # ---- reads

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        full = self.full_key(prefix)
        found = self._list_full(f"{full}/" if full else "", prefix)
        if not found and full and (single := self.stat(prefix)) is not None:
            return [single]  # `prefix` names one object, as LocalStore.list does for a file
        return found

    def _list_full(self, full_prefix: str, prefix: str) -> list[ObjectInfo]:
        found = []
        with translate_errors(self.uri_of(prefix), self.connection):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
                for item in page.get("Contents", []):
                    etag = str(item.get("ETag", "")).strip('"') or None
                    found.append(ObjectInfo(self._relative(item["Key"]), int(item["Size"]), etag))
        return sorted(found, key=lambda info: info.key)

    def stat(self, key: str) -> ObjectInfo | None:
        with translate_errors(self.uri_of(key), self.connection):
            try:
                head = self.client.head_object(Bucket=self.bucket, Key=self.full_key(key))
            except ClientError as error:
                status = error_code(error)[1]
                if status not in (400, 403, 404):
                    raise
                head = self._head_by_get(key) if status != 404 else None
            if head is None:
                self._check_bucket(self.uri_of(key))  # a HEAD 404 does not say whether the key or the bucket is missing
                return None
        return ObjectInfo(key, int(head["ContentLength"]), str(head.get("ETag", "")).strip('"') or None)

    def _head_by_get(self, key: str) -> dict[str, Any] | None:
        """A HEAD error has no body, hence no code: repeat it as a one-byte GET, whose error says
        InvalidAccessKeyId, SignatureDoesNotMatch or AccessDenied (None if that GET finds no key)."""
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.full_key(key), Range="bytes=0-0")
        except ClientError as error:
            if error_code(error)[0] == "NoSuchKey":
                return None
            raise
        response["Body"].close()
        size = int(str(response.get("ContentRange", "/0")).rsplit("/", 1)[-1])
        return {"ContentLength": size, "ETag": response.get("ETag")}

    def _check_bucket(self, uri: str) -> None:
        """InputNotFound if the bucket is missing, asked once per bucket and connection.

        Only a 404 counts: a 403 on HeadBucket is normal for keys scoped to a prefix."""
        if self.bucket in self.connection.buckets_seen:
            return
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as error:
            if error_code(error)[1] == 404:
                raise InputNotFound(f"{uri}: the bucket does not exist") from None
            if error_code(error)[1] not in (400, 403):
                raise
        self.connection.buckets_seen.add(self.bucket)

    def read_bytes(self, key: str) -> bytes:
        return self.read_bytes_with_etag(key)[0]

    def read_bytes_with_etag(self, key: str) -> tuple[bytes, str]:
        with translate_errors(self.uri_of(key), self.connection):
            response = self.client.get_object(Bucket=self.bucket, Key=self.full_key(key))
            data = response["Body"].read()
        return data, str(response.get("ETag", "")).strip('"')

    # ---- writes

    def write_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> str:
        try:
            return self._put(key, data, {"IfNoneMatch": "*"} if if_absent else {})
        except ClientError as error:  # only the conditional outcomes reach here
            if error_code(error)[0] == "NoSuchBucket":
                raise_for_client_error(error, self.uri_of(key), self.connection)
            raise AlreadyExists(f"{self.uri_of(key)} already exists") from None

    def write_bytes_if_match(self, key: str, data: bytes, etag: str) -> str:
        """Replace `key` only while its ETag is `etag` (the lease's compare-and-swap); return the new ETag."""
        try:
            return self._put(key, data, {"IfMatch": f'"{etag.strip(chr(34))}"'})
        except ClientError as error:
            code = error_code(error)[0]
            if code == "NoSuchBucket":
                raise_for_client_error(error, self.uri_of(key), self.connection)
            raise ETagMismatch(f"{self.uri_of(key)} changed since it was read, or is gone ({code})") from None

    def _put(self, key: str, data: bytes, extra: dict[str, str]) -> str:
        """PutObject; a conditional failure (404/409/412) escapes as ClientError for the caller to interpret."""
        with translate_errors(self.uri_of(key), self.connection, keep=(404, 409, 412) if extra else ()):
            response = self.client.put_object(Bucket=self.bucket, Key=self.full_key(key), Body=data, **extra)
        return str(response.get("ETag", "")).strip('"')

    def upload_file(self, source: Path, key: str) -> None:
        size = source.stat().st_size
        with (
            Progress("push", self.uri_of(key), size, self.settings.progress_interval_seconds, files=1) as progress,
            translate_errors(self.uri_of(key), self.connection),
            self.transfer_manager() as manager,
        ):
            manager.upload(
                str(source), self.bucket, self.full_key(key), None, [s3_sync.ProgressSubscriber(progress)]
            ).result()

    def download_file(self, key: str, destination: Path) -> None:
        info = self.stat(key)
        if info is None:
            raise InputNotFound(f"{self.uri_of(key)} not found")
        destination.parent.mkdir(parents=True, exist_ok=True)
        interval = self.settings.progress_interval_seconds
        with (
            Progress("pull", self.uri_of(key), info.size, interval, files=1) as progress,
            translate_errors(self.uri_of(key), self.connection),
            self.transfer_manager() as manager,
        ):
            subscriber = s3_sync.ProgressSubscriber(progress, info.size, info.etag)
            manager.download(self.bucket, self.full_key(key), str(destination), None, [subscriber]).result()

    def delete(self, keys: list[str]) -> None:
        for batch in delete_order(keys):
            for start in range(0, len(batch), _DELETE_BATCH):
                chunk = batch[start : start + _DELETE_BATCH]
                objects = [{"Key": self.full_key(key)} for key in chunk]
                with translate_errors(self.uri_of(chunk[0]), self.connection):
                    request = {"Objects": objects, "Quiet": True}
                    response = self.client.delete_objects(Bucket=self.bucket, Delete=request)
                errors = response.get("Errors") or []
                if errors:
                    first = errors[0]
                    example = f"{first.get('Key')}: {first.get('Code')}"
                    raise JobError(f"could not delete {len(errors)} objects from {self.uri}, e.g. {example}")

    def abort_incomplete_uploads(self, prefix: str = "") -> int:
        """Abort multipart uploads under `prefix` that a crashed writer left (they hold storage, unseen)."""
        full = self.full_key(prefix)
        aborted = 0
        with translate_errors(self.uri_of(prefix), self.connection):
            paginator = self.client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{full}/" if full else ""):
                for upload in page.get("Uploads", []):
                    key, upload_id = upload["Key"], upload["UploadId"]
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
                    aborted += 1
        if aborted:
            log.info("storage_aborted_uploads", uri=self.uri_of(prefix), count=aborted)
        return aborted

    # ---- directory transfers (parallel; see s3_sync)

    def push_directory(self, source: Path, prefix: str, meta: dict | None = None, *, commit: bool = True) -> Manifest:
        return s3_sync.push_directory(self, source, prefix, meta, commit=commit)

    def pull(self, destination: Path, prefix: str = "", *, record: Path | None = None) -> list[Path]:
        """Download `prefix` into `destination`, skipping files unchanged since the last pull there.

        `record` is where that memory is kept (default: `.sft-pull.json` inside `destination`)."""
        return s3_sync.pull_objects(self, self.list(prefix), prefix, destination, record)


def pull_uri(uri: str, destination: Path, settings: StorageConfig | None = None) -> Path:
    """Pull `s3://bucket/key` (one object) or `s3://bucket/prefix/` (every object below) under `destination`.

    Objects land in `destination/files/`, the skip record in `destination/.sft-pull.json`; the
    result is the single file, or the `files` directory for a prefix. InputNotFound when nothing is there.
    """
    bucket, key = parse_s3_uri(uri)
    store = S3Store(f"s3://{bucket}", settings)
    content = destination / "files"
    record = destination / s3_sync.PULL_RECORD
    if key and not uri.endswith("/"):
        single = store.stat(key)
        if single is not None:
            name = key.rsplit("/", 1)[-1]
            safe_relative_path(name)
            prefix = key.rsplit("/", 1)[0] if "/" in key else ""
            s3_sync.pull_objects(store, [single], prefix, content, record, uri)
            return content / name
    objects = store._list_full(f"{key}/" if key else "", key)
    if not any(not info.key.endswith("/") for info in objects):
        raise InputNotFound(f"{uri}: no such object, and no objects under this prefix")
    s3_sync.pull_objects(store, objects, key, content, record, uri)
    return content
