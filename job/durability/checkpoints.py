"""Checkpoints: local save, background upload, manifest commit, retention, restore.

The trainer saves `checkpoint-<step>` to local scratch (or, with `checkpoint.async_save`,
stages it in host memory and a writer thread renames a complete `.partial-<pid>` folder
into place); a single background thread uploads it to `checkpoints/checkpoint-<step>/`
and commits it with `MANIFEST.json` last. The files are complete on disk before
the upload starts, so what is uploaded is that step's state byte for byte. After
a commit, older checkpoints beyond `checkpoint.keep` are deleted (manifest first,
so a crash mid-delete leaves an uncommitted prefix, never a damaged committed one),
and local copies older than the newest committed one are removed.

At start, `prepare_resume` cleans what a killed predecessor left (prefixes with
no manifest, unfinished multipart uploads, local folders) and returns the newest
committed checkpoint whose files match their manifest and whose pickled files load
the way Trainer loads them (`weights_only=True`), falling back to older ones.
transformers' `get_last_checkpoint` is never used: it trusts folder names.

The run's writer passes its lease's fence: the uploader calls it before a checkpoint's
first byte, right before the manifest commit (the durable act) and before each retention
delete, so a process that lost the lease writes nothing more. A failed background upload
surfaces in the training thread with its own class (LeaseLost 75, AccessDenied 77, ...).

Several nodes: each node's first rank uploads the files its node's ranks wrote (their
RNG states, FSDP shards) in parallel with the other nodes, then records what it
uploaded in `.parts/node-<k>.json`. Node 0 commits the manifest, listing every
node's files, only once every part has arrived: the checkpoint exists only when
all ranks' files are durable. Only node 0 deletes (retention, leftovers).
"""

from __future__ import annotations

import contextvars
import queue
import re
import shutil
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from job.durability import faults
from job.errors import DataError, JobError, resurface
from job.logs import get_logger
from job.storage import LocalStore, Store, join_key
from job.storage.base import commit_manifest
from job.storage.manifest import MANIFEST_NAME, Manifest, build_manifest, verify_directory

log = get_logger(__name__)

CHECKPOINTS_PREFIX = "checkpoints"
PARTS_DIR = ".parts"
_PART_POLL_SECONDS = 1.0
_NAME = re.compile(r"^checkpoint-(\d+)$")
_PARTIAL_NAME = re.compile(r"^checkpoint-\d+\.partial-\d+$")
PICKLED_SUFFIXES = (".pt", ".pth", ".bin")
NOT_LOADED_ON_RESUME = {"training_args.bin"}


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


def clean_leftovers(store: Store | None, local_dir: Path | None) -> None:
    """Remove what a killed predecessor left half-written: it is not committed, so it does not exist.

    `store` None: leave the store alone (not the run's writer); `local_dir` None: not this node's first rank."""
    if store is not None:
        committed, keys = stored_checkpoints(store)
        for step, names in keys.items():
            if step not in committed:
                log.warning("uncommitted_checkpoint_removed", step=step, objects=len(names))
                store.delete(names)
        aborted = store.abort_incomplete_uploads(CHECKPOINTS_PREFIX)
        if aborted:
            log.warning("incomplete_uploads_aborted", count=aborted)
    for _, path in local_checkpoints(local_dir) if local_dir is not None else []:
        shutil.rmtree(path, ignore_errors=True)
    # A background write killed mid-way (async_save): this run's lease is ours, so its writer is gone.
    for path in local_dir.glob("checkpoint-*.partial-*") if local_dir is not None and local_dir.is_dir() else []:
        if _PARTIAL_NAME.match(path.name):
            log.warning("partial_checkpoint_removed", path=str(path))
            shutil.rmtree(path, ignore_errors=True)


