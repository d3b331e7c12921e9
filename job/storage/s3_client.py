"""The S3 connection: one boto3 client per settings, its transfer settings, and error translation.

Everything follows the AWS SDK conventions so users configure nothing new: the endpoint comes
from `storage.endpoint_url`, else `AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL`; credentials
from boto3's default chain (environment, web identity / IRSA, shared files, instance role).
botocore's exceptions never leave this package: `translate_errors` turns them into the job's
exit-code exceptions, naming the URI and never a credential.

Credentials in the endpoint URL (`http://user:pass@minio:9000`) are stripped before boto3 sees it,
with one warning: S3 signs every request with the access key (SigV4), botocore never sends URL user
info, and it would print it in its debug lines and connection errors. Refusing such an endpoint
would break setups that work (the keys come from the environment anyway), so it is ignored.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import astuple, dataclass, field
from typing import Any, NoReturn

import boto3
import botocore.exceptions as bex
import structlog
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from s3transfer.exceptions import RetriesExceededError

from job.config.schema import StorageConfig
from job.errors import AccessDenied, ConfigError, InputNotFound, JobError, StorageUnavailable
from job.logs import redact_urls

log = structlog.get_logger(__name__)

MIB = 1024 * 1024
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")

NOT_FOUND_CODES = {"NoSuchBucket", "NoSuchKey", "404", "NotFound", "NoSuchUpload"}
DENIED_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "403",
    "Forbidden",
    "AllAccessDisabled",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "AccountProblem",
    "RequestTimeTooSkewed",
    "InvalidSecurity",
}
TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable"}


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, key) of `s3://bucket/key`; the key has no leading or trailing '/'."""
    if not uri.startswith("s3://"):
        raise ConfigError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise ConfigError(
            f"{uri!r} does not name a valid bucket",
            hint="bucket names are 3-63 characters: lowercase letters, digits, '.' and '-'",
        )
    return bucket, key.strip("/")


_ENDPOINT_SETTINGS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_warned_endpoints: set[str] = set()


def resolve_endpoint(settings: StorageConfig) -> str | None:
    """The endpoint URL by the SDK's precedence, without user info; None means AWS's own endpoints."""
    setting, endpoint = "storage.endpoint_url", settings.endpoint_url
    for name in _ENDPOINT_SETTINGS:
        if not endpoint:
            setting, endpoint = name, os.environ.get(name)
    if not endpoint:
        return None
    if not endpoint.startswith(("http://", "https://")):
        raise ConfigError(f"S3 endpoint {redact_urls(endpoint)!r} ({setting}) is not an http(s) URL")
    stripped = redact_url(endpoint)
    if stripped != endpoint and endpoint not in _warned_endpoints:
        _warned_endpoints.add(endpoint)  # once per process: connect() runs for every store
        log.warning(
            "s3_endpoint_credentials_ignored",
            setting=setting,
            endpoint=stripped,
            hint="S3 requests are signed with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or IRSA, a profile, a role); "
            "user info in the endpoint URL is never sent: remove it",
        )
    return stripped


def redact_url(url: str) -> str:
    """`url` without any user info: `http://user:pass@host:9000/` -> `http://host:9000/`.

    The user info runs to the last '@' (unencoded '/' and '@' occur in passwords, where urlsplit
    would stop early and leave part of the password in the host)."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    return f"{scheme}://{rest[rest.rfind('@') + 1 :]}"


# ---------------------------------------------------------------- secrets in logs


class RedactSecrets(logging.Filter):
    """Scrubs credentials from botocore/urllib3 records (botocore's DEBUG output prints request headers,
    including the session token). Filters run only for records that pass the level check: free when quiet."""

    _TOKEN = re.compile(r"(?i)(x-amz-security-token['\"]?\s*[:=]\s*b?['\"]?)[^'\"\s,&}]+")
    secrets: set[str] = set()  # noqa: RUF012 - shared on purpose: one set for every attached logger

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is logging's problem, not ours
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def redact(text: str) -> str:
    for secret in RedactSecrets.secrets:
        text = text.replace(secret, "***")
    return redact_urls(RedactSecrets._TOKEN.sub(r"\1***", text))


_FILTER = RedactSecrets()
_NAMESPACES = ("botocore", "boto3", "s3transfer", "urllib3")


def attach_log_filter() -> None:
    """Attach the filter to every logger of the SDK's namespaces (a filter applies only to records created
    at its own logger, not to those propagated from children), so call it after the SDK's imports."""
    names = [name for name in logging.root.manager.loggerDict if name.split(".")[0] in _NAMESPACES]
    for name in [*_NAMESPACES, *names]:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


# ---------------------------------------------------------------- the client


@dataclass(frozen=True)
class Connection:
    client: Any
    """A botocore S3 client (thread-safe; shared by every store with these settings)."""
    transfer: TransferConfig
    endpoint: str | None
    region: str
    settings: StorageConfig
    buckets_seen: set[str] = field(default_factory=set)
    """Buckets known to exist (checked once, after the first HEAD 404 in them)."""


_cache: dict[tuple, Connection] = {}
_cache_lock = threading.Lock()


def connect(settings: StorageConfig) -> Connection:
    """The connection for `settings` and the current AWS_* environment (cached)."""
    endpoint = resolve_endpoint(settings)
    environment = hashlib.sha256(repr(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))).encode())
    key = (astuple(settings), endpoint, environment.hexdigest())
    with _cache_lock:
        if key not in _cache:
            _cache[key] = _new_connection(settings, endpoint)
        return _cache[key]


