"""job/durability/staging: the pod's host memory limit (fake cgroup trees) and the staging plan it allows."""

from __future__ import annotations

from pathlib import Path

import pytest

from job.durability.staging import (
    DEFAULT_RESERVE_BYTES,
    GIB,
    MAX_CHUNK_BYTES,
    PINNED_D2H_BYTES_PER_SECOND,
    SCRATCH_WRITE_BYTES_PER_SECOND,
    host_memory_limit_bytes,
    plan_staging,
)

MEMINFO = "MemTotal:       131072000 kB\nMemFree:        1000 kB\n"


def tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in {"proc/meminfo": MEMINFO, **files}.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_cgroup_v2_limit_is_the_tightest_on_the_way_up(tmp_path: Path) -> None:
    root = tree(
        tmp_path,
        {
            "proc/self/cgroup": "0::/kubepods/pod1/ctr\n",
            "sys/fs/cgroup/cgroup.controllers": "cpu memory\n",
            "sys/fs/cgroup/memory.max": "max\n",
            "sys/fs/cgroup/kubepods/pod1/memory.max": f"{96 * GIB}\n",  # the pod's limit binds its containers
            "sys/fs/cgroup/kubepods/pod1/ctr/memory.max": "max\n",
        },
    )
    assert host_memory_limit_bytes(root) == 96 * GIB
    (root / "sys/fs/cgroup/kubepods/pod1/ctr/memory.max").write_text(f"{64 * GIB}\n")
    assert host_memory_limit_bytes(root) == 64 * GIB


def test_cgroup_v2_namespaced_container_reads_its_own_root(tmp_path: Path) -> None:
    root = tree(
        tmp_path,
        {
            "proc/self/cgroup": "0::/\n",
            "sys/fs/cgroup/cgroup.controllers": "memory\n",
            "sys/fs/cgroup/memory.max": f"{48 * GIB}\n",
        },
    )
    assert host_memory_limit_bytes(root) == 48 * GIB


def test_cgroup_v1_limit_and_its_no_limit_value(tmp_path: Path) -> None:
    files = {
        "proc/self/cgroup": "4:memory:/process_api/abc\n0::/\n",
        "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",  # v1's "no limit"
        "sys/fs/cgroup/memory/process_api/abc/memory.limit_in_bytes": f"{32 * GIB}\n",
    }
    assert host_memory_limit_bytes(tree(tmp_path, files)) == 32 * GIB
    (tmp_path / "sys/fs/cgroup/memory/process_api/abc/memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert host_memory_limit_bytes(tmp_path) == 131072000 * 1024  # no limit: the machine's MemTotal


def test_limit_above_the_machine_is_the_machine_and_nothing_readable_is_none(tmp_path: Path) -> None:
    root = tree(
        tmp_path,
        {"sys/fs/cgroup/cgroup.controllers": "memory\n", "sys/fs/cgroup/memory.max": f"{10_000 * GIB}\n"},
    )
    assert host_memory_limit_bytes(root) == 131072000 * 1024
    assert host_memory_limit_bytes(tmp_path / "nothing-here") is None


def test_full_staging_on_a_gpu_with_room_expects_the_pinned_copy_only() -> None:
    state = int(57.98e9)  # the default 7B recipe's checkpoint
    plan = plan_staging(state, 128 * GIB, "cuda")
    assert plan.mode == "full" and plan.host_bytes == state and plan.chunk_bytes == state
    assert plan.expected_stall_seconds == pytest.approx(state / PINNED_D2H_BYTES_PER_SECOND)
    assert 1.2 <= plan.expected_stall_seconds <= 2.4  # torchtitan's measured range at this size
    assert "pinned" in plan.reason


def test_short_host_ram_stages_in_bounded_chunks_and_says_how_much_more_would_do() -> None:
    state = int(57.98e9)
    plan = plan_staging(state, 48 * GIB, "cuda")
    assert plan.mode == "chunked"
    assert plan.chunk_bytes == plan.host_bytes == min(48 * GIB - DEFAULT_RESERVE_BYTES, MAX_CHUNK_BYTES)
    assert plan.expected_stall_seconds > state / SCRATCH_WRITE_BYTES_PER_SECOND  # the write blocks training
    assert "raise the pod's memory limit by" in plan.reason
    # Exactly enough for state + reserve is full; one byte less is not.
    assert plan_staging(state, state + DEFAULT_RESERVE_BYTES, "cuda").mode == "full"
    assert plan_staging(state, state + DEFAULT_RESERVE_BYTES - 1, "cuda").mode == "chunked"


def test_on_cpu_the_live_state_counts_against_the_limit_too() -> None:
    state = 10 * GIB
    assert plan_staging(state, 27 * GIB, "cuda").mode == "full"
    assert plan_staging(state, 27 * GIB, "cpu").mode == "chunked"  # 27 - 8 reserved - 10 live < 10
    assert plan_staging(state, 20 * GIB, "cpu", reserve_bytes=0).mode == "full"


def test_no_room_for_a_chunk_falls_back_to_trainers_writer_and_unknown_limit_stages_fully() -> None:
    plan = plan_staging(20 * GIB, 8 * GIB, "cuda")
    assert plan.mode == "sync" and plan.host_bytes == 0 and plan.chunk_bytes == 0
    assert plan.expected_stall_seconds >= 20 * GIB / SCRATCH_WRITE_BYTES_PER_SECOND
    unknown = plan_staging(20 * GIB, None, "cuda")
    assert unknown.mode == "full" and "unknown" in unknown.reason
