"""The storage interface's rules on the local store, and the pieces that need no server."""

from __future__ import annotations

import logging
import multiprocessing

import pytest
from structlog.testing import capture_logs

from job.config.schema import StorageConfig
from job.errors import ConfigError, DataError, InputNotFound
from job.storage import AlreadyCommitted, AlreadyExists, LocalStore, ObjectInfo, fetch_input, open_store, read_text
from job.storage.base import ETagMismatch, delete_order, plan_pull
from job.storage.manifest import MANIFEST_NAME, verify_directory
from job.storage.progress import Progress


def test_open_store_picks_the_implementation(tmp_path):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    with pytest.raises(ConfigError, match="unsupported storage URI"):
        open_store("gs://bucket/x")


def test_local_push_pull_round_trip(tmp_path):
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "a.bin").write_bytes(b"a" * 10)
    (source / "sub" / "b.txt").write_text("b")
    store = LocalStore(tmp_path / "store")
    manifest = store.push_directory(source, "ck/checkpoint-000001", meta={"step": 1})
    assert store.is_committed("ck/checkpoint-000001")
    assert [e.name for e in manifest.files] == ["a.bin", "sub/b.txt"]
    with pytest.raises(AlreadyCommitted):
        store.push_directory(source, "ck/checkpoint-000001")
    paths = store.child("ck").pull(tmp_path / "back", "checkpoint-000001")
    assert sorted(p.name for p in paths) == [MANIFEST_NAME, "a.bin", "b.txt"]
    assert verify_directory(tmp_path / "back", manifest) == []


def test_local_conditional_writes(tmp_path):
    store = LocalStore(tmp_path)
    etag = store.write_bytes("lease.json", b"1", if_absent=True)
    with pytest.raises(AlreadyExists):
        store.write_bytes("lease.json", b"2", if_absent=True)
    assert store.read_bytes_with_etag("lease.json") == (b"1", etag)
    new = store.write_bytes_if_match("lease.json", b"3", etag)
    with pytest.raises(ETagMismatch):
        store.write_bytes_if_match("lease.json", b"4", etag)
    assert store.write_bytes_if_match("lease.json", b"5", new)
    with pytest.raises(ETagMismatch):
        store.write_bytes_if_match("absent.json", b"x", etag)
    assert [i.key for i in store.list()] == ["lease.json"]  # no lock or partial files listed


def _renew(root: str, rounds: int, queue) -> None:
    store, wins = LocalStore(root), 0
    for _ in range(rounds):
        data, etag = store.read_bytes_with_etag("lease.json")
        try:
            store.write_bytes_if_match("lease.json", str(int(data) + 1).encode(), etag)
            wins += 1
        except ETagMismatch:
            pass
    queue.put(wins)


def test_local_compare_and_swap_across_processes(tmp_path):
    """Two processes renewing one lease: every successful swap is counted exactly once."""
    LocalStore(tmp_path).write_bytes("lease.json", b"0")
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_renew, args=(str(tmp_path), 40, queue)) for _ in range(2)]
    for worker in workers:
        worker.start()
    wins = [queue.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    assert int((tmp_path / "lease.json").read_bytes()) == sum(wins)


def test_local_abort_incomplete_uploads(tmp_path):
    store = LocalStore(tmp_path)
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / ".w.bin.partial-123").write_bytes(b"half")
    (tmp_path / "ck" / "done.bin").write_bytes(b"whole")
    assert store.abort_incomplete_uploads("ck") == 1
    assert [i.key for i in store.list("ck")] == ["ck/done.bin"]


def test_fetch_input_local_and_missing(tmp_path):
    (tmp_path / "train.jsonl").write_text("{}\n")
    assert fetch_input(str(tmp_path / "train.jsonl"), tmp_path) == tmp_path / "train.jsonl"
    with pytest.raises(InputNotFound):
        fetch_input(str(tmp_path / "nope.jsonl"), tmp_path)
    (tmp_path / "c.yaml").write_text("run: {}\n")
    assert read_text(str(tmp_path / "c.yaml")) == "run: {}\n"


def info(key: str, size: int = 1) -> ObjectInfo:
    return ObjectInfo(key, size, "e")