def unsafe_pickle(directory: Path) -> tuple[str, str] | None:
    """The first pickled file that Trainer's resume would refuse, and why; None when every one loads.

    Loaded as Trainer loads them: `torch.load(weights_only=True)` inside transformers' `safe_globals()`
    (numpy's RNG state), memory-mapped where the format allows, so tensors are not read."""
    import torch
    from transformers.trainer_pt_utils import safe_globals

    pickled = sorted(
        path
        for path in directory.rglob("*")
        if path.is_file() and path.suffix in PICKLED_SUFFIXES and path.name not in NOT_LOADED_ON_RESUME
    )
    for path in pickled:
        try:
            with safe_globals():
                torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as exc:
            return path.relative_to(directory).as_posix(), _load_error(exc)
    return None


def _load_error(exc: Exception) -> str:
    """The telling part of a load error: torch's weights-only message wraps the offending global in advice."""
    text = str(exc).split("WeightsUnpickler error:", 1)[-1]
    boilerplate = ("Weights only load failed", "Check the documentation")
    paragraphs = [" ".join(part.split()) for part in text.split("\n\n")]
    telling = [part for part in paragraphs if part and not part.startswith(boilerplate)]
    return "; ".join(telling) or f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def prepare_resume(store: Store, resume_dir: Path) -> tuple[int, Path] | None:
    """The newest committed checkpoint that verifies (sizes, sha256, safe pickles), pulled locally; None if none.

    DataError (65) when committed checkpoints exist and the only ones that verify hold a pickle that
    Trainer would refuse: starting from step 0 would silently throw their work away."""
    committed, _ = stored_checkpoints(store)
    refused: tuple[int, str, str] | None = None
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
            _drop_pulled(local, resume_dir)
            continue
        unsafe = unsafe_pickle(local)
        if unsafe is not None:  # never deleted from the store: a person decides
            log.error("checkpoint_unsafe_falling_back", step=step, file=unsafe[0], reason=unsafe[1][:200])
            refused = refused or (step, *unsafe)
            _drop_pulled(local, resume_dir)
            continue
        log.info("checkpoint_verified", step=step, files=len(manifest.files), bytes=manifest.total_bytes)
        return step, local
    if refused is not None:
        step, name, reason = refused
        uri = f"{store.uri}/{checkpoint_prefix(step)}"
        raise DataError(
            f"no committed checkpoint can be resumed: {uri}/{name} is refused by torch.load(weights_only=True), "
            f"as Trainer would load it ({reason[:200]})",
            hint=f"delete the checkpoint prefix {uri}/ to resume from an older checkpoint or start from step 0",
        )
    return None


def _drop_pulled(local: Path, resume_dir: Path) -> None:
    """Remove a refused checkpoint's pulled copy (it takes scratch space); never a local store's own files."""
    if local.is_relative_to(resume_dir):
        shutil.rmtree(local, ignore_errors=True)


@dataclass
class UploadResult:
    step: int
    seconds: float
    bytes: int


