"""Checkpoint store rules: commit, verify and fall back, clean leftovers, retention, the lease's fence,
store errors that keep their exit codes, and pickles that Trainer's resume would refuse."""

from __future__ import annotations

import os
import shlex
import shutil
import time
from pathlib import Path

import pytest
import torch
from structlog.testing import capture_logs

from job.durability.checkpoints import (
    CheckpointUploader,
    checkpoint_prefix,
    clean_leftovers,
    prepare_resume,
    stored_checkpoints,
)
from job.durability.lease import Lease
from job.errors import AccessDenied, DataError, InputNotFound, LeaseLost
from job.storage import LocalStore, open_store, s3_client
from job.storage.manifest import MANIFEST_NAME
from s3_fixtures import aws_env


def fake_checkpoint(root: Path, step: int, size: int = 1000) -> Path:
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(bytes([step % 256]) * size)
    torch.save({"state": {0: {"exp_avg": torch.full((4,), float(step))}}}, folder / "optimizer.pt")
    (folder / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    return folder


def upload_all(store, local: Path, steps: list[int], keep: int = 10) -> CheckpointUploader:
    uploader = CheckpointUploader(store, keep)
    for step in steps:
        uploader.submit(step, fake_checkpoint(local, step))
    assert uploader.close(timeout=60) and uploader.error is None
    return uploader


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store" / "run")
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"{bucket.uri}/runs/run", request.getfixturevalue("s3_settings"))


def test_upload_commits_with_manifest_last_and_retains_keep(store, tmp_path) -> None:
    uploader = upload_all(store, tmp_path / "local", [4, 8, 12], keep=2)
    committed, keys = stored_checkpoints(store)
    assert committed == [12, 8] and set(keys) == {8, 12}
    assert uploader.newest_committed == 12
    assert [p.name for p in (tmp_path / "local").iterdir()] == ["checkpoint-12"]  # older local copies removed
    manifest = store.read_manifest(checkpoint_prefix(12))
    assert manifest.meta == {"step": 12}
    assert sorted(e.name for e in manifest.files) == ["model.safetensors", "optimizer.pt", "trainer_state.json"]


def test_resume_picks_newest_that_verifies(store, tmp_path) -> None:
    upload_all(store, tmp_path / "local", [4, 8, 12, 16])
    # 16: a file truncated; 12: no manifest (a killed upload); 8: bytes flipped; 4: intact.
    prefix16 = checkpoint_prefix(16)
    store.write_bytes(f"{prefix16}/model.safetensors", b"\x10" * 10)
    store.delete([f"{checkpoint_prefix(12)}/{MANIFEST_NAME}"])
    store.write_bytes(f"{checkpoint_prefix(8)}/optimizer.pt", b"x" * 100)  # sha256 differs from the manifest
    found = prepare_resume(store, tmp_path / "resume")
    assert found is not None and found[0] == 4
    assert (found[1] / "trainer_state.json").read_text() == '{"global_step": 4}'


def test_no_committed_checkpoint_means_fresh_start(store, tmp_path) -> None:
    assert prepare_resume(store, tmp_path / "resume") is None


def test_clean_leftovers_removes_uncommitted_prefixes_and_local_folders(store, tmp_path) -> None:
    upload_all(store, tmp_path / "local", [4, 8])
    store.delete([f"{checkpoint_prefix(8)}/{MANIFEST_NAME}"])
    store.upload_file(
        fake_checkpoint(tmp_path / "partial", 12) / "optimizer.pt", f"{checkpoint_prefix(12)}/optimizer.pt"
    )
    fake_checkpoint(tmp_path / "trainer", 9)
    killed_write = fake_checkpoint(tmp_path / "trainer", 10)  # a background write SIGKILLed mid-way
    killed_write.rename(killed_write.with_name("checkpoint-10.partial-4242"))
    (tmp_path / "trainer" / "README.md").write_text("not a checkpoint")
    clean_leftovers(store, tmp_path / "trainer")
    committed, keys = stored_checkpoints(store)
    assert committed == [4] and set(keys) == {4}
    assert [p.name for p in (tmp_path / "trainer").iterdir()] == ["README.md"]


def test_nodes_upload_their_parts_and_node_0_commits_once_all_are_durable(store, tmp_path) -> None:
    """Two nodes' uploaders: node 0's files alone do not commit; node 1's part completes the checkpoint."""
    node0 = CheckpointUploader(store, keep=10, node_rank=0, nnodes=2, parts_timeout=30)
    node0.submit(4, fake_checkpoint(tmp_path / "node0", 4))
    assert not node0.wait(timeout=1.5)  # waiting for node 1's part
    assert stored_checkpoints(store)[0] == []
    node1_dir = tmp_path / "node1" / "checkpoint-4"
    node1_dir.mkdir(parents=True)
    torch.save({"cpu": torch.random.get_rng_state()}, node1_dir / "rng_state_1.pth")
    node1 = CheckpointUploader(store, keep=10, node_rank=1, nnodes=2)
    node1.submit(4, node1_dir)
    assert node1.close(timeout=30) and node1.error is None
    assert node0.close(timeout=30) and node0.error is None
    assert stored_checkpoints(store)[0] == [4]
    names = {entry.name for entry in store.read_manifest(checkpoint_prefix(4)).files}
    assert names == {"model.safetensors", "optimizer.pt", "trainer_state.json", "rng_state_1.pth"}
    assert prepare_resume(store, tmp_path / "resume") is not None  # verifies every node's file


