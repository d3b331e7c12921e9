"""Preemption end to end: real signals and SIGKILLs on the real entrypoint, compared with an uninterrupted run.

Every interrupted run here has the reference run's training config (24 steps, seed 42, float32 on CPU),
so its final weights and per-step losses must equal the reference's bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import JobProcess, cpu_run_args, run_job
from job.durability.checkpoints import checkpoint_prefix, stored_checkpoints
from job.storage import open_store
from job.storage.manifest import MANIFEST_NAME

pytestmark = pytest.mark.slow

CHECKPOINTING = ("--set", "checkpoint.every_steps=4", "--set", "checkpoint.keep=2")


def assert_same_as_reference(reference_dir: Path, run_dir: Path) -> None:
    ours = load_file(run_dir / "final" / "model.safetensors")
    reference = load_file(reference_dir / "final" / "model.safetensors")
    assert ours.keys() == reference.keys()
    different = [k for k in ours if not torch.equal(ours[k], reference[k])]
    assert not different, f"weights differ from the uninterrupted run: {different[:5]}"
    ours_losses = json.loads((run_dir / "final" / "metrics.json").read_text())["loss_per_step"]
    reference_losses = json.loads((reference_dir / "final" / "metrics.json").read_text())["loss_per_step"]
    assert ours_losses == reference_losses  # every step exactly once, identical losses


def test_sigterm_saves_within_budget_then_resume_equals_uninterrupted(reference_run, tiny_model_dir, tmp_path) -> None:
    _, reference_dir = reference_run
    args = cpu_run_args(tmp_path, tiny_model_dir, "sigterm", *CHECKPOINTING, "--set", "checkpoint.grace_seconds=60")
    job = JobProcess(*args)
    job.wait_for("checkpoint_committed", step=8)
    job.signal(signal.SIGTERM)
    assert job.wait() == 75
    decision = job.wait_for("preemption_signal")
    assert decision["decision"] == "finish_step_and_save"
    durable = job.wait_for("preempted")["newest_durable_step"]
    assert durable > 8  # the save on SIGTERM was made and committed
    run_dir = tmp_path / "outputs" / "sigterm"
    store = open_store(str(run_dir))
    committed, _ = stored_checkpoints(store)
    assert committed == [durable, 8]  # retention: exactly `keep` committed checkpoints
    assert not (run_dir / "final").exists()

    # Damage the newest checkpoint (flipped bytes): the restart falls back to step 8.
    weights = run_dir / checkpoint_prefix(durable) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))

    resumed = run_job(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.events("checkpoint_damaged_falling_back")[0]["step"] == durable
    assert resumed.events("resuming")[0]["step"] == 8
    assert_same_as_reference(reference_dir, run_dir)
    assert stored_checkpoints(store) == ([], {})  # deleted once the final model committed
    metrics = json.loads((run_dir / "final" / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 8


def test_sigkill_at_every_phase_of_a_save_on_s3(reference_run, tiny_model_dir, tmp_path, s3_bucket) -> None:
    """Each start is killed at a different point of a checkpoint's life; each restart recovers by itself."""
    _, reference_dir = reference_run
    output = f"{s3_bucket.uri}/runs"
    # A SIGKILLed start leaves its lease behind: the next start takes it after watching it unchanged for a TTL
    # and a half (12 s). 8 s, not the minimum 3: a holder on a loaded CI machine must still prove a renewal
    # within 0.8 TTL, or it stops writing (exit 75), as it should.
    args = [
        *cpu_run_args(tmp_path, tiny_model_dir, "killed", *CHECKPOINTING),
        *("--set", f"run.output={output}", "--set", "run.lease_ttl_seconds=8"),
    ]
    # (fault for this start, the checkpoint it must resume from)
    plan = [
        ("mid_upload@8", None),  # dies with half of checkpoint 8 uploaded: 4 is the newest committed
        ("before_manifest@12", 4),  # every file of 12 uploaded, no manifest: 8 is the newest committed
        ("mid_retention@8", 8),  # retiring 8 once 16 commits: its manifest deleted, not its files
        ("after_local_save@20", 16),  # 20 saved locally, never uploaded
    ]
    store = open_store(f"{output}/killed")
    removed = {}  # leftovers each start cleaned: what the previous crash left uncommitted
    for fault, expected_resume in plan:
        job = run_job(*args, env={"SFT_FAULTS": fault})
        assert fault == plan[0][0] or job.events("lease_taken_over")  # the killed start's lease, taken over
        removed[fault] = [e["step"] for e in job.events("uncommitted_checkpoint_removed")]
        assert job.returncode == -signal.SIGKILL, (fault, job.events("job_failed"), job.stderr[-2000:])
        assert job.events("fault_injected")
        resumed = job.events("resuming")
        assert (resumed[0]["step"] if resumed else None) == expected_resume
        committed, keys = stored_checkpoints(store)
        for step in committed:  # whatever a crash leaves, committed checkpoints are whole
            manifest = store.read_manifest(checkpoint_prefix(step))
            names = {k.rsplit("/", 1)[-1] for k in keys[step]}
            assert {e.name for e in manifest.files} | {MANIFEST_NAME} == names
    final = run_job(*args)
    assert final.returncode == 0, final.stderr[-3000:]
    assert final.events("lease_taken_over")
    assert final.events("resuming")[0]["step"] == 16
    # half of 8 (mid_upload), all of 12 but its manifest, 8's files after its manifest was retired
    assert removed == {
        "mid_upload@8": [],
        "before_manifest@12": [8],
        "mid_retention@8": [12],
        "after_local_save@20": [8],
    }
    (tmp_path / "final-run").mkdir()
    store.pull(tmp_path / "final-run" / "final", "final")
    assert_same_as_reference(reference_dir, tmp_path / "final-run")
    assert not [k for k in s3_bucket.list_keys("runs/killed/checkpoints")]


