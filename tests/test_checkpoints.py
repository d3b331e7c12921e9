"""Checkpoint store rules without training: commit, verify and fall back, clean leftovers, retention."""

from __future__ import annotations

from pathlib import Path

import pytest

from job.durability.checkpoints import (
    CheckpointUploader,
    check_scratch_space,
    checkpoint_prefix,
    clean_leftovers,
    prepare_resume,
    stored_checkpoints,
)
from job.errors import ConfigError
from job.storage import LocalStore, open_store
from job.storage.manifest import MANIFEST_NAME


def fake_checkpoint(root: Path, step: int, size: int = 1000) -> Path:
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(bytes([step % 256]) * size)
    (folder / "optimizer.pt").write_bytes(b"o" * 100)
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
    store.write_bytes(f"{checkpoint_prefix(8)}/optimizer.pt", b"x" * 100)
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
    clean_leftovers(store, tmp_path / "trainer")
    committed, keys = stored_checkpoints(store)
    assert committed == [4] and set(keys) == {4}
    assert not list((tmp_path / "trainer").iterdir())


def test_scratch_space_check_names_the_size_needed(tmp_path) -> None:
    check_scratch_space(tmp_path, checkpoint_bytes=1024, model_bytes_to_pull=0)
    with pytest.raises(ConfigError) as info:
        check_scratch_space(tmp_path, checkpoint_bytes=2**60, model_bytes_to_pull=0)
    assert "needs about" in str(info.value) and "GiB" in str(info.value) and info.value.exit_code == 64


def test_nodes_upload_their_parts_and_node_0_commits_once_all_are_durable(store, tmp_path) -> None:
    """Two nodes' uploaders: node 0's files alone do not commit; node 1's part completes the checkpoint."""
    node0 = CheckpointUploader(store, keep=10, node_rank=0, nnodes=2, parts_timeout=30)
    node0.submit(4, fake_checkpoint(tmp_path / "node0", 4))
    assert not node0.wait(timeout=1.5)  # waiting for node 1's part
    assert stored_checkpoints(store)[0] == []
    node1_dir = tmp_path / "node1" / "checkpoint-4"
    node1_dir.mkdir(parents=True)
    (node1_dir / "rng_state_1.pth").write_bytes(b"r" * 10)
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
