"""Push the committed final/ to a Hugging Face Hub model repo, after the store commit.

The store stays the source of truth: what goes to the Hub is exactly what `final/MANIFEST.json` lists (never a
pickle, never the manifest itself), read from the staged directory when this start published it, else pulled
from the store into scratch. `reports/hub-push.json` records each push (repo, commit, files, the manifest's
sha256): a restart does not push again, and a run whose push failed pushes on its next start.

huggingface_hub 2.4 has no `upload_large_folder`: `upload_folder` is its large-folder upload. With hf_xet it
streams, commits in batches, and a re-run resumes (files already committed are skipped, uploaded chunks are
deduplicated); it keeps no local state, so nothing of it can land in the repo.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from job.config.schema import JobConfig
from job.data.hub import first_line
from job.errors import AccessDenied, ConfigError, JobError, StorageUnavailable, exception_chain
from job.logs import get_logger
from job.publish.export import FINAL_PREFIX, PICKLE_SUFFIXES
from job.storage import Store, join_key
from job.storage.manifest import MANIFEST_NAME, FileEntry, Manifest, verify_directory

log = get_logger(__name__)

REPORT_KEY = "reports/hub-push.json"
PULLED_DIR = Path("hub-push") / FINAL_PREFIX
"""Below scratch: final/ pulled from the store when this start did not stage it."""
DEFAULT_ENDPOINT = "https://huggingface.co"
TOKEN_SCOPE = (
    "a token with write access to {repo}: role 'write', or a fine-grained token with write access to the repo "
    "or its namespace (creating the repo also needs the right to create repos there)"
)


def check_hub_push(config: JobConfig) -> None:
    """At config load / validate: ConfigError (64) when a push is asked for but cannot authenticate or go online."""
    repo = config.publish.hub_repo
    if not repo:
        return
    if not os.environ.get("HF_TOKEN"):
        raise ConfigError(
            f"publish.hub_repo is {repo!r} but HF_TOKEN is not set",
            hint=f"set HF_TOKEN to {TOKEN_SCOPE.format(repo=repo)}; or unset publish.hub_repo to keep final/ "
            "in run.output only",
        )
    from job.data.hub import is_offline

    if is_offline():
        raise ConfigError(
            f"publish.hub_repo is {repo!r} but HF_HUB_OFFLINE is set: the push needs the Hub",
            hint="unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE), or unset publish.hub_repo",
        )


def hub_push_pending(config: JobConfig, store: Store) -> bool:
    """True when final/ is committed and this repo has not received this manifest yet."""
    repo = config.publish.hub_repo
    if not repo:
        return False
    raw = _manifest_bytes(store)
    return raw is not None and _recorded_push(store, repo, _digest(raw)) is None


def push_final_to_hub(
    config: JobConfig,
    store: Store,
    final_dir: Path | None,
    scratch: Path,
    *,
    fence: Callable[[], None] | None = None,
) -> dict[str, Any] | None:
    """Push the run's committed final/ to `publish.hub_repo`; returns the report (None when no repo is set).

    `store`: the run's store. `final_dir`: the directory final/ was published from (None: pull it from the store
    into `scratch`). `fence` raises when this process may no longer write the run (checked before the report)."""
    repo = config.publish.hub_repo
    if not repo:
        return None
    check_hub_push(config)
    raw = _manifest_bytes(store)
    if raw is None:
        raise JobError(f"{store.uri}/{FINAL_PREFIX} is not committed: there is nothing to push to the Hub yet")
    digest = _digest(raw)
    recorded = _recorded_push(store, repo, digest)
    if recorded is not None:
        log.info("hub_push_skipped", repo=repo, url=recorded.get("url"), commit=recorded.get("commit"))
        return recorded
    manifest = Manifest.from_json(raw)
    entries = _entries_to_push(manifest)
    source, pulled = _source_directory(store, manifest, final_dir, scratch)
    endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    token = os.environ["HF_TOKEN"]
    total = sum(entry.size for entry in entries)
    url = f"{endpoint}/{repo}"
    log.info("hub_push_started", repo=repo, url=url, files=len(entries), bytes=total, source=str(source))
    started = time.monotonic()
    with _hub_errors(repo, token):
        commit, private = _upload(config, repo, endpoint, token, source, entries, digest)
    seconds = round(time.monotonic() - started, 1)
    report = {
        "repo": repo,
        "url": url,
        "private": private,
        "commit": commit.oid,
        "commit_url": commit.commit_url,
        "files": [entry.name for entry in entries],
        "bytes": total,
        "manifest_sha256": digest,
        "pushed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": seconds,
    }
    if fence is not None:
        fence()
    store.write_bytes(REPORT_KEY, (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())
    if pulled:
        shutil.rmtree(source, ignore_errors=True)  # tens of GB of scratch, no longer needed
    log.info("hub_push_done", repo=repo, url=url, commit=commit.oid, files=len(entries), bytes=total, seconds=seconds)
    return report


def _upload(
    config: JobConfig, repo: str, endpoint: str, token: str, source: Path, entries: list[FileEntry], digest: str
) -> tuple[Any, bool]:
    """Create the repo if needed, then upload; returns huggingface_hub's CommitInfo and the repo's visibility."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import disable_progress_bars

    api = HfApi(endpoint=endpoint, token=token)
    with disable_progress_bars():  # JSON logs: no bars (the library logs a summary line every 30 s instead)
        api.create_repo(repo, repo_type="model", private=config.publish.hub_private, exist_ok=True)
        private = bool(api.repo_info(repo, repo_type="model").private)
        if config.publish.hub_private and not private:
            log.warning(
                "hub_repo_is_public",
                repo=repo,
                hint="the repo existed already and keeps its visibility; what is pushed now is public",
            )
        commit = api.upload_folder(
            repo_id=repo,
            repo_type="model",
            folder_path=source,
            allow_patterns=[glob.escape(entry.name) for entry in entries],  # exactly the manifest's files
            commit_message=f"sft-job: final model of run {config.run.name}",
            commit_description=f"final/{MANIFEST_NAME} sha256 {digest}",
        )
    return commit, private


