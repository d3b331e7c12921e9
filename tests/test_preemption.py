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
