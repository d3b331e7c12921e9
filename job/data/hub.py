"""Hugging Face Hub datasets as training data: `hf://datasets/OWNER/NAME[@REVISION][/PATTERN]`.

The URI is the one `huggingface_hub.HfFileSystem` takes. The revision is resolved to a commit first and
everything is downloaded at that commit, so the run records exactly what it trained on. `HF_TOKEN`
authenticates (never logged), `HF_ENDPOINT` points at another Hub, and `HF_HUB_OFFLINE=1` reads a snapshot
already in the cache without any network. Hub failures map to the job's exit codes like model downloads do.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from job.errors import AccessDenied, ConfigError, InputNotFound, JobError, StorageUnavailable, exception_chain
from job.logs import get_logger, shorten

__all__ = ["HUB_PREFIX", "HubDataset", "HubUri", "fetch_hub_dataset", "is_hub_uri", "parse_hub_uri"]

log = get_logger(__name__)

HUB_PREFIX = "hf://"
DATASETS_PREFIX = HUB_PREFIX + "datasets/"
SYNTAX = "hf://datasets/OWNER/NAME[@REVISION][/PATTERN]"
# Hub names: letters, digits, `-`, `_`, `.`; no `--` or `..`; at most 96 characters (huggingface_hub's rule).
NAME = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}$")
GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class HubUri:
    repo: str
    """`OWNER/NAME`."""
    revision: str | None
    """Branch, tag, `refs/pr/N` or commit as given (URL-decoded); None: the default branch."""
    pattern: str | None
    """A glob of files inside the repository (`data/*.parquet`), a file, or a folder; None: every file."""

    @property
    def allow_patterns(self) -> list[str] | None:
        """What `snapshot_download` filters by: a plain path matches itself or, as a folder, everything under it."""
        if self.pattern is None:
            return None
        if GLOB_CHARS & set(self.pattern):
            return [self.pattern]
        return [self.pattern, self.pattern.rstrip("/") + "/*"]

    def __str__(self) -> str:
        revision = "@" + self.revision.replace("/", "%2F") if self.revision else ""
        return f"{DATASETS_PREFIX}{self.repo}{revision}" + (f"/{self.pattern}" if self.pattern else "")


@dataclass(frozen=True)
class HubDataset:
    root: Path
    """A local directory holding the dataset's files (only those matching the pattern, when one is given)."""
    commit: str
    """The 40-hex commit the revision resolved to: what the run records."""
    repo: str
    revision: str | None
    pattern: str | None


def is_hub_uri(path: str) -> bool:
    return path.startswith(HUB_PREFIX)


