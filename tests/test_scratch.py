"""Scratch: a full disk is exit 74 naming path, free and needed bytes; dead writers' partials are swept.

The full disk is real: a small tmpfs mounted for the test (root only; skipped where mounting is not
allowed). The job runs as a subprocess and fills its scratch for real, mid-run.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from conftest import JobProcess, cpu_run_args, run_job
from job.durability.scratch import (
    ABANDONED_SECONDS,
    STALE_SECONDS,
    check_free_space,
    scratch_full,
    sweep_partials,
)
from job.errors import ScratchFull

MiB = 2**20


@contextlib.contextmanager
def small_disk(where: Path, size_mib: int) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(where)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()[:200]}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path, leave_bytes: int = 0) -> Path:
    """Take all but `leave_bytes` of the disk's free space with one real file."""
    filler = disk / "filler"
    with filler.open("wb") as handle:
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        with contextlib.suppress(OSError):
            os.posix_fallocate(handle.fileno(), 0, max(free - leave_bytes, 0))
    return filler


def test_sweep_removes_only_what_a_gone_writer_left(tmp_path: Path) -> None:
    now = time.time()
    dead_pid = 2**22 + 12345  # above pid_max on Linux defaults: never a live process
    alive_pid = os.getppid()

    def partial(name: str, pid: int, age: float, folder: bool) -> Path:
        path = tmp_path / "cache" / f".{name}.partial-{pid}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if folder:
            (path / "data").mkdir(parents=True)
            (path / "data" / "shard.arrow").write_bytes(b"x" * 100)
            os.utime(path / "data" / "shard.arrow", (now - age, now - age))
            os.utime(path / "data", (now - age, now - age))
        else:
            path.write_bytes(b"x")
        os.utime(path, (now - age, now - age))
        return path

    gone_dir = partial("gone-dir", dead_pid, STALE_SECONDS + 5, folder=True)
    gone_file = partial("gone-file", dead_pid, STALE_SECONDS + 5, folder=False)
    ours_restarted = partial("ours", os.getpid(), STALE_SECONDS + 5, folder=False)  # a restarted container
    fresh = partial("fresh", dead_pid, 1, folder=True)  # maybe another pod's writer, with other pids
    live = partial("live", alive_pid, STALE_SECONDS + 5, folder=False)
    abandoned = partial("abandoned", alive_pid, ABANDONED_SECONDS + 5, folder=False)
    kept_file = tmp_path / "cache" / "entry" / "data.arrow"
    kept_file.parent.mkdir()
    kept_file.write_bytes(b"committed")

    assert sweep_partials(tmp_path, now=now) == 4
    assert not gone_dir.exists() and not gone_file.exists() and not ours_restarted.exists()
    assert not abandoned.exists()
    assert fresh.exists() and live.exists() and kept_file.read_bytes() == b"committed"
    assert sweep_partials(tmp_path / "missing") == 0


def test_the_space_check_names_free_and_needed_bytes(tmp_path: Path) -> None:
    check_free_space(tmp_path, 1024, "3 checkpoints")
    with pytest.raises(ScratchFull) as info:
        check_free_space(tmp_path, 2**60, "3 checkpoints of 0.3 EiB")
    assert info.value.exit_code == 74 and f"scratch {tmp_path} has" in str(info.value)
    assert f"({2**60} bytes)" in str(info.value) and "3 checkpoints of 0.3 EiB" in str(info.value)


