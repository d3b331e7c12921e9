"""Checkpoints: local save, background upload, manifest commit, retention, restore.

The trainer saves `checkpoint-<step>` to local scratch (the only time training is
blocked); a single background thread uploads it to `checkpoints/checkpoint-<step>/`
and commits it with `MANIFEST.json` last. The files are complete on disk before
the upload starts, so what is uploaded is that step's state byte for byte. After
a commit, older checkpoints beyond `checkpoint.keep` are deleted (manifest first,
so a crash mid-delete leaves an uncommitted prefix, never a damaged committed one),
and local copies older than the newest committed one are removed.

At start, `prepare_resume` cleans what a killed predecessor left (prefixes with
no manifest, unfinished multipart uploads, local folders) and returns the newest
committed checkpoint whose files match their manifest, falling back to older ones.
transformers' `get_last_checkpoint` is never used: it trusts folder names.
"""

from __future__ import annotations

import contextvars
import queue
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from job import faults
from job.errors import ConfigError, JobError
from job.logs import get_logger
from job.manifest import MANIFEST_NAME, build_manifest, verify_directory
from job.storage import LocalStore, Store, join_key

log = get_logger(__name__)

CHECKPOINTS_PREFIX = "checkpoints"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_prefix(step: int) -> str:
    return f"{CHECKPOINTS_PREFIX}/checkpoint-{step:08d}"