def test_sigterm_without_budget_exits_at_once_and_second_signal_too(tiny_model_dir, tmp_path) -> None:
    args = cpu_run_args(tmp_path, tiny_model_dir, "tight", *CHECKPOINTING, "--set", "checkpoint.grace_seconds=0.5")
    job = JobProcess(*args)
    job.wait_for("checkpoint_committed", step=4)
    signalled = time.monotonic()
    job.signal(signal.SIGTERM)
    assert job.wait() == 75
    assert time.monotonic() - signalled < 10
    assert job.wait_for("preemption_signal")["decision"] == "stop_now_without_saving"
    assert job.wait_for("preempted")["newest_durable_step"] == 4
    store = open_store(str(tmp_path / "outputs" / "tight"))
    assert stored_checkpoints(store)[0] == [4]  # no save was started after the signal

    # Two signals in a row: the second exits at once, leaving the committed checkpoint intact.
    args_roomy = [*args, "--set", "checkpoint.grace_seconds=60"]
    job = JobProcess(*args_roomy)
    job.wait_for("resuming", step=4)
    job.wait_for("training_started")
    job.signal(signal.SIGTERM)
    job.signal(signal.SIGTERM)
    assert job.wait() == 75
    assert job.events("second_signal_exiting_now") or job.events("preempted")
    manifest = store.read_manifest(checkpoint_prefix(4))
    from job.storage.manifest import verify_directory

    assert verify_directory(tmp_path / "outputs" / "tight" / checkpoint_prefix(4), manifest) == []

    # Config drift: a restart with other hyper-parameters is refused, naming the difference.
    drift = run_job(*args, "--set", "train.learning_rate=1e-3")
    assert drift.returncode == 64
    assert "train.learning_rate: 0.003 -> 0.001" in drift.events("job_failed")[0]["error"]
    allowed = JobProcess(*args, "--set", "train.learning_rate=1e-3", "--allow-config-change")
    allowed.wait_for("config_changed_allowed")
    allowed.wait_for("training_started")
    allowed.signal(signal.SIGTERM)
    assert allowed.wait() == 75
    assert list((tmp_path / "outputs" / "tight" / "config-changes").glob("*.yaml"))


