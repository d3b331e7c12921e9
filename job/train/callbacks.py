"""Trainer callbacks: per-step records and log lines, time- and signal-based checkpoints.

`StepMetrics` turns each optimizer step into a `StepRecord` (loss, trained tokens, learning
rate, grad norm, tokens/s, MFU) and stops a run that blew up (exit 70). `CheckpointCallback`
decides when to save (steps, minutes, SIGTERM within the grace budget), agreed across ranks,
and hands each local checkpoint to the background uploader. `StopAtFinalStep` ends a start that
resumed from the final step's checkpoint before Trainer runs one step past it.
"""

from __future__ import annotations

import math
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from job.dist.group import Group
from job.durability import faults
from job.durability.checkpoints import CheckpointUploader
from job.durability.preemption import PreemptionHandler
from job.errors import LeaseLost, TrainingFailed
from job.logs import get_logger
from job.train.async_save import CheckpointWriter, Written

log = get_logger(__name__)


@dataclass(frozen=True)
class FlopsBudget:
    """What MFU needs: FLOPs per trained token (model: 6N-based; hardware: with recomputation) and the peak."""

    model_flops_per_token: float
    hardware_flops_per_token: float
    peak_flops: float


@dataclass
class StepRecord:
    step: int
    loss: float
    tokens: int
    """Trained (label != -100) tokens in this optimizer step."""
    learning_rate: float | None = None
    grad_norm: float | None = None
    seconds: float = 0.0
    max_steps: int | None = None
    tokens_per_second: float | None = None
    mfu: float | None = None
    """Model FLOPs utilisation on a GPU with a known peak (None on CPU)."""
    hfu: float | None = None
    """Hardware FLOP utilisation: counts the recomputed forward of activation checkpointing."""
    peak_memory_gib: float | None = None