def test_full_disk_errors_of_every_writer_are_recognised(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {"w": torch.zeros(2 * MiB // 4)}
    with small_disk(tmp_path / "disk", 1) as disk:
        writers = {
            "open/write": lambda: (disk / "plain.bin").write_bytes(b"x" * 2 * MiB),
            "torch.save": lambda: torch.save(tensors, disk / "optimizer.pt"),
            "safetensors": lambda: save_file(tensors, str(disk / "model.safetensors")),
        }
        for name, write in writers.items():
            with pytest.raises(Exception) as info:
                write()
            full = scratch_full(info.value, disk, needed_bytes=3 * MiB)
            assert isinstance(full, ScratchFull), (name, repr(info.value))
            assert full.exit_code == 74 and str(disk) in full.message and "free" in full.message
            assert "3145728 bytes" in full.message, full.message
            for leftover in disk.iterdir():
                leftover.unlink()
    # Not full: the same kinds of failure are not mistaken for a full disk.
    assert scratch_full(RuntimeError("unexpected pos 576 vs 534"), tmp_path) is None
    assert scratch_full(PermissionError(13, "Permission denied", str(tmp_path / "x")), tmp_path) is None
    assert scratch_full(ValueError("bad"), None) is None


@pytest.mark.slow
def test_scratch_filling_mid_run_exits_74_and_the_next_start_resumes(tmp_path: Path, tiny_model_dir: Path) -> None:
    with small_disk(tmp_path / "disk", 600) as disk:
        scratch = disk / "scratch"
        args = cpu_run_args(tmp_path, tiny_model_dir, "full", "--set", f"run.scratch={scratch}")
        args += ["--set", "train.max_steps=16", "--set", "checkpoint.every_steps=2"]
        args += ["--set", "checkpoint.background_upload=false"]
        job = JobProcess(*args)
        job.wait_for("checkpoint_committed", step=2)
        filler = fill(disk, leave_bytes=256 * 1024)
        result = job.result()
        assert result.returncode == 74, result.stderr[-3000:]
        failure = result.events("job_failed")[-1]
        assert failure["error_type"] == "ScratchFull" and str(disk) in failure["error"]
        assert "free" in failure["error"] and "needs about" in failure["error"], failure["error"]
        assert not result.events("unexpected_error")
        committed = max(event["step"] for event in result.events("checkpoint_committed"))

        # A predecessor's half-written leftovers, then room again: the next start sweeps them and resumes.
        stale = scratch / "cache" / ".abc.partial-4194999"
        (stale / "train").mkdir(parents=True)
        old = time.time() - 3600
        os.utime(stale / "train", (old, old))
        os.utime(stale, (old, old))
        filler.unlink()
        resumed = run_job(*args)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert resumed.events("resuming")[0]["step"] == committed
        assert [e["path"] for e in resumed.events("stale_partial_removed")] == [str(stale)]
        assert not list(scratch.rglob("*.partial-*"))


@pytest.mark.slow
def test_scratch_too_small_from_the_start_is_74_before_training(tmp_path: Path, tiny_model_dir: Path) -> None:
    with small_disk(tmp_path / "disk", 600) as disk:
        fill(disk, leave_bytes=40 * MiB)  # room for the tokenized data, not for three checkpoints
        result = run_job(*cpu_run_args(tmp_path, tiny_model_dir, "small", "--set", f"run.scratch={disk / 's'}"))
        assert result.returncode == 74, result.stderr[-3000:]
        failure = result.events("job_failed")[-1]
        assert failure["error_type"] == "ScratchFull" and "3 checkpoints" in failure["error"]
        assert not result.events("model_loaded")


@pytest.mark.slow
@pytest.mark.parametrize("offset", ["+2h", "-2h"])
def test_the_sweep_measures_ages_by_the_filesystems_clock_not_ours(tmp_path: Path, offset: str) -> None:
    """Our clock hours off the one that stamps the files (an NFS server's, say): a fresh partial of another
    writer stays, a stale one of a gone writer still goes."""
    lib = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
    if not lib.is_file():
        pytest.skip("libfaketime is not installed (apt-get install faketime; .ci/run installs it)")
    fresh = tmp_path / "cache" / f".fresh.partial-{2**22 + 1}"
    fresh.mkdir(parents=True)
    stale = tmp_path / "cache" / f".stale.partial-{2**22 + 2}"
    stale.mkdir()
    old = time.time() - STALE_SECONDS - 60
    os.utime(stale, (old, old))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SFT_")}
    env.update(LD_PRELOAD=str(lib), FAKETIME=offset, NO_FAKE_STAT="1", PYTHONDONTWRITEBYTECODE="1")
    code = "import sys; from pathlib import Path; from job.durability.scratch import sweep_partials\n"
    code += "sweep_partials(Path(sys.argv[1]))"
    swept = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert swept.returncode == 0, swept.stderr[-2000:]
    assert fresh.exists() and not stale.exists()
