"""Asynchronous checkpoints: stage the training state in host memory, write it in Trainer's format on a thread.

When a checkpoint is due, the weights' and optimizer's tensors are copied into host buffers (pinned on a
GPU: `non_blocking` copies, then one sync; plain copies on CPU), storage by storage so torch.save sees the
same sharing, and training goes on. The small files (RNG states, scheduler, trainer state) are written at
once by Trainer's own code. One writer thread then writes the weights (`save_pretrained`), the tokenizer
and `optimizer.pt` into `checkpoint-N.partial-<pid>`, renames it to `checkpoint-N` once complete and only
then calls `on_written` (the uploader's hand-off): resume and the uploader never see a half-written folder,
and a SIGKILL leaves a `.partial-<pid>` that the next start removes. One write is in flight at a time; a
save due before it ends waits. A failed write surfaces in the training thread with its class.
How much host RAM staging may take is `job.durability.staging`'s plan: `chunked` writes while training
waits (weights in bounded shards), `sync` leaves the save to Trainer. One process only (no FSDP, one rank).
"""

from __future__ import annotations

import contextvars
import os
import queue
import shutil
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState
from transformers.trainer_pt_utils import reissue_pt_warnings
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from job.durability.staging import (
    GIB,
    StagingPlan,
    first_save_extra_seconds,
    host_memory_limit_bytes,
    plan_staging,
)
from job.errors import TrainingFailed, resurface
from job.logs import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class Written:
    """A checkpoint folder complete on scratch under its final name."""

    step: int
    path: Path
    snapshot_seconds: float
    """Training blocked while the state was staged (waiting for the previous write included)."""
    write_seconds: float
    bytes: int


@dataclass
class _Job:
    step: int
    partial: Path
    final: Path
    model: Any
    tokenizer: Any
    state: dict[str, Any]
    snapshot_seconds: float


class HostStager:
    """Copies a tree of tensors into host buffers kept from one save to the next (pinned for CUDA sources)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[int, int, str], torch.Tensor] = {}

    def stage(self, tree: Any) -> Any:
        used: dict[tuple[int, int, str], torch.Tensor] = {}
        staged = self._walk(tree, used)
        if any(key[2].startswith("cuda") for key in used):
            torch.cuda.synchronize()  # the one wait: every non_blocking copy has landed
        self._buffers = used  # buffers of storages gone since the last save are released
        return staged

    @property
    def host_bytes(self) -> int:
        return sum(buffer.numel() for buffer in self._buffers.values())

    def _walk(self, node: Any, used: dict[tuple[int, int, str], torch.Tensor]) -> Any:
        if isinstance(node, torch.Tensor):
            return self._tensor(node, used)
        if isinstance(node, dict):  # the same mapping type: torch.save pickles it
            items = [(key, self._walk(value, used)) for key, value in node.items()]
            return type(node)(items) if type(node) in (dict, OrderedDict) else dict(items)
        if isinstance(node, list | tuple):
            values = [self._walk(value, used) for value in node]
            return type(node)(*values) if hasattr(node, "_fields") else type(node)(values)  # namedtuple or not
        return node  # python scalars, strings, None: immutable

    def _tensor(self, tensor: torch.Tensor, used: dict[tuple[int, int, str], torch.Tensor]) -> torch.Tensor:
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        key = (storage.data_ptr(), nbytes, str(tensor.device))
        host = used.get(key) if nbytes else None
        if host is None:
            host = self._buffers.get(key) if nbytes else None
            if host is None:
                host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=tensor.is_cuda)
            source = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage)
            host.copy_(source, non_blocking=tensor.is_cuda)
            if nbytes:
                used[key] = host
        view = torch.empty(0, dtype=tensor.dtype)
        return view.set_(host.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())


def state_bytes(tree: Any) -> int:
    """Bytes of the distinct storages under `tree`: what staging copies and torch.save writes."""
    seen: dict[tuple[int, str], int] = {}

    def walk(node: Any) -> None:
        if isinstance(node, torch.Tensor):
            storage = node.untyped_storage()
            seen[(storage.data_ptr(), str(node.device))] = storage.nbytes()
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list | tuple):
            for value in node:
                walk(value)

    walk(tree)
    return sum(seen.values())


def sync_reason(trainer: Any) -> str | None:
    """Why this trainer's checkpoints must go through Trainer's own synchronous save; None when they need not."""
    args = trainer.args
    if args.world_size > 1 or trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        return "several ranks or FSDP: each rank writes its part through Trainer's save"
    if not isinstance(trainer.model, PreTrainedModel):
        return f"the model is a {type(trainer.model).__name__}, not a PreTrainedModel"
    if getattr(trainer.accelerator, "scaler", None) is not None:
        return "fp16 training has a gradient scaler to save"
    if args.save_only_model or args.push_to_hub or args.save_total_limit is not None or not args.should_save:
        return "save_only_model, push_to_hub or save_total_limit is set"
    return None


def write_small_files(trainer: Any, directory: Path) -> None:
    """RNG states, scheduler and trainer state, by Trainer's own code and in its order (training thread)."""
    trainer._save_rng_state(str(directory))
    with warnings.catch_warnings(record=True) as caught:
        torch.save(trainer.lr_scheduler.state_dict(), directory / SCHEDULER_NAME)
    reissue_pt_warnings(caught)
    # As Trainer._save_checkpoint: the callbacks' and control's exportable state, as of this save.
    for callback in [*trainer.callback_handler.callbacks, trainer.control]:
        if isinstance(callback, ExportableState):
            name = callback.__class__.__name__
            if isinstance(trainer.state.stateful_callbacks[name], list):
                trainer.state.stateful_callbacks[name].append(callback.state())
            else:
                trainer.state.stateful_callbacks[name] = callback.state()
    trainer.state.save_to_json(str(directory / TRAINER_STATE_NAME))


