"""`status` read from the store in every phase, built by real runs and real interruptions on S3; NaN -> 70."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from conftest import JobProcess, cpu_run_args, run_job
from job.durability.lease import Lease
from job.errors import InputNotFound
from job.publish.export import publish_final
from job.publish.metrics import MetricsLog
from job.publish.status import RESOLVED_CONFIG, record_failure, render_status, run_status
from job.storage import open_store


def test_every_phase_in_process_from_what_the_store_holds(tmp_path: Path) -> None:
    """The phases from the same writers the job uses (lease, metrics log, failure record, final/), no process."""
    store = open_store(str(tmp_path / "runs")).child("unit")
    with pytest.raises(InputNotFound):
        run_status(store)
    store.write_bytes(RESOLVED_CONFIG, b"model: {source: some/model}\ndata: {train: t.jsonl}\ntrain: {max_steps: 10}\n")
    assert run_status(store)["phase"] == "not-started"

    lease = Lease(store, 30.0)
    lease.acquire()
    try:
        report = run_status(store)
        assert report["phase"] == "training" and report["lease"]["live"] and report["lease"]["holder"] == lease.holder
    finally:
        lease.release()
    metrics = MetricsLog(store)
    for step in (1, 2, 3):
        metrics.add({"step": step, "loss": 1.0 / step, "seconds": 2.0, "max_steps": 10, "tokens_per_second": 50.0})
    metrics.flush()
    report = run_status(store)
    assert report["phase"] == "preempted-waiting" and not report["lease"]["live"]
    assert report["last_metrics"]["step"] == 3 and report["last_metrics"]["eta_seconds"] == 14.0  # 7 steps x 2 s

    time.sleep(0.01)  # the failure comes after the lease's last heartbeat
    record_failure(store, 65, "bad data at t.jsonl:3")
    report = run_status(store)
    assert report["phase"] == "failed" and report["failure"]["exit_code"] == 65
    assert "failed" in render_status(report) and "t.jsonl:3" in render_status(report)

    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "config.json").write_text("{}")
    publish_final(store, staging)
    report = run_status(store)
    assert report["phase"] == "finished" and report["final"]["files"] == 1


def status_of(uri: str, *, cli: bool = False) -> tuple[int, dict | None]:
    """The status as `entrypoint.py status --json` gives it (`cli`), or read in-process (seconds cheaper)."""
    if cli:
        result = run_job("status", uri, "--json")
        return result.returncode, json.loads(result.stdout) if result.returncode == 0 else None
    try:
        return 0, json.loads(json.dumps(run_status(open_store(uri))))
    except InputNotFound:
        return 66, None


@pytest.mark.slow
def test_status_through_a_runs_life_and_nan_stops_with_70(tiny_model_dir, tmp_path, s3_bucket) -> None:
    output = f"{s3_bucket.uri}/runs"
    run_uri = f"{output}/life"
    args = [
        *cpu_run_args(tmp_path, tiny_model_dir, "life", "--set", "checkpoint.every_steps=4"),
        "--set", f"run.output={output}",
    ]  # fmt: skip
    code, report = status_of(run_uri, cli=True)
    assert code == 66 and report is None  # no such run

    job = JobProcess(*args)
    job.wait_for("checkpoint_committed", step=4)
    code, report = status_of(run_uri, cli=True)
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


def test_a_malformed_lease_reads_as_not_live(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "runs")).child("odd")
    store.write_bytes(RESOLVED_CONFIG, b"model: {source: some/model}\ndata: {train: t.jsonl}\n")
    for body in (b'{"holder": "x", "heartbeat": 1', b'{"holder": "x", "heartbeat": NaN, "expires": NaN}', b"[]"):
        store.write_bytes("lease.json", body)
        report = run_status(store)
        assert report["phase"] == "not-started" and report["lease"]["live"] is False, body
        assert "malformed" in report["lease"]["holder"] or body.startswith(b'{"holder": "x", "heartbeat": NaN')


def test_a_run_that_failed_before_recording_its_config_reads_as_failed_not_missing(tmp_path: Path) -> None:
    """A driver too old (71) or a bad path fails before config.resolved.yaml: CI polling must see `failed`."""
    store = open_store(str(tmp_path / "runs" / "early"))
    with pytest.raises(InputNotFound):
        run_status(store)
    record_failure(store, 71, "the node's NVIDIA driver supports CUDA 12.8; this image needs 13.0")
    report = run_status(store)
    assert report["phase"] == "failed"
    assert report["failure"]["exit_code"] == 71
