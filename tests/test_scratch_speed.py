"""job/host/scratch_speed.py: room for the checkpoints, and how fast scratch takes one (a real tmp dir)."""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs
from test_scratch import small_disk

from job.config.schema import CheckpointConfig
from job.errors import ScratchFull
from job.host.scratch_speed import measure_scratch, probe_write_speed, scratch_needs, slow_reasons

GIB = 2**30


def test_needs_three_checkpoints_and_a_hub_model() -> None:
    memory = {"weights": 14 * GIB, "optimizer": 44 * GIB, "activations": 9 * GIB}
    local = scratch_needs(memory, download_model=False)
    assert local.checkpoint_bytes == 58 * GIB and local.total_bytes == 174 * GIB
    hub = scratch_needs(memory, download_model=True)
    assert hub.total_bytes == 188 * GIB and hub.detail == "3 checkpoints of 58.0 GiB + model 14.0 GiB"


def test_probe_measures_a_real_write_and_leaves_nothing(tmp_path: Path) -> None:
    speed = probe_write_speed(tmp_path / "scratch", 16)
    assert speed > 0
    assert list((tmp_path / "scratch").iterdir()) == []


@pytest.mark.parametrize(
    ("write_seconds", "every_minutes", "grace_seconds", "kinds"),
    [
        (10.0, 8.0, 25.0, []),  # local NVMe: a 58 GB checkpoint at ~6 GB/s
        (30.0, 8.0, 25.0, ["grace"]),  # fits the interval, not a save on SIGTERM
        (470.0, 8.0, 25.0, ["interval", "grace"]),  # gp3 at its 125 MiB/s baseline
        (240.0, 8.0, 300.0, []),  # exactly half the interval is still allowed
        (241.0, 8.0, 300.0, ["interval"]),
    ],
)
def test_slow_rule(write_seconds, every_minutes, grace_seconds, kinds) -> None:
    reasons = slow_reasons(write_seconds, every_minutes, grace_seconds)
    found = [("interval" if "every_minutes" in r else "grace") for r in reasons]
    assert found == kinds


def test_measure_logs_speed_and_the_write_time_and_warns_when_too_slow(tmp_path: Path) -> None:
    settings = CheckpointConfig(scratch_probe_mib=8, every_minutes=8.0, grace_seconds=25.0)
    with capture_logs() as logs:
        fast = measure_scratch(tmp_path, 1 * 2**20, settings)  # 1 MiB: milliseconds at any speed
        slow = measure_scratch(tmp_path, 10_000 * GIB, settings)  # 10 PiB: hours at any speed
    lines = [entry for entry in logs if entry["event"] == "scratch_speed"]
    assert len(lines) == 2 and all(line["mib_per_second"] > 0 for line in lines)
    assert lines[0]["checkpoint_write_seconds"] < 1 and lines[1]["checkpoint_gib"] == 10_000
    assert fast["too_slow"] == [] and len(slow["too_slow"]) == 2
    warnings = [entry for entry in logs if entry["event"] == "scratch_too_slow"]
    assert len(warnings) == 1 and warnings[0]["log_level"] == "warning" and "NVMe" in warnings[0]["fix"]
    assert measure_scratch(tmp_path, GIB, CheckpointConfig(scratch_probe_mib=0)) is None
    # Never more than one checkpoint's bytes (at least one 8 MiB chunk): a tiny model's runs stay quick.
    assert measure_scratch(tmp_path, 20 * 2**20 + 1, CheckpointConfig())["probe_mib"] == 21
    assert measure_scratch(tmp_path, 1000, CheckpointConfig())["probe_mib"] == 8


def test_a_full_disk_during_the_probe_is_scratch_full(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", 16) as disk:  # a real 16 MiB filesystem, a 32 MiB probe
        with pytest.raises(ScratchFull) as raised:
            probe_write_speed(disk, 32)
        assert raised.value.exit_code == 74
        assert str(disk) in raised.value.message and f"({32 * 2**20} bytes)" in raised.value.message
        assert "free (" in raised.value.message and "scratch_probe_mib=0" in raised.value.hint
        assert list(disk.iterdir()) == []  # the partial probe is gone