def write_large_files(
    directory: Path, model: Any, tokenizer: Any, state: dict[str, Any], max_shard_size: int | None = None
) -> None:
    """Weights, config, tokenizer and optimizer state, as Trainer's `_save` and `_save_optimizer_and_scheduler`
    write them (`max_shard_size`: shards of at most that many bytes instead of save_pretrained's default)."""
    shard = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(directory), state_dict=state["model"], is_main_process=True, **shard)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    torch.save(state["optimizer"], directory / OPTIMIZER_NAME)


def _tokenizer(trainer: Any) -> Any:
    if trainer.processing_class is not None:
        return trainer.processing_class
    return getattr(trainer.data_collator, "tokenizer", None)


def _folder_bytes(path: Path) -> int:
    return sum(child.stat().st_size for child in path.rglob("*") if child.is_file())


class CheckpointWriter:
    """Stages checkpoints in host memory and writes them on one background thread, in Trainer's format."""

    def __init__(
        self,
        device: str,
        *,
        host_limit: Callable[[], int | None] = host_memory_limit_bytes,
        on_written: Callable[[Written], None] | None = None,
        before_write: Callable[[int], None] | None = None,
    ) -> None:
        self.device = device
        self.host_limit = host_limit
        self.on_written = on_written
        """Called on the writer thread once `checkpoint-N` is complete (the uploader's hand-off)."""
        self.before_write = before_write
        """Called on the writer thread before a staged checkpoint is written (tests hold the writer here)."""
        self.drain_budget: Callable[[bool], float | None] = lambda failing: None
        """Seconds the end of training (`failing`: ended by an error) may wait for the write in flight; None:
        until it ends."""
        self.plan: StagingPlan | None = None
        self.staged_step: int | None = None
        """The step whose state was last staged for a background write."""
        self.waited_seconds = 0.0
        """How long the last save waited for the previous write before staging."""
        self.error: BaseException | None = None
        self.error_step: int | None = None
        self._stager = HostStager()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        context = contextvars.copy_context()  # the thread's log lines carry the run's context
        self._thread = threading.Thread(target=context.run, args=(self._run,), name="checkpoint-write", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ training thread

    def save(self, trainer: Any, trial: Any = None) -> str:
        """Save the trainer's state at this step: returns "full" (staged, written in the background),
        "chunked" (written now, in bounded shards) or "sync" (nothing done: Trainer's own save is due)."""
        started = time.monotonic()
        self.wait()  # one write in flight: a save due meanwhile waits for it
        self.waited_seconds = time.monotonic() - started
        self.raise_if_failed()
        model = trainer.model
        state = {"model": model.state_dict(), "optimizer": trainer.optimizer.state_dict()}
        if self.plan is None:
            self.plan = self._plan(state_bytes(state))
        if self.plan.mode == "sync":
            return "sync"
        step = trainer.state.global_step
        trainer.store_flos()
        run_dir = Path(trainer._get_output_dir(trial=trial))
        final = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        partial = final.with_name(f"{final.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        if trainer.state.best_global_step:  # as Trainer: point at the best checkpoint once it exists
            best = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.best_global_step}"
            if best.exists():
                trainer.state.best_model_checkpoint = str(best)
        write_small_files(trainer, partial)
        if self.plan.mode == "chunked":  # too little host RAM for a copy: write now, a shard at a time
            write_large_files(partial, model, _tokenizer(trainer), state, max_shard_size=self.plan.chunk_bytes)
            _commit_folder(partial, final)
            return "chunked"
        staged = self._stager.stage(state)
        snapshot = time.monotonic() - started
        self.staged_step = step
        self._idle.clear()
        self._queue.put(_Job(step, partial, final, model, _tokenizer(trainer), staged, snapshot))
        return "full"

    def wait(self, timeout: float | None = None) -> bool:
        """True once no write is in flight (written or failed) within `timeout` seconds."""
        return self._idle.wait(timeout)

    def drain(self, failing: bool = False) -> bool:
        """At the end of training: wait for the write in flight within `drain_budget(failing)`."""
        budget = self.drain_budget(failing)
        done = self.wait(None if budget is None else max(budget, 0.0))
        if not done:
            log.warning("checkpoint_write_unfinished", step=self.staged_step, waited_seconds=budget)
        return done

    def raise_if_failed(self) -> None:
        """Re-raise the first failed background write here, keeping its class (and so its exit code)."""
        error = self.error
        if error is None:
            return
        resurface(error, f"background write of checkpoint step {self.error_step} failed")

    def release(self) -> None:
        """Give the staging buffers' host memory back (after training); a later save allocates anew."""
        if self.wait(0):
            self._stager = HostStager()

    def close(self) -> None:
        self._queue.put(None)

    def _plan(self, nbytes: int) -> StagingPlan:
        limit = self.host_limit()
        plan = plan_staging(nbytes, limit, self.device)
        log.info(
            "checkpoint_staging",
            mode=plan.mode,
            state_gib=round(nbytes / GIB, 3),
            host_limit_gib=round(limit / GIB, 1) if limit else None,
            host_gib=round(plan.host_bytes / GIB, 3),
            expected_stall_seconds=round(plan.expected_stall_seconds, 2),
            first_save_extra_seconds=round(first_save_extra_seconds(plan, self.device), 2),
            reason=plan.reason,
        )
        return plan

    # ------------------------------------------------------------------ writer thread

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                self._write(job)
            except BaseException as exc:  # surfaced to the training thread at its next step
                if self.error is None:
                    self.error, self.error_step = exc, job.step
                log.error("checkpoint_write_failed", step=job.step, error=str(exc), error_type=type(exc).__name__)
            finally:
                shutil.rmtree(job.partial, ignore_errors=True)  # gone already when the write completed
                job.state = {}  # the staged buffers stay with the stager, for the next save
                if self._queue.empty():
                    self._idle.set()

    def _write(self, job: _Job) -> None:
        if self.before_write is not None:
            self.before_write(job.step)
        started = time.monotonic()
        weights = job.state["model"].values()
        if not all(bool(torch.isfinite(t).all()) for t in weights if t.is_floating_point()):
            raise TrainingFailed(f"weights are not finite at step {job.step}; the checkpoint is not committed")
        write_large_files(job.partial, job.model, job.tokenizer, job.state)
        _commit_folder(job.partial, job.final)
        seconds = time.monotonic() - started
        written = Written(job.step, job.final, job.snapshot_seconds, seconds, _folder_bytes(job.final))
        log.info(
            "checkpoint_written",
            step=job.step,
            seconds=round(written.write_seconds, 3),
            bytes=written.bytes,
            path=str(job.final),
        )
        if self.on_written is not None:
            self.on_written(written)


def _commit_folder(partial: Path, final: Path) -> None:
    """The complete folder takes its final name (a leftover of that name, never committed, goes first)."""
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