def reset_connections() -> None:
    """Forget cached clients (tests; a process that changed its AWS_* environment gets new ones anyway)."""
    with _cache_lock:
        _cache.clear()


def _new_connection(settings: StorageConfig, endpoint: str | None) -> Connection:
    session = boto3.session.Session(region_name=settings.region or None)
    region = settings.region or session.region_name or "us-east-1"
    config = Config(
        region_name=region,
        retries={"mode": "standard", "total_max_attempts": settings.max_attempts},  # `max_attempts` counts retries
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        s3={"addressing_style": settings.addressing_style},
        request_checksum_calculation=settings.checksums,
        response_checksum_validation=settings.checksums,
        max_pool_connections=settings.max_concurrency + 4,
        tcp_keepalive=True,
        user_agent_extra="sft-job",
    )
    try:
        client = session.client("s3", endpoint_url=endpoint, config=config)
        credentials = session.get_credentials()
    except (ValueError, bex.BotoCoreError) as error:
        raise ConfigError(f"cannot set up the S3 client: {type(error).__name__}: {redact(str(error))}") from None
    if credentials is None:
        raise AccessDenied(
            "no S3 credentials found",
            hint="set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a web identity (IRSA), a profile or an instance role",
        )
    frozen = credentials.get_frozen_credentials()
    RedactSecrets.secrets.update(s for s in (frozen.secret_key, frozen.token) if s)
    attach_log_filter()
    transfer = TransferConfig(
        multipart_threshold=settings.multipart_threshold_mb * MIB,
        multipart_chunksize=settings.multipart_chunksize_mb * MIB,
        max_concurrency=settings.max_concurrency,
        io_chunksize=MIB,  # fewer, larger writes on download than the 256 KiB default
        use_threads=True,
        preferred_transfer_client="classic",
    )
    log.info(
        "storage_client",
        endpoint=redact_url(endpoint) if endpoint else "aws",
        region=region,
        addressing=settings.addressing_style,
        checksums=settings.checksums,
        max_attempts=settings.max_attempts,
        credentials=credentials.method,  # where they came from (env, web-identity...), never the values
    )
    return Connection(client, transfer, endpoint, region, settings)


# ---------------------------------------------------------------- errors


def error_code(error: bex.ClientError) -> tuple[str, int]:
    code = str(error.response.get("Error", {}).get("Code", ""))
    status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return code, status


@contextmanager
def translate_errors(uri: str, connection: Connection | None = None, keep: tuple[int, ...] = ()) -> Iterator[None]:
    """Run an S3 call; raise the job's exception for whatever botocore or s3transfer raises.

    ClientErrors whose HTTP status is in `keep` pass through untouched (conditional writes read them)."""
    try:
        yield
    except JobError:
        raise
    except bex.ClientError as error:
        if error_code(error)[1] in keep:
            raise
        raise_for_client_error(error, uri, connection)
    except (bex.NoCredentialsError, bex.PartialCredentialsError, bex.CredentialRetrievalError) as error:
        raise AccessDenied(f"no usable S3 credentials for {uri} ({type(error).__name__})") from None
    except (bex.ConnectionError, bex.HTTPClientError, bex.IncompleteReadError, RetriesExceededError) as error:
        attempts = connection.settings.max_attempts if connection else "several"
        raise StorageUnavailable(
            f"S3 unreachable for {uri}: {type(error).__name__} after {attempts} attempts",
            hint=_endpoint_hint(connection),
        ) from None
    except bex.ParamValidationError as error:
        raise JobError(f"invalid S3 request for {uri}: {redact(str(error))}") from None


def raise_for_client_error(error: bex.ClientError, uri: str, connection: Connection | None) -> NoReturn:
    code, status = error_code(error)
    operation = error.operation_name or "request"
    detail = redact(str(error.response.get("Error", {}).get("Message", "")))[:200]
    if code == "NoSuchBucket":
        raise InputNotFound(f"{uri}: the bucket does not exist", hint=_endpoint_hint(connection)) from None
    if code in NOT_FOUND_CODES or status == 404:
        raise InputNotFound(f"{uri} not found ({code or status} on {operation})") from None
    if code in DENIED_CODES or status in (401, 403):
        raise AccessDenied(
            f"access denied to {uri} ({code or status} on {operation}{': ' + detail if detail else ''})",
            hint="check the credentials (env, IRSA web identity, profile, instance role) and the bucket policy",
        ) from None
    if code == "PreconditionFailed" or status == 412:
        changed = f"{uri} changed while it was being read ({operation})"
        raise StorageUnavailable(changed, hint="a retry reads it anew") from None
    if code == "NotImplemented" or status == 501:
        raise ConfigError(
            f"the S3 store does not support {operation} as sent for {uri} ({detail or code})",
            hint="try storage.checksums: when_required and storage.addressing_style: path",
        ) from None
    if code in TRANSIENT_CODES or status >= 500 or status == 429:
        attempts = error.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) + 1
        raise StorageUnavailable(
            f"S3 still failing for {uri} after {attempts} attempts ({code or status} on {operation})",
            hint=_endpoint_hint(connection),
        ) from None
    raise JobError(f"S3 {operation} failed for {uri}: {code or status} {detail}".rstrip()) from None


def _endpoint_hint(connection: Connection | None) -> str | None:
    if connection is None:
        return None
    return f"endpoint {redact_url(connection.endpoint) if connection.endpoint else 'AWS'}"
