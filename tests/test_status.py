"""`status` read from the store in every phase, built by real runs and real interruptions on S3; NaN -> 70."""

from __future__ import annotations

import json
import signal

import pytest

from conftest import JobProcess, cpu_run_args, run_job

pytestmark = pytest.mark.slow


def status_of(uri: str) -> tuple[int, dict | None]:
    result = run_job("status", uri, "--json")
    return result.returncode, json.loads(result.stdout) if result.returncode == 0 else None


def test_status_through_a_runs_life_and_nan_stops_with_70(tiny_model_dir, tmp_path, s3_bucket) -> None:
    output = f"{s3_bucket.uri}/runs"
    run_uri = f"{output}/life"
    args = [
        *cpu_run_args(tmp_path, tiny_model_dir, "life", "--set", "checkpoint.every_steps=4"),
        "--set", f"run.output={output}",
    ]  # fmt: skip
    code, _ = status_of(run_uri)
    assert code == 66  # no such run

    job = JobProcess(*args)
    job.wait_for("checkpoint_committed", step=4)
    code, report = status_of(run_uri)
    assert code == 0 and report["phase"] == "training"
    assert report["lease"]["live"] and report["checkpoints"][0]["step"] >= 4
    assert report["config"]["model"] == str(tiny_model_dir)
    job.signal(signal.SIGTERM)
    assert job.wait() == 75

    code, report = status_of(run_uri)
    durable = job.wait_for("preempted")["newest_durable_step"]
    assert report["phase"] == "preempted-waiting" and report["newest_durable_step"] == durable
    assert not report["lease"]["live"]  # released at exit, so a retry need not wait
    assert report["last_metrics"]["step"] >= durable and report["last_metrics"]["max_steps"] == 24

    nan_step = durable + 6
    failed = run_job(*args, env={"SFT_FAULTS": f"nan_loss@{nan_step}"})
    assert failed.returncode == 70, failed.stderr[-2000:]
    error = failed.events("job_failed")[0]["error"]
    assert f"loss is nan at step {nan_step}" in error
    code, report = status_of(run_uri)
    assert report["phase"] == "failed" and report["failure"]["exit_code"] == 70
    assert report["newest_durable_step"] < nan_step  # the poisoned step was never committed

    finished = run_job(*args)
    assert finished.returncode == 0, finished.stderr[-2000:]
    code, report = status_of(run_uri)
    assert report["phase"] == "finished" and report["final"]["files"] >= 8
    text = run_job("status", run_uri).stdout
    assert "phase:     finished" in text and "final:" in text
