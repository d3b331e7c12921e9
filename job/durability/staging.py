"""Host memory for checkpoint staging: how much this pod may use, and how a checkpoint is staged in it.

An asynchronous checkpoint copies the training state (weights and optimizer states) into host memory,
pinned on a GPU, and writes it to scratch in the background: training waits only for the copy. That needs
as much host RAM as the state, beside what the job itself holds. `host_memory_limit_bytes` reads the pod's
limit (cgroup v2 `memory.max`, cgroup v1 `memory.limit_in_bytes`, else the machine's `MemTotal`);
`plan_staging` decides from it whether the whole state is staged (`full`), written while training waits
in bounded chunks (`chunked`), or saved by Trainer's own writer (`sync`), and what stall to expect.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

GIB = 2**30

PINNED_D2H_BYTES_PER_SECOND = 25e9
"""Device-to-host copy into pinned memory. PCIe 5 x16 (H200, RTX PRO 6000) moves 25-48 GB/s into pinned
pages: torchtitan's async checkpoint of a 58 GB state blocks for 1.2-2.3 s. The planner uses the slow end."""
PAGEABLE_D2H_BYTES_PER_SECOND = 8e9
"""Device-to-host copy into ordinary (pageable) memory: the driver bounces through a pinned buffer."""
CPU_COPY_BYTES_PER_SECOND = 4e9
"""A host memcpy of a large tensor (`Tensor.copy_`): several GB/s on one socket; 4 is a laptop-class figure."""
SCRATCH_WRITE_BYTES_PER_SECOND = 1e9
"""Writing a checkpoint to local NVMe scratch through torch.save/safetensors: 58 GB took 12-58 s
(4.8-1.0 GB/s); the planner uses the slow end. A network volume at 125 MiB/s is 8x slower still."""
PIN_BYTES_PER_SECOND = 10e9
"""Allocating and pinning host pages (`cudaHostAlloc`), paid once: the staging buffers are reused."""
DEFAULT_RESERVE_BYTES = 8 * GIB
"""Host memory kept for the job itself beside the staged state: interpreter and libraries, the CUDA context,
the tokenized dataset, the data loader, and page cache for the background writer."""
MIN_CHUNK_BYTES = 256 * 2**20
"""Below this much free host memory even chunked staging is not worth it: Trainer's own writer saves."""
MAX_CHUNK_BYTES = 4 * GIB
"""The largest chunk (weight shard) staged at once in `chunked` mode."""
_NO_LIMIT = 2**60
"""cgroup v1 reports 'no limit' as a huge page-rounded number (9223372036854771712)."""

Mode = Literal["full", "chunked", "sync"]


@dataclass(frozen=True)
class StagingPlan:
    """How a checkpoint of `state_bytes` is staged in host memory, and what stall training should expect."""

    mode: Mode
    """`full`: the whole state is copied to host memory, written in the background; `chunked`: written while
    training waits, at most `chunk_bytes` of it in host memory at once; `sync`: Trainer's own writer."""
    chunk_bytes: int
    """The most host memory one staged piece takes: the whole state (full), a chunk (chunked), 0 (sync)."""
    host_bytes: int
    """Host RAM the staging holds (the pinned buffers are kept for the next save)."""
    expected_stall_seconds: float
    """Training blocked per checkpoint, steady state (the first save also pins its buffers)."""
    reason: str


def host_memory_limit_bytes(root: Path = Path("/")) -> int | None:
    """The host memory this process may use: the tightest cgroup limit on its way up, or MemTotal.

    `root` is the filesystem root the kernel files are read under (a fake tree in tests). None when nothing
    can be read (not Linux)."""
    limits = [limit for limit in (_cgroup_v2_limit(root), _cgroup_v1_limit(root), _mem_total(root)) if limit]
    return min(limits) if limits else None


