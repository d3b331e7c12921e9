"""SIGTERM/SIGINT: decide at once, with measured numbers, whether a last checkpoint fits the grace budget.

Platforms give a pod seconds, not minutes (GKE spot ~15 s; AWS spot 2 min only
through a termination handler; Azure >= 30 s). Periodic background checkpoints
are the guarantee; a save on SIGTERM happens only when finishing the current
optimizer step plus a save plus its upload, all measured earlier in this run,
fit in what is left of `checkpoint.grace_seconds`. Otherwise the partial step
is abandoned at once (`PreemptedNow` raised from the handler). With several ranks,
a rank never abandons a step alone (its peers would wait in a collective): during
training the handler only records the signal, and the ranks agree at the end of
the step (`CheckpointCallback`) whether to stop, and whether to save. A second signal
exits 75 immediately: committed checkpoints are safe by construction (manifest
last), and the next start cleans any half-written upload.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from types import FrameType

from job.errors import Preempted
from job.logs import get_logger

log = get_logger(__name__)

SAFETY_SECONDS = 1.0
"""Kept back from the budget for the exit itself (log flush, interpreter teardown)."""


class PreemptedNow(Exception):
    """Raised from the signal handler to abandon the partial step."""


@dataclass
class Measurements:
    step_seconds: float | None = None
    """The latest optimizer step's wall time."""
    save_seconds: float | None = None
    """The latest local checkpoint save's wall time until its folder is complete on scratch: with
    `checkpoint.async_save`, the staging in host memory plus the background write (set once written)."""
    upload_seconds: float | None = None
    """The latest checkpoint upload's wall time (files and manifest)."""


class PreemptionHandler:
    def __init__(self, grace_seconds: float, measurements: Measurements) -> None:
        self.grace_seconds = grace_seconds
        self.measured = measurements
        self.signal_time: float | None = None
        self.signal_name: str | None = None
        self.save_planned = False
        self.training_done = False
        """After training, a signal always stops at once: there is no step to finish."""
        self.defer_to_step_end = False
        """Set while several ranks train: record the signal, decide with the peers at the step's end."""
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_time is not None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]
        self._previous.clear()

    def remaining(self) -> float:
        if self.signal_time is None:
            return float("inf")
        return self.grace_seconds - (time.monotonic() - self.signal_time) - SAFETY_SECONDS

    def save_cost(self, include_step: bool) -> float | None:
        """Seconds a save would take from now; None when not yet measured."""
        m = self.measured
        if m.save_seconds is None or m.upload_seconds is None:
            return None
        step = (m.step_seconds or 0.0) if include_step else 0.0
        return step + m.save_seconds + m.upload_seconds

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            log.error("second_signal_exiting_now", signal=name, exit_code=Preempted.exit_code)
            _flush_logs()
            os._exit(Preempted.exit_code)
        self.signal_time = time.monotonic()
        self.signal_name = name
        cost = self.save_cost(include_step=True)
        self.save_planned = not self.training_done and cost is not None and cost <= self.remaining()
        log.warning(
            "preemption_signal",
            signal=name,
            grace_seconds=self.grace_seconds,
            save_cost_seconds=round(cost, 2) if cost is not None else None,
            decision="finish_step_and_save" if self.save_planned else "stop_now_without_saving",
        )
        if not self.save_planned and not self.defer_to_step_end:
            raise PreemptedNow(name)

    def seconds_since_signal(self) -> float:
        """-1 when no signal came."""
        return -1.0 if self.signal_time is None else time.monotonic() - self.signal_time

    def adopt(self, reason: str, seconds_ago: float) -> None:
        """A peer rank was signalled `seconds_ago`: this rank stops at the same step, on the same budget."""
        if self.signal_time is None:
            self.signal_time = time.monotonic() - seconds_ago
            self.signal_name = reason

    def check_budget(self, upload_seconds: float) -> None:
        """After the first committed checkpoint: log what a save on SIGTERM needs, and warn if it cannot fit."""
        needed = (self.save_cost(include_step=True) or 0.0) + SAFETY_SECONDS
        log.info(
            "checkpoint_timing",
            step_seconds=self.measured.step_seconds,
            save_seconds=self.measured.save_seconds,
            upload_seconds=upload_seconds,
            needed_on_sigterm_seconds=round(needed, 2),
            grace_seconds=self.grace_seconds,
        )
        if needed > self.grace_seconds:
            log.warning(
                "checkpoint_slower_than_grace_budget",
                needed_seconds=round(needed, 1),
                grace_seconds=self.grace_seconds,
                consequence="on SIGTERM the job exits without a last save; periodic checkpoints bound the loss",
                fix=f"checkpoint.grace_seconds >= {needed:.0f} where the platform allows it, "
                "or save more often (checkpoint.every_minutes)",
            )

    def save_fits(self, cost: float | None) -> bool:
        """At the end of the step: does a save of `cost` seconds (None: never measured) still fit what is left?
        (The step may have run long.) With several ranks, `cost` is rank 0's: one decision for all."""
        still = cost is not None and cost <= self.remaining()
        if self.save_planned and not still:
            log.warning("preemption_save_dropped", reason="the step ran past the budget", remaining=self.remaining())
        self.save_planned = still
        return still


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
