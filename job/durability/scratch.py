"""Local scratch: a full disk is its own failure (74), and what a dead writer left half-written goes.

Every writer in the job writes through a `<name>.partial-<pid>` sibling and renames it into place,
so a crash (or a full disk) leaves only such names behind. `sweep_partials` removes them at the
next start once their writer is gone: untouched for minutes and its pid not alive here (or ours:
a restarted container reuses pids), or untouched for an hour (another pod sharing a hostPath
scratch has its own pid namespace, so a pid alive here proves nothing about it). Ages are measured
by the clock that stamps the files (a probe file's mtime), not ours: an NFS server's may differ.
`scratch_full` recognises a full disk in whatever a library raised (torch's writer says only
"unexpected pos"), and names the path, the free and the needed bytes.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import time
from pathlib import Path

from job.errors import ScratchFull, exception_chain
from job.logs import get_logger

log = get_logger(__name__)

_PARTIAL = re.compile(r"\.partial-(\d+)$")
STALE_SECONDS = 120.0
"""A partial untouched this long whose pid is not alive here is abandoned."""
ABANDONED_SECONDS = 3600.0
"""A partial untouched this long is abandoned whatever its pid."""
FULL_FREE_BYTES = 64 * 2**20
"""Less than this free after a failed write: the write failed because the disk is full."""
_FULL_TEXT = ("no space left on device", "os error 28", "disk quota exceeded", "storagefull")
_GIB = 2**30


def sweep_partials(root: Path, *, now: float | None = None) -> int:
    """Remove `*.partial-<pid>` files and folders under `root` whose writer is gone; returns how many."""
    if not root.is_dir():
        return 0
    now = _filesystem_now(root) if now is None else now
    removed = 0
    for path in sorted(root.rglob("*.partial-*"), key=lambda p: len(p.parts)):
        match = _PARTIAL.search(path.name)
        if match is None or not path.exists():  # inside a folder removed a moment ago
            continue
        age = now - _newest_mtime(path)
        pid = int(match.group(1))
        writer_gone = pid == os.getpid() or not process_alive(pid)
        if age < STALE_SECONDS or (age < ABANDONED_SECONDS and not writer_gone):
            continue
        size = _size(path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed += 1
        log.warning("stale_partial_removed", path=str(path), bytes=size, age_seconds=round(age, 1))
    return removed


def scratch_full(exc: BaseException, scratch: Path | None, needed_bytes: int | None = None) -> ScratchFull | None:
    """ScratchFull naming where, free and needed, when `exc` (or its cause) is a full disk; else None.

    Without a path in the error or a `scratch` to measure, only an error that says so counts."""
    path = _failed_path(exc) or scratch
    if path is None:
        if not _says_full(exc):
            return None
        path = Path.cwd()
    free = _free_bytes(path)
    if not _says_full(exc) and (free is None or free >= FULL_FREE_BYTES or not _is_write_error(exc)):
        return None
    need = f"about {needed_bytes / _GIB:.1f} GiB" if needed_bytes else "more than is free"
    have = f"{free / _GIB:.2f} GiB" if free is not None else "unknown"
    return ScratchFull(
        f"scratch disk full writing {path}: {have} free ({free} bytes), this run needs {need}"
        + (f" ({needed_bytes} bytes)" if needed_bytes else ""),
        hint="mount a larger scratch volume (run.scratch) or free space on it; committed checkpoints are safe",
    )


def check_free_space(scratch: Path, need: int, detail: str) -> None:
    """ScratchFull (74) before anything is written when `scratch` has less than `need` bytes free."""
    scratch.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(scratch).free
    log.info("scratch_space", path=str(scratch), free_gib=round(free / _GIB, 1), needed_gib=round(need / _GIB, 1))
    if free < need:
        raise ScratchFull(
            f"scratch {scratch} has {free / _GIB:.1f} GiB free ({free} bytes); this run needs about "
            f"{need / _GIB:.1f} GiB ({need} bytes): {detail}",
            hint="mount a larger scratch volume (run.scratch)",
        )


def _says_full(exc: BaseException) -> bool:
    for cause in exception_chain(exc):
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(cause).lower() for text in _FULL_TEXT):
            return True
    return False


def _is_write_error(exc: BaseException) -> bool:
    """An I/O failure of the kind a full disk produces (OSError, torch's and safetensors' writers)."""
    for cause in exception_chain(exc):
        if isinstance(cause, OSError) or type(cause).__name__ == "SafetensorError":
            return True
        if isinstance(cause, RuntimeError) and ("inline_container" in str(cause) or "write" in str(cause).lower()):
            return True
    return False


def _failed_path(exc: BaseException) -> Path | None:
    for cause in exception_chain(exc):
        if isinstance(cause, OSError) and cause.filename:
            return Path(os.fsdecode(cause.filename))
    return None


def _free_bytes(path: Path) -> int | None:
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def _filesystem_now(root: Path) -> float:
    """Now by the clock that stamps mtimes under `root` (an NFS server's may differ from ours)."""
    probe = root / f".clock-probe-{os.getpid()}"
    try:
        probe.touch()
        return probe.stat().st_mtime
    except OSError:
        return time.time()
    finally:
        probe.unlink(missing_ok=True)


def _newest_mtime(path: Path) -> float:
    try:
        newest = path.lstat().st_mtime
        if path.is_dir() and not path.is_symlink():
            for child in path.rglob("*"):
                newest = max(newest, child.lstat().st_mtime)
        return newest
    except OSError:
        return 0.0


def _size(path: Path) -> int:
    try:
        if path.is_dir() and not path.is_symlink():
            return sum(child.lstat().st_size for child in path.rglob("*") if child.is_file())
        return path.lstat().st_size
    except OSError:
        return 0


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