def test_a_node_whose_files_disagree_with_node_0_leaves_the_checkpoint_uncommitted(tmp_path) -> None:
    store = LocalStore(tmp_path / "store")
    node1_dir = fake_checkpoint(tmp_path / "node1", 8)
    (node1_dir / "optimizer.pt").write_bytes(b"different")  # a shared scratch written twice, say
    node1 = CheckpointUploader(store, keep=10, node_rank=1, nnodes=2)
    node1.submit(8, node1_dir)
    assert node1.close(timeout=30) and node1.error is None
    node0 = CheckpointUploader(store, keep=10, node_rank=0, nnodes=2, parts_timeout=30)
    node0.submit(8, fake_checkpoint(tmp_path / "node0", 8))
    assert node0.close(timeout=30)
    assert "other content than node 0" in str(node0.error)
    assert stored_checkpoints(store)[0] == []


def test_a_node_that_never_uploads_fails_the_commit_after_the_timeout(tmp_path) -> None:
    store = LocalStore(tmp_path / "store")
    node0 = CheckpointUploader(store, keep=10, node_rank=0, nnodes=3, parts_timeout=1.0)
    node0.submit(4, fake_checkpoint(tmp_path / "node0", 4))
    assert node0.close(timeout=30)
    assert "node 1's checkpoint files did not arrive" in str(node0.error)
    assert stored_checkpoints(store)[0] == []


# ---------------------------------------------------------------- the lease's fence


def test_an_uploader_whose_lease_is_lost_commits_and_retires_nothing(store, tmp_path) -> None:
    lease = Lease(store, ttl=2)
    lease.acquire()
    try:
        uploader = CheckpointUploader(store, keep=1, fence=lease.ensure_held)
        uploader.submit(4, fake_checkpoint(tmp_path / "local", 4))
        assert uploader.wait(timeout=30) and uploader.error is None
        lease._stop.set()  # a stalled heartbeat: no renewal is proven any more
        deadline = time.monotonic() + 5
        while lease.held():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        uploader.submit(8, fake_checkpoint(tmp_path / "local", 8))
        assert uploader.close(timeout=30)
        committed, keys = stored_checkpoints(store)
        assert committed == [4] and set(keys) == {4}  # 8 not written at all, 4 not retired
        with pytest.raises(LeaseLost) as lost:
            uploader.submit(12, fake_checkpoint(tmp_path / "local", 12))
        assert lost.value.exit_code == 75 and "background upload of checkpoint step 8" in str(lost.value)
    finally:
        lease.release()


def lose_at(call: int) -> tuple[list[int], object]:
    """A fence that lets `call - 1` writes through, then says the lease is lost."""
    calls: list[int] = []

    def fence() -> None:
        calls.append(len(calls) + 1)
        if len(calls) >= call:
            raise LeaseLost("lost the lease (test)")

    return calls, fence


@pytest.mark.parametrize(
    ("lost_at", "files_of_8", "committed"),
    [(1, False, [4]), (2, True, [4]), (3, True, [8, 4])],
    ids=["before-the-files", "before-the-commit", "before-retention"],
)
def test_the_fence_is_checked_before_files_commit_and_each_retirement(
    tmp_path, lost_at: int, files_of_8: bool, committed: list[int]
) -> None:
    store = LocalStore(tmp_path / "store")
    upload_all(store, tmp_path / "first", [4])
    calls, fence = lose_at(lost_at)
    uploader = CheckpointUploader(store, keep=1, fence=fence)
    uploader.submit(8, fake_checkpoint(tmp_path / "local", 8))
    assert uploader.close(timeout=30) and isinstance(uploader.error, LeaseLost)
    assert len(calls) == lost_at
    assert stored_checkpoints(store)[0] == committed
    assert bool(store.list(checkpoint_prefix(8))) is files_of_8


# ---------------------------------------------------------------- store errors keep their exit codes


def test_a_deleted_bucket_surfaces_as_input_not_found(s3_bucket, s3_settings, tmp_path) -> None:
    store = open_store(f"{s3_bucket.uri}/runs/run", s3_settings)
    uploader = CheckpointUploader(store, keep=2)
    uploader.submit(4, fake_checkpoint(tmp_path / "local", 4))
    assert uploader.wait(timeout=30) and uploader.error is None
    for key in s3_bucket.list_keys():
        s3_bucket.client.delete_object(Bucket=s3_bucket.name, Key=key)
    s3_bucket.client.delete_bucket(Bucket=s3_bucket.name)
    uploader.submit(8, fake_checkpoint(tmp_path / "local", 8))
    assert uploader.close(timeout=60)
    with pytest.raises(InputNotFound) as missing:
        uploader.raise_if_failed()  # as the end of training does
    assert missing.value.exit_code == 66 and "background upload of checkpoint step 8" in str(missing.value)
    with pytest.raises(InputNotFound):
        uploader.submit(12, tmp_path / "local" / "checkpoint-8")