def plan_staging(
    state_bytes: int, host_limit_bytes: int | None, device: str, *, reserve_bytes: int = DEFAULT_RESERVE_BYTES
) -> StagingPlan:
    """The staging of a `state_bytes` checkpoint (weights plus optimizer states) on `device` ("cuda"/"cpu")
    within `host_limit_bytes` of host RAM (None: unknown), keeping `reserve_bytes` for the job itself.

    On CPU the live state already sits in host memory, so it counts against the limit too."""
    state_bytes = max(int(state_bytes), 0)
    on_gpu = device == "cuda"
    copy_rate = PINNED_D2H_BYTES_PER_SECOND if on_gpu else CPU_COPY_BYTES_PER_SECOND
    where = "pinned host memory" if on_gpu else "host memory"
    full_stall = state_bytes / copy_rate
    if host_limit_bytes is None:
        return StagingPlan(
            "full", state_bytes, state_bytes, full_stall, f"host memory limit unknown: the state is staged in {where}"
        )
    resident = 0 if on_gpu else state_bytes
    available = host_limit_bytes - reserve_bytes - resident
    need = (
        f"{_gib(state_bytes)} of state + {_gib(reserve_bytes)} reserved"
        + ("" if on_gpu else f" + {_gib(resident)} of live state on CPU")
        + f" against a host limit of {_gib(host_limit_bytes)}"
    )
    if available >= state_bytes:
        return StagingPlan("full", state_bytes, state_bytes, full_stall, f"{need}: the state is staged in {where}")
    write_stall = state_bytes / SCRATCH_WRITE_BYTES_PER_SECOND
    if available >= MIN_CHUNK_BYTES:
        chunk = int(min(available, MAX_CHUNK_BYTES))
        return StagingPlan(
            "chunked",
            chunk,
            chunk,
            write_stall + full_stall,
            f"{need}: too little host RAM to hold a copy, so each checkpoint is written while training waits, "
            f"at most {_gib(chunk)} of it in host memory at a time; raise the pod's memory limit by "
            f"{_gib(state_bytes - available)} to write in the background",
        )
    return StagingPlan(
        "sync",
        0,
        0,
        write_stall + full_stall,
        f"{need}: no room to stage even a {_gib(MIN_CHUNK_BYTES)} chunk, so Trainer's own writer saves while "
        f"training waits; raise the pod's memory limit by {_gib(state_bytes - available)} to write in the "
        "background",
    )


def first_save_extra_seconds(plan: StagingPlan, device: str) -> float:
    """The first staged save also allocates (and on a GPU pins) its buffers; later saves reuse them."""
    if plan.mode == "sync":
        return 0.0
    return plan.host_bytes / (PIN_BYTES_PER_SECOND if device == "cuda" else CPU_COPY_BYTES_PER_SECOND)


def _gib(value: float) -> str:
    return f"{value / GIB:.1f} GiB"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _as_limit(text: str | None) -> int | None:
    """A cgroup limit file's value; None for 'max', a 'no limit' huge number, or anything unreadable."""
    if text is None or text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if 0 < value < _NO_LIMIT else None


def _own_cgroup(root: Path, version: int) -> Path | None:
    """This process's cgroup path from /proc/self/cgroup ('0::/path' on v2, 'N:memory:/path' on v1)."""
    text = _read(root / "proc/self/cgroup")
    for line in (text or "").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if (version == 2 and hierarchy == "0" and controllers == "") or (
            version == 1 and "memory" in controllers.split(",")
        ):
            return Path(path.lstrip("/"))
    return None


def _tightest(base: Path, own: Path | None, filename: str) -> int | None:
    """The smallest limit from this process's cgroup up to the mount's root (a parent's limit binds too).

    In a container with its own cgroup namespace the mount's root is the pod's cgroup itself."""
    candidates = [base]
    if own is not None and own.parts:
        candidates += [base / Path(*own.parts[: i + 1]) for i in range(len(own.parts))]
    limits = [limit for path in candidates if (limit := _as_limit(_read(path / filename))) is not None]
    return min(limits) if limits else None


def _cgroup_v2_limit(root: Path) -> int | None:
    base = root / "sys/fs/cgroup"
    if not (base / "cgroup.controllers").exists():
        return None
    return _tightest(base, _own_cgroup(root, 2), "memory.max")


def _cgroup_v1_limit(root: Path) -> int | None:
    base = root / "sys/fs/cgroup/memory"
    if not base.is_dir():
        return None
    return _tightest(base, _own_cgroup(root, 1), "memory.limit_in_bytes")


def _mem_total(root: Path) -> int | None:
    for line in (_read(root / "proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1]) * 1024  # reported in kB
    return None
