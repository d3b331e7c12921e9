"""The SIGTERM decision, with real signals delivered to this process."""

from __future__ import annotations

import os
import signal
import time

import pytest

from job.preemption import SAFETY_SECONDS, Measurements, PreemptedNow, PreemptionHandler


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
        assert h.confirm_save_at_step_end() is True
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
        assert h.confirm_save_at_step_end() is False
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