class CheckpointUploader:
    """One background thread uploading checkpoints in order; retention after each commit.

    With several nodes there is one per node (`node_rank` of `nnodes`); node 0's commits."""

    def __init__(
        self,
        store: Store,
        keep: int,
        on_committed: Callable[[UploadResult], None] | None = None,
        *,
        node_rank: int = 0,
        nnodes: int = 1,
        parts_timeout: float = 3600.0,
        fence: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.keep = keep
        self.on_committed = on_committed
        self.node_rank, self.nnodes, self.parts_timeout = node_rank, nnodes, parts_timeout
        self.fence = fence or _open_fence
        """Raises (LeaseLost) when this process may no longer write the run; called before each durable write."""
        self.newest_committed: int | None = None
        self.error: BaseException | None = None
        self.error_step: int | None = None
        self._queue: queue.Queue[tuple[int, Path] | None] = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        # copy_context: the thread's log lines carry the run name like the main thread's.
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._run,), name="checkpoint-upload", daemon=True)
        self._thread.start()

    def raise_if_failed(self) -> None:
        """Re-raise the first failed background upload here, keeping its class and so its exit code."""
        error = self.error
        if error is None:
            return
        resurface(error, f"background upload of checkpoint step {self.error_step} failed")

    def submit(self, step: int, local: Path) -> None:
        self.raise_if_failed()
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
                if self.node_rank == 0:
                    self._retain(step)
                self._drop_local(step, local.parent)
            except BaseException as exc:  # surfaced to the training thread at the next submit/finish
                if self.error is None:
                    self.error, self.error_step = exc, step
                log.error("checkpoint_upload_failed", step=step, error=str(exc), error_type=type(exc).__name__)
            finally:
                if self._queue.empty():
                    self._idle.set()

    def _upload(self, step: int, local: Path) -> UploadResult:
        started = time.monotonic()
        prefix = checkpoint_prefix(step)
        self.fence()  # before the first byte
        if faults.armed("mid_upload", step) or faults.armed("before_manifest", step):
            # Leave the store as a crash would: some (or all) files, no manifest.
            manifest = build_manifest(local, {"step": step})
            count = 1 if faults.armed("mid_upload", step) else len(manifest.files)
            for entry in manifest.files[:count]:
                self.store.upload_file(local / entry.name, join_key(prefix, entry.name))
            faults.maybe_kill("mid_upload", step)
            faults.maybe_kill("before_manifest", step)
        if self.nnodes == 1:
            manifest = self.store.push_directory(local, prefix, meta={"step": step}, commit=False)
            self.fence()  # the commit is the durable act: checked right before it
            commit_manifest(self.store, prefix, manifest)
        else:
            manifest = self._upload_part(step, local)
            if manifest is None:
                return UploadResult(step, time.monotonic() - started, 0)
        seconds = time.monotonic() - started
        log.info(
            "checkpoint_committed",
            step=step,
            uri=f"{self.store.uri}/{prefix}",
            bytes=manifest.total_bytes,
            upload_seconds=round(seconds, 3),
        )
        return UploadResult(step, seconds, manifest.total_bytes)

    def _upload_part(self, step: int, local: Path) -> Manifest | None:
        """This node's files; on node 0, also the manifest once every node's part is durable."""
        prefix = checkpoint_prefix(step)
        mine = self.store.push_directory(local, prefix, meta={"step": step}, commit=False)
        if self.node_rank != 0:
            self.store.write_bytes(join_key(prefix, PARTS_DIR, f"node-{self.node_rank:05d}.json"), mine.to_json())
            log.info("checkpoint_part_uploaded", step=step, node_rank=self.node_rank, files=len(mine.files))
            return None
        files = {entry.name: entry for entry in mine.files}
        for node in range(1, self.nnodes):
            for entry in self._wait_for_part(prefix, node).files:
                if entry.name in files and files[entry.name] != entry:
                    raise JobError(
                        f"checkpoint {step}: node {node} uploaded {entry.name} with other content than node 0",
                        hint="run.scratch must be node-local (each node writes only its own ranks' files)",
                    )
                files[entry.name] = entry
        manifest = Manifest(files=sorted(files.values(), key=lambda e: e.name), meta={"step": step})
        self.fence()
        commit_manifest(self.store, prefix, manifest)
        return manifest

    def _wait_for_part(self, prefix: str, node: int) -> Manifest:
        key = join_key(prefix, PARTS_DIR, f"node-{node:05d}.json")
        deadline = time.monotonic() + self.parts_timeout
        while self.store.stat(key) is None:
            if time.monotonic() > deadline:
                raise JobError(f"node {node}'s checkpoint files did not arrive at {self.store.uri}/{prefix}")
            time.sleep(_PART_POLL_SECONDS)
        return Manifest.from_json(self.store.read_bytes(key))

    def _retain(self, newest: int) -> None:
        committed, keys = stored_checkpoints(self.store)
        for step in committed[self.keep :]:
            self.fence()
            delete_checkpoint(self.store, step, keys.get(step))
            log.info("checkpoint_retired", step=step, keep=self.keep)

    def _drop_local(self, newest: int, local_dir: Path) -> None:
        for step, path in local_checkpoints(local_dir):
            if step < newest:
                shutil.rmtree(path, ignore_errors=True)


def _open_fence() -> None:
    """No lease to check (tests, and nodes other than the writer's)."""