def parse_hub_uri(uri: str) -> HubUri:
    """Split and validate a Hub dataset URI; ConfigError says what is wrong and shows the syntax."""
    if not is_hub_uri(uri):
        raise ConfigError(f"{shorten(uri)!r} is not a Hub URI", hint=f"use {SYNTAX}")
    rest = uri[len(HUB_PREFIX) :]
    if not rest.startswith("datasets/"):
        kind, _, tail = rest.partition("/")
        repository = kind in ("models", "spaces")
        raise ConfigError(
            f"{shorten(uri)!r} is {f'a {kind[:-1]} repository' if repository else 'not a dataset'}:"
            " training data comes from Hub datasets",
            hint=f"use {SYNTAX}, e.g. hf://datasets/{tail if repository else rest}",
        )
    parts = rest[len("datasets/") :].split("/", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ConfigError(
            f"{shorten(uri)!r} names no dataset", hint=f"use {SYNTAX}, e.g. hf://datasets/tatsu-lab/alpaca"
        )
    owner, name = parts[0], parts[1]
    revision = None
    if "@" in name:
        name, _, encoded = name.partition("@")
        revision = unquote(encoded)
        if not revision.strip() or revision != revision.strip():
            raise ConfigError(f"{shorten(uri)!r}: empty revision after '@'", hint="name a branch, tag or commit")
    for label, value in (("owner", owner), ("name", name)):
        if not NAME.match(value) or "--" in value or ".." in value or value.endswith((".", "-")):
            raise ConfigError(
                f"{shorten(uri)!r}: dataset {label} {value!r} is not a valid Hub name",
                hint="letters, digits, '-', '_' and '.', at most 96 characters; " + SYNTAX,
            )
    pattern = parts[2].strip("/") if len(parts) == 3 else ""
    if pattern and (".." in pattern.split("/") or "\\" in pattern or "//" in pattern):
        raise ConfigError(
            f"{shorten(uri)!r}: file pattern {pattern!r} must stay inside the repository",
            hint="a glob relative to the repository root, e.g. data/*.parquet",
        )
    return HubUri(f"{owner}/{name}", revision, pattern or None)


def fetch_hub_dataset(uri: str, scratch: Path, *, endpoint: str | None = None) -> HubDataset:
    """Resolve `uri`'s revision to a commit and download its files at that commit into the Hub cache.

    The cache is `HF_HUB_CACHE` (or `HF_HOME/hub`) when set, else `<scratch>/hub`. `endpoint` defaults to
    `HF_ENDPOINT` (read now, not at import, so a test can point it at a local stand-in).
    """
    from huggingface_hub import HfApi, snapshot_download

    hub = parse_hub_uri(uri)
    offline = is_offline()
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
    token = os.environ.get("HF_TOKEN") or None
    cache = cache_dir(scratch)
    with hub_dataset_errors(hub, offline, cache):
        api = HfApi(endpoint=endpoint, token=token)
        resolved = api.resolve_revision(
            hub.repo, repo_type="dataset", revision=hub.revision, cache_dir=cache, local_files_only=offline
        )
        snapshot = Path(
            snapshot_download(
                hub.repo,
                repo_type="dataset",
                revision=resolved.resolved,
                cache_dir=cache,
                allow_patterns=hub.allow_patterns,
                token=token,
                endpoint=endpoint,
                local_files_only=offline,
            )
        )
    files = _matching_files(snapshot, hub)
    if not files:
        raise InputNotFound(
            f"dataset {hub} at commit {resolved.resolved[:12]} has no file matching {hub.pattern or '*'}",
            hint="check the pattern against the dataset's file list on the Hub (Files and versions)",
        )
    root = snapshot if hub.pattern is None else _pattern_view(snapshot, files, scratch, hub, resolved.resolved)
    log.info(
        "hub_dataset_fetched",
        dataset=hub.repo,
        revision=hub.revision or "main",
        commit=resolved.resolved,
        pattern=hub.pattern,
        files=len(files),
        offline=offline,
    )
    return HubDataset(root, resolved.resolved, hub.repo, hub.revision, hub.pattern)


def is_offline() -> bool:
    """HF_HUB_OFFLINE as set now; huggingface_hub reads it once at import, so both are consulted."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE") or constants.is_offline_mode()


def cache_dir(scratch: Path) -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return scratch / "hub"


def _matching_files(snapshot: Path, hub: HubUri) -> list[str]:
    """Relative paths of the snapshot's files that the pattern selects (a shared cache may hold others)."""
    from huggingface_hub.utils import filter_repo_objects

    present = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
    return list(filter_repo_objects(present, allow_patterns=hub.allow_patterns))


def _pattern_view(snapshot: Path, files: list[str], scratch: Path, hub: HubUri, commit: str) -> Path:
    """A directory of links to just the selected files, keeping their paths (file names show in messages)."""
    key = hashlib.sha256(f"{hub.repo}\0{commit}\0{hub.pattern}".encode()).hexdigest()[:16]
    view = scratch / "hub-views" / f"{hub.repo.replace('/', '--')}-{key}"
    if view.exists():
        shutil.rmtree(view)  # links only: rebuilt each time so it never holds a stale selection
    for relative in files:
        link = view / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to((snapshot / relative).resolve())
    return view


@contextlib.contextmanager
def hub_dataset_errors(hub: HubUri, offline: bool, cache: Path) -> Iterator[None]:
    """Map huggingface_hub's failures to exit codes: access 77, missing 66, an unreachable Hub 69."""
    try:
        yield
    except JobError:
        raise
    except Exception as exc:
        mapped = _map_error(exc, hub, offline, cache)
        if mapped is None:
            raise
        raise mapped from None


def _map_error(exc: BaseException, hub: HubUri, offline: bool, cache: Path) -> JobError | None:
    from huggingface_hub import errors

    where = f"{hub.repo}@{hub.revision}" if hub.revision else hub.repo
    causes = list(exception_chain(exc))
    # What the Hub answered wins over how the library wrapped it (a 503 inside "cannot resolve revision").
    for cause in causes:
        answered = _answer(cause, hub, where)
        if answered is not None:
            return answered
    missing = (errors.LocalEntryNotFoundError, errors.RevisionResolutionError, errors.IncompleteSnapshotError)
    if offline and any(isinstance(cause, missing) for cause in causes):
        return InputNotFound(
            f"Hub dataset {where} is not (completely) in the cache {cache} and HF_HUB_OFFLINE is set",
            hint="fetch it once with network access (same HF_HUB_CACHE or HF_HOME), or unset HF_HUB_OFFLINE",
        )
    unreachable = (*missing, errors.OfflineModeIsEnabled, ConnectionError, TimeoutError)
    for cause in causes:
        if isinstance(cause, unreachable) or type(cause).__module__.startswith(("httpx", "httpcore")):
            return StorageUnavailable(
                f"cannot reach the Hub for dataset {where}: {first_line(cause)}",
                hint="check the network and HF_ENDPOINT; a retry may succeed",
            )
    return None


def _answer(cause: BaseException, hub: HubUri, where: str) -> JobError | None:
    """The exit code for an answer the Hub gave (None for anything else)."""
    from huggingface_hub import errors

    token = "HF_TOKEN cannot see it" if os.environ.get("HF_TOKEN") else "HF_TOKEN is not set"
    if isinstance(cause, errors.GatedRepoError):
        return AccessDenied(
            f"Hub dataset {where} is gated",
            hint="accept its terms on the dataset's Hub page with your account, and set HF_TOKEN to a token"
            " of that account with read access",
        )
    if isinstance(cause, errors.RevisionNotFoundError):
        return InputNotFound(
            f"Hub dataset {hub.repo} has no revision {hub.revision!r}", hint="name an existing branch, tag or commit"
        )
    if isinstance(cause, errors.RepositoryNotFoundError):
        # The Hub answers 401 for a missing repository as for a private one, so both land here.
        return InputNotFound(
            f"Hub dataset {where} not found ({token})",
            hint=f"check OWNER/NAME in {SYNTAX}; a private dataset needs HF_TOKEN with read access",
        )
    if isinstance(cause, errors.RemoteEntryNotFoundError):
        return InputNotFound(f"a file of Hub dataset {where} is gone: {first_line(cause)}")
    if isinstance(cause, errors.HfHubHTTPError) and cause.response is not None:
        status = cause.response.status_code
        if status in (401, 403):
            return AccessDenied(
                f"the Hub refused access to dataset {where} (HTTP {status}, {token})",
                hint="set HF_TOKEN to a valid token with read access; for a gated dataset accept its terms first",
            )
        if status == 404:
            return InputNotFound(f"Hub dataset {where} not found (HTTP 404)")
        return StorageUnavailable(f"the Hub failed for dataset {where} (HTTP {status})", hint="retry later")
    return None


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's first line, shortened: what an error message quotes of a library's failure."""
    text = str(exc).strip()
    return shorten(text.splitlines()[0] if text else type(exc).__name__, limit)