def test_denied_credentials_surface_as_access_denied(moto_auth, s3_settings, monkeypatch, tmp_path) -> None:
    aws_env(monkeypatch, tmp_path, moto_auth.endpoint, *moto_auth.nobody)
    s3_client.reset_connections()
    try:
        store = open_store(f"s3://{moto_auth.bucket}/runs/denied", s3_settings)
        uploader = CheckpointUploader(store, keep=2)
        uploader.submit(4, fake_checkpoint(tmp_path / "local", 4))
        assert uploader.close(timeout=60)
        with pytest.raises(AccessDenied) as denied:
            uploader.submit(8, fake_checkpoint(tmp_path / "local", 8))
        assert denied.value.exit_code == 77 and "background upload of checkpoint step 4" in str(denied.value)
    finally:
        s3_client.reset_connections()


# ---------------------------------------------------------------- pickles Trainer's resume would refuse


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory, tiny_model_dir) -> Path:
    """checkpoint-2 of a tiny run through the job's own trainer (its default optimizer, RNG states, scheduler)."""
    import datasets
    from transformers import AutoModelForCausalLM

    from job.config.load import load_config
    from job.model.load import ModelSource, load_tokenizer
    from job.train.fastpath import choose_fast_path, detect_device
    from job.train.trainer import build_trainer

    out = tmp_path_factory.mktemp("trained")
    overrides = ["data.train=train.jsonl", "model.dtype=float32", "train.max_steps=2", "checkpoint.every_steps=2"]
    config = load_config(None, [*overrides, "train.per_device_train_batch_size=2", "train.logging_steps=1"], environ={})
    rows = [list(range(5 + i, 17 + i)) for i in range(8)]
    dataset = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = load_tokenizer(ModelSource(str(tiny_model_dir), "local", None), config.model)
    trainer, _ = build_trainer(
        config, model, tokenizer, dataset, None, out, choose_fast_path(config, detect_device("cpu"))
    )
    trainer.train()
    return out / "checkpoint-2"


class Boom:
    """A pickled object whose loading would run a command: `weights_only` must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def copy_of(checkpoint: Path, root: Path, step: int) -> Path:
    return Path(shutil.copytree(checkpoint, root / f"checkpoint-{step}"))


def test_a_real_checkpoint_is_accepted_and_an_unsafe_pickle_falls_back(store, real_checkpoint, tmp_path) -> None:
    pickled = sorted(p.name for p in real_checkpoint.iterdir() if p.suffix in (".pt", ".pth"))
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth"} <= set(pickled)
    marker = tmp_path / "ran"
    uploader = CheckpointUploader(store, keep=10)
    uploader.submit(4, copy_of(real_checkpoint, tmp_path / "local", 4))
    unsafe = copy_of(real_checkpoint, tmp_path / "local", 8)
    torch.save({"state": {}, "param_groups": [], "extra": Boom(marker)}, unsafe / "optimizer.pt")
    uploader.submit(8, unsafe)  # committed with a manifest that matches: only the load can tell
    assert uploader.close(timeout=60) and uploader.error is None
    assert stored_checkpoints(store)[0] == [8, 4]
    with capture_logs() as logs:
        found = prepare_resume(store, tmp_path / "resume")
    assert found is not None and found[0] == 4  # the real checkpoint loads as Trainer loads it
    (refused,) = [e for e in logs if e["event"] == "checkpoint_unsafe_falling_back"]
    assert refused["step"] == 8 and refused["file"] == "optimizer.pt" and "system" in refused["reason"]
    assert len(refused["reason"]) <= 200
    assert stored_checkpoints(store)[0] == [8, 4]  # never deleted
    assert not marker.exists()


def test_only_unsafe_checkpoints_stop_the_start_with_a_data_error(store, real_checkpoint, tmp_path) -> None:
    unsafe = copy_of(real_checkpoint, tmp_path / "local", 6)
    torch.save({"python": Boom(tmp_path / "ran")}, unsafe / "rng_state.pth")
    upload_all_dirs = CheckpointUploader(store, keep=10)
    upload_all_dirs.submit(6, unsafe)
    assert upload_all_dirs.close(timeout=60) and upload_all_dirs.error is None
    with pytest.raises(DataError) as refused:
        prepare_resume(store, tmp_path / "resume")
    message = str(refused.value)
    assert refused.value.exit_code == 65
    assert f"{checkpoint_prefix(6)}/rng_state.pth" in message and "delete the checkpoint prefix" in message
    assert stored_checkpoints(store)[0] == [6]
    assert not (tmp_path / "ran").exists()
