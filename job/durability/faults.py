"""Test-only fault injection: SIGKILL ourselves at a named point of a checkpoint's life.

`SFT_FAULTS=mid_upload@4,mid_retention@8` kills the process at those points for those steps,
leaving the store exactly as a crash there would (`mid_retention@N`: while retiring checkpoint N);
`nan_loss@N` poisons step N's loss; `sigterm@N` sends SIGTERM to this process at the end of step N
(a preemption at an exact step, for in-process tests).
Unset in production: every call is a no-op.
"""

from __future__ import annotations

import os
import signal
from functools import cache

from job.logs import get_logger

log = get_logger(__name__)

POINTS = ("after_local_save", "mid_upload", "before_manifest", "mid_retention", "nan_loss", "sigterm")


@cache
def _planned() -> frozenset[tuple[str, int]]:
    spec = os.environ.get("SFT_FAULTS", "")
    planned = set()
    for item in filter(None, (part.strip() for part in spec.split(","))):
        point, _, step = item.partition("@")
        if point not in POINTS or not step.isdigit():
            raise ValueError(f"SFT_FAULTS item {item!r}: expected POINT@STEP with POINT in {POINTS}")
        planned.add((point, int(step)))
    return frozenset(planned)


def armed(point: str, step: int) -> bool:
    return (point, step) in _planned()


def maybe_kill(point: str, step: int) -> None:
    if armed(point, step):
        log.warning("fault_injected", point=point, step=step)
        for handler in __import__("logging").getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_terminate(step: int) -> None:
    if armed("sigterm", step):
        log.warning("fault_injected", point="sigterm", step=step)
        os.kill(os.getpid(), signal.SIGTERM)