@pytest.mark.parametrize(
    "key",
    ["p/../x", "p/a/../../x", "p//etc/x", "p/./x", "p/a\\b", "p/a\x00b", "p/" + "n" * 256, "p/a//b"],
)
def test_plan_pull_refuses_escaping_keys(key):
    with pytest.raises(DataError, match="refusing object key"):
        plan_pull([info("p/ok"), info(key)], "p")


def test_plan_pull_skips_markers_and_keeps_relative_paths():
    plan = plan_pull([info("p/", 0), info("p/d/", 0), info("p/d/x"), info("p/y")], "p/")
    assert [(i.key, str(rel)) for i, rel in plan] == [("p/d/x", "d/x"), ("p/y", "y")]
    with pytest.raises(DataError, match="non-empty object named like a directory"):
        plan_pull([info("p/d/", 5)], "p")
    with pytest.raises(DataError, match="file and directory"):
        plan_pull([info("p/d"), info("p/d/x")], "p")
    assert [str(rel) for _, rel in plan_pull([info("a/b")], "")] == ["a/b"]
    with pytest.raises(DataError):
        plan_pull([info("/etc/x")], "")


def test_delete_order_puts_manifests_first():
    keys = ["c/a.bin", "c/MANIFEST.json", "d/MANIFEST.json", "c/z.bin"]
    assert delete_order(keys) == [["c/MANIFEST.json", "d/MANIFEST.json"], ["c/a.bin", "c/z.bin"]]


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({"multipart_chunksize_mb": 4}, "at least 5 MiB"),
        ({"multipart_chunksize_mb": 6000}, "at most 5120"),
        ({"max_attempts": 0}, "at least 1"),
        ({"read_timeout": 0}, "positive"),
        ({"progress_interval_seconds": 0}, "positive"),
        ({"endpoint_url": "minio:9000"}, "not an http"),
    ],
)
def test_storage_config_checks(values, words):
    with pytest.raises(ConfigError, match=words):
        StorageConfig(**values)


def test_s3_uri_parsing_and_redaction():
    from job.storage.s3_client import parse_s3_uri, redact_url

    assert parse_s3_uri("s3://my-bucket/a/b/") == ("my-bucket", "a/b")
    assert parse_s3_uri("s3://my-bucket") == ("my-bucket", "")
    for bad in ("s3://ab/x", "s3://Upper/x", "s3:///x"):
        with pytest.raises(ConfigError, match="valid bucket"):
            parse_s3_uri(bad)
    assert redact_url("https://AKIA:secret@minio.local:9000/") == "https://minio.local:9000/"


def test_redaction_filter_scrubs_tokens_in_sdk_records(caplog):
    from job.storage.s3_client import RedactSecrets, attach_log_filter

    RedactSecrets.secrets.add("s3cr3t-value-for-test")
    attach_log_filter()
    caplog.set_level(logging.DEBUG)
    sdk = logging.getLogger("botocore.endpoint")
    sdk.debug("headers={'X-Amz-Security-Token': b'tok123'} %s", "s3cr3t-value-for-test")
    logging.getLogger("job.other").debug("s3cr3t-value-for-test")  # not an SDK logger: untouched
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "headers={'X-Amz-Security-Token': b'***'} ***"
    assert messages[1] == "s3cr3t-value-for-test"


def test_progress_summary_and_failure_lines():
    with capture_logs() as logs, Progress("pull", "s3://b/x", 10, 1.0, files=1) as progress:
        progress.add(10)
    assert [e["event"] for e in logs] == ["storage_pull_done"]
    assert logs[0]["bytes"] == 10 and logs[0]["files"] == 1
    with capture_logs() as logs, pytest.raises(RuntimeError), Progress("push", "s3://b/x", 10, 1.0):
        raise RuntimeError("boom")
    assert logs[0]["event"] == "storage_push_failed" and logs[0]["error_type"] == "RuntimeError"


def test_stalled_transfer_still_reports():
    """The reporter is a timer, not a byte callback: a stall shows up as 0 MB/s lines."""
    import time

    with capture_logs() as logs, Progress("push", "s3://b/x", 100 * 2**20, 0.02) as progress:
        progress.add(2**20)
        time.sleep(0.15)
    lines = [e for e in logs if e["event"] == "storage_push_progress"]
    assert len(lines) >= 3 and lines[-1]["mb_s"] == 0.0 and lines[-1]["eta_s"] is not None
