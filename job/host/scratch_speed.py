"""Scratch at start: is there room for the run's checkpoints, and how long will writing one take?

A checkpoint is written to local scratch first, then uploaded. On a network volume at its baseline
(gp3: 125 MiB/s) a 58 GB checkpoint takes about 8 minutes to write; local NVMe takes seconds. So at start
the local main rank writes `checkpoint.scratch_probe_mib` MiB (one checkpoint's size where that is smaller:
a small model's runs stay quick) to scratch in 8 MiB chunks, fsyncs once at the end (the time counts the
flush to the device, not only the page cache), deletes the file, and logs `scratch_speed` with the
checkpoint write time that speed gives. The probe file is named like every
other partial write (`*.partial-<pid>`), so a start killed mid-probe leaves nothing the next start keeps.

`scratch_too_slow` (WARNING) when the write takes longer than the checkpoint settings allow:
  - more than half of `checkpoint.every_minutes`: the background write and the upload after it must both
    finish before the next checkpoint is due, or training waits for them;
  - more than `checkpoint.grace_seconds`: a save on SIGTERM cannot fit, so a preemption loses the work
    since the last periodic checkpoint (the job still exits 75 at once).
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from job.config.schema import CheckpointConfig
from job.errors import ScratchFull
from job.logs import get_logger

log = get_logger(__name__)

CHUNK_BYTES = 8 * 2**20
_MIB = 2**20
_GIB = 2**30


@dataclass(frozen=True)
class ScratchNeeds:
    checkpoint_bytes: int
    """One local checkpoint: the weights and the optimizer states (the planner's per-rank bytes)."""
    model_bytes: int
    """A Hub model still to download; 0 for a local or s3:// one."""

    @property
    def total_bytes(self) -> int:
        """Three checkpoints (the one being written, the newest committed, the resume point) and the model."""
        return 3 * self.checkpoint_bytes + self.model_bytes

    @property
    def detail(self) -> str:
        return f"3 checkpoints of {self.checkpoint_bytes / _GIB:.1f} GiB + model {self.model_bytes / _GIB:.1f} GiB"


def scratch_needs(memory_bytes: dict[str, int], *, download_model: bool) -> ScratchNeeds:
    """What scratch must hold, from the plan's `memory_bytes` (weights, optimizer, ...)."""
    checkpoint = memory_bytes["weights"] + memory_bytes["optimizer"]
    return ScratchNeeds(checkpoint, memory_bytes["weights"] if download_model else 0)


def probe_write_speed(directory: Path, mib: int) -> float:
    """MiB/s of writing `mib` MiB to a file in `directory` and fsyncing it; the file is removed.

    ScratchFull (74) naming the path and the bytes when the disk fills up during the probe."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f".scratch-probe.partial-{os.getpid()}"
    total = mib * _MIB
    block = os.urandom(min(CHUNK_BYTES, total))  # random: a compressing filesystem cannot shortcut it
    view = memoryview(block)
    try:
        started = time.monotonic()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            left = total
            while left > 0:
                left -= os.write(fd, view[: min(len(block), left)])
            os.fsync(fd)
        finally:
            os.close(fd)
        seconds = max(time.monotonic() - started, 1e-6)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        free = shutil.disk_usage(directory).free
        raise ScratchFull(
            f"scratch disk full writing the {mib} MiB speed probe {path} ({total} bytes): "
            f"{free / _GIB:.2f} GiB free ({free} bytes)",
            hint="mount a larger scratch volume (run.scratch), or checkpoint.scratch_probe_mib=0 to skip the probe",
        ) from exc
    finally:
        path.unlink(missing_ok=True)
    return total / _MIB / seconds


def slow_reasons(write_seconds: float, every_minutes: float, grace_seconds: float) -> list[str]:
    """Why a checkpoint write of `write_seconds` is too slow for these settings (empty: it is not)."""
    reasons = []
    if write_seconds > every_minutes * 60 / 2:
        reasons.append(
            f"writing one checkpoint takes {write_seconds:.0f} s, more than half of checkpoint.every_minutes "
            f"({every_minutes:g} min): its write and upload may not finish before the next one is due"
        )
    if write_seconds > grace_seconds:
        reasons.append(
            f"writing one checkpoint takes {write_seconds:.0f} s, more than checkpoint.grace_seconds "
            f"({grace_seconds:g} s): on SIGTERM the job exits without a last save"
        )
    return reasons


def measure_scratch(scratch: Path, checkpoint_bytes: int, settings: CheckpointConfig) -> dict[str, Any] | None:
    """Probe scratch (unless `scratch_probe_mib` is 0), log `scratch_speed` and warn when it is too slow."""
    if settings.scratch_probe_mib == 0:
        return None
    mib = min(settings.scratch_probe_mib, max(-(-checkpoint_bytes // _MIB), CHUNK_BYTES // _MIB))
    speed = probe_write_speed(scratch, mib)
    write_seconds = checkpoint_bytes / _MIB / speed
    fields = {
        "path": str(scratch),
        "probe_mib": mib,
        "mib_per_second": round(speed, 1),
        "checkpoint_gib": round(checkpoint_bytes / _GIB, 2),
        "checkpoint_write_seconds": round(write_seconds, 1),
    }
    log.info("scratch_speed", **fields)
    reasons = slow_reasons(write_seconds, settings.every_minutes, settings.grace_seconds)
    if reasons:
        log.warning(
            "scratch_too_slow",
            **fields,
            reasons=reasons,
            fix='put run.scratch on local NVMe (docs/deployment.md "Scratch speed"); or raise '
            "checkpoint.every_minutes (the interval), checkpoint.grace_seconds where the platform gives that long",
        )
    return {**fields, "too_slow": reasons}