def local_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """Trainer-written `checkpoint-<step>` folders, oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found)


def stored_checkpoints(store: Store) -> tuple[list[int], dict[int, list[str]]]:
    """(committed steps, newest first; every step's keys) under `checkpoints/`."""
    keys: dict[int, list[str]] = {}
    for info in store.list(CHECKPOINTS_PREFIX):
        folder = info.key.removeprefix(CHECKPOINTS_PREFIX + "/").split("/", 1)[0]
        match = _NAME.match(folder)
        if match:
            keys.setdefault(int(match.group(1)), []).append(info.key)
    committed = sorted(
        (step for step, names in keys.items() if join_key(checkpoint_prefix(step), MANIFEST_NAME) in names),
        reverse=True,
    )
    return committed, keys


def delete_checkpoint(store: Store, step: int, keys: list[str] | None = None) -> None:
    """Uncommit (manifest first), then delete the files."""
    prefix = checkpoint_prefix(step)
    keys = keys if keys is not None else [info.key for info in store.list(prefix)]
    manifest_key = join_key(prefix, MANIFEST_NAME)
    if manifest_key in keys:
        store.delete([manifest_key])
    faults.maybe_kill("mid_retention", step)
    store.delete([key for key in keys if key != manifest_key])


def clean_leftovers(store: Store, local_dir: Path) -> None:
    """Remove what a killed predecessor left half-written: it is not committed, so it does not exist."""
    committed, keys = stored_checkpoints(store)
    for step, names in keys.items():
        if step not in committed:
            log.warning("uncommitted_checkpoint_removed", step=step, objects=len(names))
            store.delete(names)
    aborted = store.abort_incomplete_uploads(CHECKPOINTS_PREFIX)
    if aborted:
        log.warning("incomplete_uploads_aborted", count=aborted)
    for _, path in local_checkpoints(local_dir):
        shutil.rmtree(path, ignore_errors=True)


def check_scratch_space(scratch: Path, checkpoint_bytes: int, model_bytes_to_pull: int) -> None:
    """ConfigError (64) naming the size needed when scratch cannot hold three checkpoints and the model."""
    need = 3 * checkpoint_bytes + model_bytes_to_pull
    scratch.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(scratch).free
    gib = 1024**3
    log.info("scratch_space", path=str(scratch), free_gib=round(free / gib, 1), needed_gib=round(need / gib, 1))
    if free < need:
        raise ConfigError(
            f"scratch {scratch} has {free / gib:.1f} GiB free; this run needs about {need / gib:.1f} GiB "
            f"(3 checkpoints of {checkpoint_bytes / gib:.1f} GiB + model {model_bytes_to_pull / gib:.1f} GiB)",
            hint="mount a larger scratch volume (run.scratch)",
        )


def prepare_resume(store: Store, resume_dir: Path) -> tuple[int, Path] | None:
    """The newest committed checkpoint that verifies (sizes and sha256), pulled locally; None if none."""
    committed, _ = stored_checkpoints(store)
    for step in committed:
        prefix = checkpoint_prefix(step)
        manifest = store.read_manifest(prefix)
        if manifest is None:
            continue
        try:
            if isinstance(store, LocalStore):
                local = store.root / prefix  # verify and read in place: no copy of a local store
            else:
                local = resume_dir / f"checkpoint-{step:08d}"
                store.pull(local, prefix)
            problems = verify_directory(local, manifest)
        except JobError as exc:
            problems = [str(exc)]
        if problems:
            log.error("checkpoint_damaged_falling_back", step=step, problems=problems[:5])
            continue
        log.info("checkpoint_verified", step=step, files=len(manifest.files), bytes=manifest.total_bytes)
        return step, local
    return None


@dataclass
class UploadResult:
    step: int
    seconds: float
    bytes: int


class CheckpointUploader:
    """One background thread uploading checkpoints in order; retention after each commit."""

    def __init__(
        self,
        store: Store,
        keep: int,
        on_committed: Callable[[UploadResult], None] | None = None,
    ) -> None:
        self.store = store
        self.keep = keep
        self.on_committed = on_committed
        self.newest_committed: int | None = None
        self.error: BaseException | None = None
        self._queue: queue.Queue[tuple[int, Path] | None] = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        # copy_context: the thread's log lines carry the run name like the main thread's.
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._run,), name="checkpoint-upload", daemon=True)
        self._thread.start()

    def submit(self, step: int, local: Path) -> None:
        if self.error is not None:
            raise JobError(f"a checkpoint upload failed earlier: {self.error}")
        self._idle.clear()
        self._queue.put((step, local))

    def wait(self, timeout: float | None = None) -> bool:
        """True when every submitted checkpoint is committed (or failed) within `timeout`."""
        return self._idle.wait(timeout)

    def close(self, timeout: float | None = None) -> bool:
        done = self.wait(timeout)
        self._queue.put(None)
        return done

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            step, local = item
            try:
                result = self._upload(step, local)
                self.newest_committed = step
                if self.on_committed:
                    self.on_committed(result)
                self._retain(step, local.parent)
            except BaseException as exc:  # surfaced to the training thread at the next submit/finish
                self.error = exc
                log.error("checkpoint_upload_failed", step=step, error=str(exc))
            finally:
                if self._queue.empty():
                    self._idle.set()

    def _upload(self, step: int, local: Path) -> UploadResult:
        started = time.monotonic()
        prefix = checkpoint_prefix(step)
        if faults.armed("mid_upload", step) or faults.armed("before_manifest", step):
            # Leave the store as a crash would: some (or all) files, no manifest.
            manifest = build_manifest(local, {"step": step})
            count = 1 if faults.armed("mid_upload", step) else len(manifest.files)
            for entry in manifest.files[:count]:
                self.store.upload_file(local / entry.name, join_key(prefix, entry.name))
            faults.maybe_kill("mid_upload", step)
            faults.maybe_kill("before_manifest", step)
        manifest = self.store.push_directory(local, prefix, meta={"step": step})
        seconds = time.monotonic() - started
        log.info(
            "checkpoint_committed",
            step=step,
            uri=f"{self.store.uri}/{prefix}",
            bytes=manifest.total_bytes,
            upload_seconds=round(seconds, 3),
        )
        return UploadResult(step, seconds, manifest.total_bytes)

    def _retain(self, newest: int, local_dir: Path) -> None:
        committed, keys = stored_checkpoints(self.store)
        for step in committed[self.keep :]:
            delete_checkpoint(self.store, step, keys.get(step))
            log.info("checkpoint_retired", step=step, keep=self.keep)
        for step, path in local_checkpoints(local_dir):
            if step < newest:
                shutil.rmtree(path, ignore_errors=True)