def test_one_writer_per_run(tiny_model_dir, tmp_path) -> None:
    """A live holder keeps the run (the second process exits 69); a dead one's lease is taken over."""
    args = [
        *cpu_run_args(tmp_path, tiny_model_dir, "leased", *CHECKPOINTING),
        "--set", "run.lease_ttl_seconds=8",
        "--set", "train.max_steps=400",
    ]  # fmt: skip
    first = JobProcess(*args)
    first.wait_for("training_started")
    second = run_job(*args)
    assert second.returncode == 69
    assert second.events("lease_held_waiting")
    assert "kept renewing its lease" in second.events("job_failed")[0]["error"]
    first.signal(signal.SIGKILL)
    first.wait()
    third = JobProcess(*args)
    taken = third.wait_for("lease_taken_over")
    assert taken["previous_holder"] == first.wait_for("lease_acquired")["holder"]
    third.wait_for("training_started")
    third.signal(signal.SIGTERM)
    assert third.wait() == 75


def test_sigterm_before_training_still_exits_75(tiny_model_dir, tmp_path) -> None:
    """A preemption while data and model are pulled (long on a 7B) is a preemption too, not a crash."""
    job = JobProcess(*cpu_run_args(tmp_path, tiny_model_dir, "early"))
    job.wait_for("lease_acquired")
    job.signal(signal.SIGTERM)
    assert job.wait() == 75, job.raw[-5:]
    assert job.wait_for("preemption_signal")["decision"] == "stop_now_without_saving"
    assert job.wait_for("preempted")["newest_durable_step"] is None
    assert not job.events("training_started")


class OutageProxy:
    """A TCP relay to the S3 server that goes down the first time a request line starts with `trigger`
    (every open connection cut, every new one refused) until `restore()`: a real outage at an exact point."""

    def __init__(self, upstream: str, trigger: bytes) -> None:
        host, port = upstream.removeprefix("http://").rsplit(":", 1)
        self.upstream, self.trigger = (host, int(port)), trigger
        self.down = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def restore(self) -> None:
        self.down.clear()

    def close(self) -> None:
        self.server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.down.is_set():
                client.close()
                continue
            upstream = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, requests: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                trigger = self.trigger
                if requests and trigger and (data.startswith(trigger) or b"\r\n" + trigger in data):
                    self.trigger = b""  # once: after restore() the store stays up
                    self.down.set()
                if self.down.is_set():
                    break
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()


def test_store_outage_between_the_last_commit_and_the_final_manifest(
    reference_run, tiny_model_dir, tmp_path, seaweedfs_bucket
) -> None:
    """The final step's checkpoint commits, the store goes down as publish begins (69); the retry resumes at
    the final step and publishes exactly the uninterrupted run's weights, training no step past the end.
    On SeaweedFS: a real store's conditional writes and listings (the SIGKILL test above runs on moto)."""
    _, reference_dir = reference_run
    proxy = OutageProxy(seaweedfs_bucket.endpoint, f"PUT /{seaweedfs_bucket.name}/runs/outage/final/".encode())
    args = [
        *cpu_run_args(tmp_path, tiny_model_dir, "outage", "--set", "checkpoint.every_steps=12"),
        *("--set", f"run.output={seaweedfs_bucket.uri}/runs", "--set", f"storage.endpoint_url={proxy.endpoint}"),
        *("--set", "storage.max_attempts=2", "--set", "storage.connect_timeout=2", "--set", "run.lease_ttl_seconds=8"),
    ]
    try:
        failed = run_job(*args)
        assert failed.returncode == 69, failed.stderr[-3000:]
        assert proxy.down.is_set()
        assert max(e["step"] for e in failed.events("checkpoint_committed")) == 24
        proxy.restore()
        resumed = run_job(*args)
    finally:
        proxy.close()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.events("resuming")[0]["step"] == 24 and resumed.events("resumed_at_final_step")
    assert not resumed.events("step")  # not one step trained past the end
    (tmp_path / "got").mkdir()
    open_store(f"{seaweedfs_bucket.uri}/runs/outage").pull(tmp_path / "got" / "final", "final")
    assert_same_as_reference(reference_dir, tmp_path / "got")