@dataclass
class StepMetrics(TrainerCallback):
    """Per-step records and the step log lines (step, loss, lr, grad norm, tokens/s, elapsed, ETA)."""

    trainer: Any = None
    """The `JobTrainer` (set once it exists): each step's totals come from it."""
    sink: Callable[[StepRecord], None] | None = None
    """Receives every step record (the run's metrics log)."""
    group: Group = field(default_factory=Group.single)
    """With several ranks a step's loss is the mean over ranks and its tokens their sum."""
    flops: FlopsBudget | None = None
    """Set on a GPU with a known peak: MFU and hardware FLOP utilisation per step."""
    steps: list[StepRecord] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)
    """(step, eval loss) of evaluations during training (train.eval_strategy)."""
    started: float = field(default_factory=time.monotonic)
    first_step: int | None = None
    _window_tokens: int = 0
    _window_started: float = field(default_factory=time.monotonic)
    _last_step_time: float = field(default_factory=time.monotonic)
    _learning_rate: float | None = None
    _memory_warned: bool = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = self._window_started = self._last_step_time = time.monotonic()
        self.first_step = state.global_step
        wrapped = self.trainer.model_wrapped if self.trainer is not None else None
        log.info(
            "training_started",
            max_steps=state.max_steps,
            start_step=state.global_step,
            world_size=self.group.ranks.world_size,
            # What the ranks really run under: on CPU, Trainer turns an FSDP request into DDP without a word.
            wrapper=type(wrapped).__name__ if wrapped is not None else None,
        )

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Between optimizer.step() and the scheduler's step: the learning rate this step used.
        scheduler = kwargs.get("lr_scheduler")
        if scheduler is not None:
            self._learning_rate = float(scheduler.get_last_lr()[0])

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        assert self.trainer is not None
        now = time.monotonic()
        step_loss, step_tokens, grad_norm = self.trainer.take_step_totals()
        loss, tokens = self.group.sum([step_loss, step_tokens])
        record = StepRecord(
            step=state.global_step,
            loss=loss / self.group.ranks.world_size,
            tokens=int(tokens),
            seconds=now - self._last_step_time,
            max_steps=state.max_steps,
            grad_norm=grad_norm,
            learning_rate=self._learning_rate,
        )
        record.tokens_per_second = round(record.tokens / record.seconds, 2) if record.seconds > 0 else None
        if torch.cuda.is_available():
            record.peak_memory_gib = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if self.flops and record.tokens_per_second:
            peak = self.flops.peak_flops * self.group.ranks.world_size  # tokens are every rank's
            record.mfu = round(record.tokens_per_second * self.flops.model_flops_per_token / peak, 4)
            record.hfu = round(record.tokens_per_second * self.flops.hardware_flops_per_token / peak, 4)
        self._last_step_time = now
        self._window_tokens += record.tokens
        self.steps.append(record)
        if self.sink is not None:
            self.sink(record)
        self._check_health(record)

    def _check_health(self, record: StepRecord) -> None:
        """Stop on a blow-up (exit 70: a retry repeats it); warn when throughput collapses."""
        for name, value in (("loss", record.loss), ("grad norm", record.grad_norm)):
            if value is not None and not math.isfinite(value):
                raise TrainingFailed(
                    f"{name} is {value} at step {record.step}; the newest committed checkpoint precedes it",
                    hint="lower train.learning_rate, raise warm-up, or check the data around this step",
                )
        if record.peak_memory_gib is not None and not self._memory_warned:
            total = torch.cuda.get_device_properties(0).total_memory / 2**30
            if record.peak_memory_gib > 0.95 * total:
                self._memory_warned = True
                log.warning("gpu_memory_near_full", peak_gib=record.peak_memory_gib, card_gib=round(total, 2))
        speeds = [r.tokens_per_second for r in self.steps[-50:-1] if r.tokens_per_second]
        if len(speeds) >= 10 and record.tokens_per_second is not None:
            median = statistics.median(speeds)
            if record.tokens_per_second < 0.5 * median:
                log.warning(
                    "throughput_dropped",
                    step=record.step,
                    tokens_per_second=record.tokens_per_second,
                    running_median=round(median, 1),
                )

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        if "loss" not in logs or not self.steps:
            if "eval_loss" in logs:
                self.evals.append((state.global_step, logs["eval_loss"]))
                log.info("eval", step=state.global_step, eval_loss=logs["eval_loss"])
            return
        now = time.monotonic()
        last = self.steps[-1]
        done = state.global_step - (self.first_step or 0)
        elapsed = now - self.started
        remaining = max(state.max_steps - state.global_step, 0)
        window = max(now - self._window_started, 1e-9)
        log.info(
            "step",
            step=state.global_step,
            max_steps=state.max_steps,
            epoch=round(state.epoch or 0.0, 4),
            loss=round(last.loss, 6),
            learning_rate=last.learning_rate,
            grad_norm=last.grad_norm,
            tokens_per_second=round(self._window_tokens / window, 1),
            mfu=last.mfu,
            hfu=last.hfu,
            peak_memory_gib=last.peak_memory_gib,
            elapsed_seconds=round(elapsed, 1),
            eta_seconds=round(elapsed / done * remaining, 1) if done else None,
        )
        self._window_tokens, self._window_started = 0, now

    def summary(self) -> dict[str, Any]:
        trained_tokens = sum(record.tokens for record in self.steps)
        seconds = time.monotonic() - self.started
        return {
            "steps": len(self.steps),
            "final_step": self.steps[-1].step if self.steps else None,
            "final_loss": self.steps[-1].loss if self.steps else None,
            "trained_tokens": trained_tokens,
            "train_seconds": round(seconds, 3),
            "tokens_per_second": round(trained_tokens / seconds, 2) if seconds > 0 else None,
        }


class FinalStepReached(Exception):
    """Raised before a step when the resumed state is already at `max_steps`: training is done."""


class StopAtFinalStep(TrainerCallback):
    """Resumed from the final step's checkpoint, Trainer would still run one step (it checks `max_steps`
    only after a step); stop before it, so the retry publishes exactly what the checkpoint holds."""

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            raise FinalStepReached(state.global_step)


