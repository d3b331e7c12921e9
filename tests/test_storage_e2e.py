"""End to end over S3: `entrypoint.py train` whose data, model and output are all s3:// URIs.

The job runs as a subprocess, exactly as in a container, with the standard AWS_* variables
pointing at the session's moto server on loopback.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from conftest import DEMO_EVAL, DEMO_TRAIN, REPO, run_job
from job.storage.manifest import MANIFEST_NAME, Manifest

pytestmark = pytest.mark.slow


def upload_tree(bucket, local: Path, prefix: str) -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        bucket.put(f"{prefix}/{path.relative_to(local).as_posix()}", path.read_bytes())


def s3_train_args(bucket, scratch: Path, name: str) -> list[str]:
    return [
        "train",
        "--config", str(REPO / "examples" / "cpu-demo.yaml"),
        "--set", f"run.name={name}",
        "--set", f"run.output={bucket.uri}/runs",
        "--set", f"run.scratch={scratch}",
        "--set", f"model.source={bucket.uri}/models/tiny-mistral/",
        "--set", f"data.train={bucket.uri}/data/train.jsonl",
        "--set", f"data.eval={bucket.uri}/data/eval/",
        "--set", "model.dtype=float32",
        "--set", "train.max_steps=3",
        "--set", "storage.multipart_threshold_mb=5",
        "--set", "storage.multipart_chunksize_mb=5",
    ]  # fmt: skip


def test_train_with_data_model_and_output_on_s3(s3_bucket, tiny_model_dir, tmp_path):
    upload_tree(s3_bucket, tiny_model_dir, "models/tiny-mistral")
    s3_bucket.put("data/train.jsonl", DEMO_TRAIN.read_bytes())
    s3_bucket.put("data/eval/part-000.jsonl", DEMO_EVAL.read_bytes())  # a prefix of shards
    args = s3_train_args(s3_bucket, tmp_path / "scratch", "s3-run")

    result = run_job(*args)

    assert result.returncode == 0, result.stderr[-4000:]
    final = "runs/s3-run/final/"
    keys = s3_bucket.list_keys(final)
    assert final + MANIFEST_NAME in keys
    manifest = Manifest.from_json(s3_bucket.get(final + MANIFEST_NAME))
    assert {final + entry.name for entry in manifest.files} | {final + MANIFEST_NAME} == set(keys)
    assert any(entry.name.endswith(".safetensors") for entry in manifest.files)
    pulled = {event["uri"] for event in result.events("storage_pull_done")}
    sources = {f"{s3_bucket.uri}/{path}" for path in ("models/tiny-mistral/", "data/train.jsonl", "data/eval/")}
    assert sources <= pulled, pulled
    assert result.events("storage_push_done")

    again = run_job(*args)  # a finished run is recognised from its committed manifest in the store
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.events("already_complete")


def test_train_exits_69_when_the_store_is_unreachable(s3_bucket, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    args = [
        *s3_train_args(s3_bucket, tmp_path / "scratch", "unreachable"),
        "--set", f"storage.endpoint_url={dead}",
        "--set", "storage.max_attempts=2",
        "--set", "storage.connect_timeout=1",
    ]  # fmt: skip
    result = run_job(*args)
    assert result.returncode == 69, result.stderr[-4000:]
    assert s3_bucket.list_keys("runs/") == []