def _manifest_bytes(store: Store) -> bytes | None:
    key = join_key(FINAL_PREFIX, MANIFEST_NAME)
    return store.read_bytes(key) if store.exists(key) else None


def _digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def _recorded_push(store: Store, repo: str, digest: str) -> dict[str, Any] | None:
    """The recorded push of this manifest to this repo, or None (none yet, another repo, another final/)."""
    if not store.exists(REPORT_KEY):
        return None
    try:
        report = json.loads(store.read_bytes(REPORT_KEY))
    except ValueError:
        log.warning("hub_push_report_unreadable", key=REPORT_KEY)
        return None
    matches = isinstance(report, dict) and report.get("repo") == repo and report.get("manifest_sha256") == digest
    return report if matches else None


def _entries_to_push(manifest: Manifest) -> list[FileEntry]:
    pickles = [entry.name for entry in manifest.files if entry.name.endswith(PICKLE_SUFFIXES)]
    if pickles:  # stage_final refuses them; a final/ written otherwise must not reach the Hub either
        raise JobError(f"refusing to push pickle files to the Hub: {pickles}")
    return list(manifest.files)


def _source_directory(store: Store, manifest: Manifest, final_dir: Path | None, scratch: Path) -> tuple[Path, bool]:
    """A local directory holding final/ as committed, and whether it was pulled (so is ours to delete)."""
    if final_dir is not None:
        differs = [e.name for e in manifest.files if not _same_size(final_dir / e.name, e.size)]
        if not differs:  # hashed moments ago by build_manifest; the sizes show it was not touched since
            return final_dir, False
        log.warning("hub_push_staging_differs", directory=str(final_dir), files=differs[:5])
    target = scratch / PULLED_DIR
    if target.is_dir() and not verify_directory(target, manifest):
        return target, True  # an earlier start's copy, still intact
    shutil.rmtree(target, ignore_errors=True)
    store.pull(target, FINAL_PREFIX)
    problems = verify_directory(target, manifest)
    if problems:
        raise StorageUnavailable(
            f"final/ pulled from {store.uri} does not match its manifest: {problems[:3]}",
            hint="the next start pulls it again",
        )
    return target, True


def _same_size(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size


@contextmanager
def _hub_errors(repo: str, token: str) -> Iterator[None]:
    """huggingface_hub's failures as exit codes: refused 77, unreachable or failing 69; the token never shown."""
    try:
        yield
    except JobError:
        raise
    except Exception as exc:
        mapped = _map_error(exc, repo)
        if mapped is None:
            raise
        mapped.message = mapped.message.replace(token, "***")
        mapped.args = (mapped.message,)
        raise mapped from None


def _map_error(exc: BaseException, repo: str) -> JobError | None:
    from huggingface_hub import errors

    causes = list(exception_chain(exc))
    scope = TOKEN_SCOPE.format(repo=repo)
    for cause in causes:
        if isinstance(cause, errors.RepositoryNotFoundError):  # the Hub's answer to a token that cannot see it
            return AccessDenied(f"the Hub does not let HF_TOKEN see model repo {repo}", hint=f"set HF_TOKEN to {scope}")
        if isinstance(cause, errors.HfHubHTTPError) and cause.response is not None:
            status = cause.response.status_code
            if status in (401, 403):
                what = "rejected HF_TOKEN" if status == 401 else "refused HF_TOKEN write access"
                return AccessDenied(
                    f"the Hub {what} for model repo {repo} (HTTP {status}): {first_line(cause)}",
                    hint=f"set HF_TOKEN to {scope}; a repo owned by another account needs its owner to grant you write",
                )
            if status == 429 or status >= 500:
                return StorageUnavailable(
                    f"the Hub failed while pushing to {repo} (HTTP {status}) after huggingface_hub's retries",
                    hint="final/ is safe in run.output; the next start pushes again",
                )
            return JobError(f"the Hub refused the push to {repo} (HTTP {status}): {first_line(cause)}")
    for cause in causes:
        if isinstance(cause, (ConnectionError, TimeoutError)) or type(cause).__module__.startswith(
            ("httpx", "httpcore")
        ):
            return StorageUnavailable(
                f"cannot reach the Hub to push to {repo}: {first_line(cause)}",
                hint="check the network and HF_ENDPOINT; final/ is safe in run.output and the next start pushes again",
            )
    return None