class CheckpointCallback(TrainerCallback):
    """Time- and signal-based saves, measurements for the SIGTERM decision, and hand-off to the uploader."""

    def __init__(
        self,
        every_minutes: float,
        background: bool,
        uploader: CheckpointUploader | None,
        preemption: PreemptionHandler,
        lease_lost: Callable[[], bool],
        group: Group | None = None,
    ) -> None:
        self.every_seconds = every_minutes * 60
        self.background = background
        self.uploader = uploader
        """This node's uploader; None on ranks that do not upload (all but each node's first)."""
        self.group = group or Group.single()
        self.preemption = preemption
        self.lease_lost = lease_lost
        self.writer: CheckpointWriter | None = None
        """The background writer (`checkpoint.async_save`, one process): it hands written folders to us."""
        self._last_save = self._step_started = self._save_started = time.monotonic()

    def attach_writer(self, writer: CheckpointWriter) -> None:
        """Written checkpoints come back through `_written` (writer thread). The end of training waits for the
        write in flight: after a signal while the grace budget lasts, after an error up to grace_seconds (as the
        run then waits for uploads), otherwise until it ends."""
        self.writer = writer
        writer.on_written = self._written
        writer.drain_budget = self._drain_budget

    def _drain_budget(self, failing: bool) -> float | None:
        if self.preemption.requested:
            return self.preemption.remaining()
        return self.preemption.grace_seconds if failing else None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._last_save = time.monotonic()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._step_started = time.monotonic()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.writer is not None:
            self.writer.raise_if_failed()  # a failed background write stops here, with its class
        faults.maybe_terminate(state.global_step)
        now = time.monotonic()
        self.preemption.measured.step_seconds = now - self._step_started
        # One decision for all ranks from one small all-reduce (max): the earliest signal on any rank, rank 0's
        # measured save cost (the others contribute -inf; inf: never measured), a time-based save due on rank 0.
        cost = self.preemption.save_cost(include_step=False) if self.group.ranks.is_main else -math.inf
        signal_age, rank0_cost, due, lost = self.group.max(
            [
                self.preemption.seconds_since_signal(),
                math.inf if cost is None else cost,
                self.group.ranks.is_main and now - self._last_save >= self.every_seconds,
                self.lease_lost(),
            ]
        )
        if lost:
            raise LeaseLost("this process can no longer prove it holds the run's lease; stopping before writing again")
        if signal_age >= 0:
            self.preemption.adopt("SIGTERM on a peer rank", signal_age)
            control.should_training_stop = True
            control.should_save = self.preemption.save_fits(None if math.isinf(rank0_cost) else rank0_cost)
            if self.group.distributed:
                log.warning("preemption_agreed", step=state.global_step, save=control.should_save)
        elif due:
            control.should_save = True
        if control.should_save:
            self._save_started = now

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        step = state.global_step
        if self.writer is not None and self.writer.staged_step == step:
            # Staged in host memory: the writer checks, writes and hands it over (`_written`); training goes on.
            self._last_save = time.monotonic()
            log.info(
                "checkpoint_saved_locally",
                step=step,
                blocked_seconds=round(self._last_save - self._save_started, 3),
                waited_for_previous_write_seconds=round(self.writer.waited_seconds, 3),
                async_save=True,
                background_upload=self.background,
            )
            return
        self.preemption.measured.save_seconds = time.monotonic() - self._save_started
        path = Path(args.output_dir) / f"checkpoint-{step}"
        finite = model is None or all(bool(torch.isfinite(_local(p)).all()) for p in model.parameters())
        if self.group.sum([not finite])[0]:  # every rank checks its own shard; all of them stop
            shutil.rmtree(path, ignore_errors=True)
            raise TrainingFailed(f"weights are not finite at step {step}; the checkpoint is not committed")
        # Trainer pickles its arguments here; resume never reads them and loading them needs a full unpickle.
        (path / "training_args.bin").unlink(missing_ok=True)
        # Every rank's files (its RNG state, its FSDP shards) are on disk before the node uploads them.
        self.group.barrier("checkpoint save")
        faults.maybe_kill("after_local_save", step)
        if self.uploader is not None:
            self.uploader.submit(step, path)
            if not self.background:
                self.uploader.wait()
        self._last_save = time.monotonic()
        log.info(
            "checkpoint_saved_locally",
            step=step,
            save_seconds=round(self.preemption.measured.save_seconds, 3),
            blocked_seconds=round(self._last_save - self._save_started, 3),
            async_save=False,
            background_upload=self.background,
        )

    def _written(self, written: Written) -> None:
        """Writer thread: `checkpoint-N` is complete on scratch. What a save on SIGTERM costs is the staging plus
        the write (the upload is measured by the uploader); then the folder goes to the uploader."""
        self.preemption.measured.save_seconds = written.snapshot_seconds + written.write_seconds
        faults.maybe_kill("after_local_save", written.step)
        if self.uploader is not None:
            self.uploader.submit(written.step, written.path)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 (DTensor) parameter, the tensor itself otherwise."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
