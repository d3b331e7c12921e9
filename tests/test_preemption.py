"""The SIGTERM decision, with real signals delivered to this process."""

from __future__ import annotations

import os
import signal
import time

import pytest

from job.durability.preemption import SAFETY_SECONDS, Measurements, PreemptedNow, PreemptionHandler


def handler(grace: float, **measured: float) -> PreemptionHandler:
    h = PreemptionHandler(grace, Measurements(**measured))
    h.install()
    return h


def test_unmeasured_save_never_fits() -> None:
    h = handler(60)
    try:
        with pytest.raises(PreemptedNow):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert h.requested and not h.save_planned
    finally:
        h.uninstall()


def test_measured_save_that_fits_finishes_the_step() -> None:
    h = handler(30, step_seconds=2, save_seconds=3, upload_seconds=4)
    try:
        os.kill(os.getpid(), signal.SIGINT)  # SIGINT is handled the same way
        time.sleep(0.05)
        assert h.requested and h.save_planned and h.signal_name == "SIGINT"
        assert h.save_cost(include_step=True) == 9
        assert h.save_fits(h.save_cost(include_step=False)) is True
    finally:
        h.uninstall()


def test_save_that_does_not_fit_stops_at_once() -> None:
    h = handler(10, step_seconds=2, save_seconds=4, upload_seconds=4)  # 10 + safety > 10
    try:
        with pytest.raises(PreemptedNow):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert not h.save_planned
    finally:
        h.uninstall()


def test_step_that_runs_long_drops_the_planned_save() -> None:
    h = handler(2 + SAFETY_SECONDS + 0.6, step_seconds=0.1, save_seconds=1, upload_seconds=1)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.7)  # the step took longer than measured: 2 s of save no longer fit
        assert h.save_fits(h.save_cost(include_step=False)) is False
    finally:
        h.uninstall()


def test_after_training_a_signal_always_stops_at_once() -> None:
    h = handler(60, step_seconds=1, save_seconds=1, upload_seconds=1)
    h.training_done = True
    try:
        with pytest.raises(PreemptedNow):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    finally:
        h.uninstall()


def test_deferred_handler_never_abandons_a_step_and_a_peer_adopts_the_earliest_signal() -> None:
    """With several ranks the handler only records; a rank that was not signalled adopts the peer's age."""
    h = handler(30)  # unmeasured: alone, it would stop at once
    h.defer_to_step_end = True
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert h.requested and h.seconds_since_signal() >= 0.05
    finally:
        h.uninstall()
    peer = PreemptionHandler(30, Measurements())
    assert peer.seconds_since_signal() == -1.0
    peer.adopt("SIGTERM on a peer rank", seconds_ago=10.0)
    assert peer.requested and 30 - 10 - SAFETY_SECONDS - 0.5 < peer.remaining() <= 30 - 10 - SAFETY_SECONDS
    assert peer.save_fits(None) is False and peer.save_fits(5.0) is True and peer.save_fits(25.0) is False


def test_first_commit_reports_what_a_save_on_sigterm_needs_and_warns_when_it_cannot_fit() -> None:
    from structlog.testing import capture_logs

    measured = Measurements(step_seconds=4.0, save_seconds=3.0, upload_seconds=10.0)
    with capture_logs() as fits:
        PreemptionHandler(25.0, measured).check_budget(upload_seconds=10.0)
    assert [line["event"] for line in fits] == ["checkpoint_timing"]
    needed = fits[0]["needed_on_sigterm_seconds"]
    assert needed == PreemptionHandler(25.0, measured).save_cost(include_step=True) + SAFETY_SECONDS
    with capture_logs() as tight:
        PreemptionHandler(needed - 0.5, measured).check_budget(upload_seconds=10.0)
    assert [line["event"] for line in tight] == ["checkpoint_timing", "checkpoint_slower_than_grace_budget"]
    assert tight[1]["fix"].startswith(f"checkpoint.grace_seconds >= {needed:.0f}")


def test_an_async_saves_cost_is_staging_plus_write_and_the_written_folder_goes_to_the_uploader(tmp_path) -> None:
    """With checkpoint.async_save the blocked part is only the staging: what a save on SIGTERM really costs
    (until its folder is complete) is staging + background write, set when the writer hands the folder over."""
    from job.durability.checkpoints import CheckpointUploader, stored_checkpoints
    from job.storage import open_store
    from job.train.async_save import Written
    from job.train.callbacks import CheckpointCallback

    store = open_store(str(tmp_path / "store"))
    uploader = CheckpointUploader(store, keep=2)
    h = PreemptionHandler(25.0, Measurements(step_seconds=1.0, upload_seconds=2.0))
    callback = CheckpointCallback(8.0, True, uploader, h, lambda: False)
    folder = tmp_path / "trainer" / "checkpoint-4"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"w" * 64)
    assert h.save_cost(include_step=True) is None  # staged but not yet written: no measured save
    callback._written(Written(step=4, path=folder, snapshot_seconds=0.25, write_seconds=3.0, bytes=64))
    assert h.measured.save_seconds == pytest.approx(3.25)
    assert h.save_cost(include_step=True) == pytest.approx(1.0 + 3.25 + 2.0)
    assert uploader.wait(30) and stored_checkpoints(store)[0] == [4]
    for grace, fits in ((5.0, False), (10.0, True)):  # 3.25 + 2.0 against grace - 1 s kept back
        signalled = PreemptionHandler(grace, h.measured)
        signalled.signal_time = time.monotonic()
        assert signalled.save_fits(signalled.save_cost(include_step=False)) is fits
