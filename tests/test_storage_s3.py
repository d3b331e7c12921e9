"""S3Store against real S3 protocol endpoints on 127.0.0.1: moto's server mode, and SeaweedFS (`any_s3_bucket`)
for the conditional writes, listing and transfers; moto alone where a fault is injected through the client."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from job.config.schema import StorageConfig
from job.errors import DataError, InputNotFound
from job.storage import AlreadyCommitted, AlreadyExists, fetch_input, open_store, read_text
from job.storage.base import ETagMismatch
from job.storage.manifest import MANIFEST_NAME, Manifest, verify_directory
from job.storage.s3 import S3Store, pull_uri
from job.storage.s3_sync import PULL_RECORD, hash_file

MIB = 1024 * 1024


def make_tree(root: Path) -> dict[str, bytes]:
    """Nested files, two above the 5 MiB multipart threshold (one of them 3 parts, one exactly 2)."""
    files = {
        "config.json": b'{"model_type": "mistral"}',
        "model-00001-of-00002.safetensors": os.urandom(12 * MIB + 123),
        "sub/dir/model-00002-of-00002.safetensors": os.urandom(10 * MIB),
        "sub/tokenizer.json": b"{}" * 1000,
        "empty.txt": b"",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def test_push_pull_round_trip_nested_and_multipart(any_s3_bucket, s3_settings, tmp_path):
    source = tmp_path / "src"
    files = make_tree(source)
    store = open_store(f"{any_s3_bucket.uri}/runs/r1", s3_settings)
    assert isinstance(store, S3Store)

    manifest = store.push_directory(source, "checkpoints/checkpoint-000010", meta={"step": 10})

    prefix = "runs/r1/checkpoints/checkpoint-000010/"
    assert any_s3_bucket.list_keys(prefix) == sorted(prefix + name for name in [*files, MANIFEST_NAME])
    big = any_s3_bucket.client.head_object(Bucket=any_s3_bucket.name, Key=prefix + "model-00001-of-00002.safetensors")
    assert big["ETag"].strip('"').endswith("-3")  # really went up in 5 MiB parts
    stored = Manifest.from_json(any_s3_bucket.get(prefix + MANIFEST_NAME))
    assert stored.meta == {"step": 10}
    assert {e.name: e.sha256 for e in stored.files} == {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}
    assert manifest.total_bytes == sum(len(d) for d in files.values())

    checkpoint = store.child("checkpoints/checkpoint-000010")
    assert checkpoint.is_committed()
    destination = tmp_path / "dst"
    paths = checkpoint.pull(destination)
    assert sorted(p.relative_to(destination).as_posix() for p in paths) == sorted([*files, MANIFEST_NAME])
    for name, data in files.items():
        assert (destination / name).read_bytes() == data
    assert verify_directory(destination, checkpoint.read_manifest()) == []


def test_local_etag_computation_matches_the_store(any_s3_bucket, s3_settings, tmp_path):
    """The ETag we predict for verification is what S3 computes, single-part and multipart alike."""
    threshold, chunk = 5 * MIB, 5 * MIB
    store = S3Store(any_s3_bucket.uri, s3_settings)
    for size in (0, 1, threshold - 1, threshold, 2 * chunk, 2 * chunk + 7):
        path = tmp_path / f"f{size}"
        path.write_bytes(os.urandom(size))
        store.upload_file(path, path.name)
        stored = any_s3_bucket.client.head_object(Bucket=any_s3_bucket.name, Key=path.name)["ETag"].strip('"')
        assert hash_file(path, threshold, chunk)[2] == stored, size


def test_committed_prefix_is_never_overwritten(any_s3_bucket, s3_settings, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"first")
    store = S3Store(any_s3_bucket.uri, s3_settings)
    store.push_directory(tmp_path / "a", "final")
    (tmp_path / "a" / "x.bin").write_bytes(b"second")
    with pytest.raises(AlreadyCommitted):
        store.push_directory(tmp_path / "a", "final")
    assert any_s3_bucket.get("final/x.bin") == b"first"


def test_second_writer_loses_the_commit_race(s3_bucket, s3_settings, tmp_path):
    """The manifest is written with IfNoneMatch: a commit that lands just before ours is not replaced."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"ours")
    store = S3Store(s3_bucket.uri, s3_settings)

    def other_writer_commits_first(params, **kwargs):
        if params["Key"].endswith(MANIFEST_NAME):
            s3_bucket.put(params["Key"], b"theirs")

    store.client.meta.events.register("before-parameter-build.s3.PutObject", other_writer_commits_first)
    with pytest.raises(AlreadyCommitted):
        store.push_directory(tmp_path / "a", "final")
    assert s3_bucket.get("final/MANIFEST.json") == b"theirs"


def test_conditional_writes(any_s3_bucket, s3_settings):
    store = S3Store(f"{any_s3_bucket.uri}/run", s3_settings)
    etag = store.write_bytes("lease.json", b'{"owner": "a"}', if_absent=True)
    with pytest.raises(AlreadyExists):
        store.write_bytes("lease.json", b'{"owner": "b"}', if_absent=True)
    data, current = store.read_bytes_with_etag("lease.json")
    assert (data, current) == (b'{"owner": "a"}', etag)
    new = store.write_bytes_if_match("lease.json", b'{"owner": "a", "beat": 2}', etag)
    assert new != etag
    with pytest.raises(ETagMismatch):  # a stale ETag: someone else renewed meanwhile
        store.write_bytes_if_match("lease.json", b'{"owner": "b"}', etag)
    with pytest.raises(ETagMismatch):  # the lease is gone
        store.write_bytes_if_match("other.json", b"{}", etag)
    assert any_s3_bucket.get("run/lease.json") == b'{"owner": "a", "beat": 2}'


def test_primitives(any_s3_bucket, s3_settings, tmp_path):
    store = S3Store(f"{any_s3_bucket.uri}/root", s3_settings)
    store.write_bytes("a/b.txt", b"hello")
    store.write_bytes("a/c/d.txt", b"deep")
    store.write_bytes("ab.txt", b"sibling, not under a/")
    assert [i.key for i in store.list("a")] == ["a/b.txt", "a/c/d.txt"]
    assert [i.key for i in store.list("a/b.txt")] == ["a/b.txt"]
    assert store.stat("a/b.txt").size == 5 and store.stat("a/nope") is None
    assert store.child("a").read_bytes("c/d.txt") == b"deep"
    with pytest.raises(InputNotFound, match=r"s3://t-\w+/root/a/missing"):
        store.read_bytes("a/missing")
    store.delete(["a/b.txt", "a/never-existed"])
    assert [i.key for i in store.list()] == ["a/c/d.txt", "ab.txt"]


def test_delete_removes_manifest_first(any_s3_bucket, s3_settings, tmp_path):
    store = S3Store(any_s3_bucket.uri, s3_settings)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "w.bin").write_bytes(b"w")
    store.push_directory(tmp_path / "c", "ck")
    calls = []
    events = store.client.meta.events
    events.register("before-parameter-build.s3.DeleteObjects", lambda params, **kw: calls.append(params))
    store.delete([i.key for i in store.list("ck")])
    assert [[o["Key"] for o in c["Delete"]["Objects"]] for c in calls] == [["ck/MANIFEST.json"], ["ck/w.bin"]]
    assert any_s3_bucket.list_keys() == []


def test_repull_skips_unchanged_files_and_refreshes_changed(s3_bucket, s3_settings, tmp_path):
    s3_bucket.put("m/a.bin", b"a" * 100)
    s3_bucket.put("m/b.bin", b"b" * 100)
    s3_bucket.put("m/old.bin", b"o")
    destination = tmp_path / "scratch"
    assert pull_uri(f"{s3_bucket.uri}/m/", destination, s3_settings) == destination / "files"
    record = json.loads((destination / PULL_RECORD).read_text())
    assert set(record["files"]) == {"a.bin", "b.bin", "old.bin"}

    s3_bucket.put("m/b.bin", b"B" * 100)  # same size, new content: only the ETag tells
    s3_bucket.client.delete_object(Bucket=s3_bucket.name, Key="m/old.bin")
    gets = []
    store_events = S3Store(s3_bucket.uri, s3_settings).client.meta.events  # the cached client pull_uri uses
    store_events.register("before-parameter-build.s3.GetObject", lambda params, **kw: gets.append(params["Key"]))
    with capture_logs() as logs:
        pull_uri(f"{s3_bucket.uri}/m/", destination, s3_settings)
    assert gets == ["m/b.bin"]
    assert (destination / "files" / "b.bin").read_bytes() == b"B" * 100
    assert not (destination / "files" / "old.bin").exists()  # a stale shard would be read as data
    done = [e for e in logs if e["event"] == "storage_pull_done"]
    assert done and done[0]["skipped_files"] == 1 and done[0]["bytes"] == 100

    (destination / "files" / "a.bin").write_bytes(b"x" * 100)  # edited locally: same size, new mtime
    gets.clear()
    pull_uri(f"{s3_bucket.uri}/m/", destination, s3_settings)
    assert gets == ["m/a.bin"] and (destination / "files" / "a.bin").read_bytes() == b"a" * 100


def test_pull_uri_single_object_and_fetch_input(s3_bucket, s3_settings, tmp_path):
    s3_bucket.put("data/train.jsonl", b'{"text": "hi"}\n')
    s3_bucket.put("data/train.jsonl.bak", b"not me")
    path = fetch_input(f"{s3_bucket.uri}/data/train.jsonl", tmp_path, s3_settings)
    assert path.name == "train.jsonl" and path.read_bytes() == b'{"text": "hi"}\n'
    assert sorted(p.name for p in path.parent.iterdir()) == ["train.jsonl"]
    # A prefix without a trailing slash that is not an object is a directory.
    directory = fetch_input(f"{s3_bucket.uri}/data", tmp_path, s3_settings)
    assert sorted(p.name for p in directory.iterdir()) == ["train.jsonl", "train.jsonl.bak"]


def test_read_text_of_s3_config(s3_bucket):
    s3_bucket.put("configs/job.yaml", b"run:\n  name: x\n")
    assert read_text(f"{s3_bucket.uri}/configs/job.yaml") == "run:\n  name: x\n"
    with pytest.raises(InputNotFound, match=r"configs/nope\.yaml"):
        read_text(f"{s3_bucket.uri}/configs/nope.yaml")


@pytest.mark.parametrize(
    "key",
    ["p/../x", "p/a/../../x", "p//etc/x", "p/./y", "p/a\\b", "p/" + "n" * 300],
)
def test_untrusted_keys_never_write_outside(s3_bucket, s3_settings, tmp_path, key):
    s3_bucket.put("p/fine.txt", b"ok")
    s3_bucket.put(key, b"evil")
    destination = tmp_path / "deep" / "dst"
    with pytest.raises(DataError) as caught:
        pull_uri(f"{s3_bucket.uri}/p/", destination, s3_settings)
    assert repr(key.removeprefix("p/"))[1:40] in str(caught.value)
    assert caught.value.exit_code == 65
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written == []  # every key is checked before anything is written


def test_absolute_key_and_dir_markers(s3_bucket, s3_settings, tmp_path):
    s3_bucket.put("/etc/x", b"evil")  # an absolute key, listed from the bucket root
    with pytest.raises(DataError, match="/etc/x"):
        pull_uri(s3_bucket.uri, tmp_path / "a", s3_settings)
    s3_bucket.client.delete_object(Bucket=s3_bucket.name, Key="/etc/x")
    s3_bucket.put("q/dir/", b"")  # a console's folder marker: skipped
    s3_bucket.put("q/dir/file.txt", b"x")
    out = pull_uri(f"{s3_bucket.uri}/q/", tmp_path / "b", s3_settings)
    assert [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()] == ["dir/file.txt"]
    s3_bucket.put("q/dir/file.txt/inner", b"y")  # file and directory at once
    with pytest.raises(DataError, match="file and directory"):
        pull_uri(f"{s3_bucket.uri}/q/", tmp_path / "c", s3_settings)


def test_progress_lines_and_summary(s3_bucket, tmp_path):
    settings = StorageConfig(multipart_threshold_mb=5, multipart_chunksize_mb=5, progress_interval_seconds=0.01)
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "w.bin").write_bytes(os.urandom(24 * MIB))
    store = S3Store(s3_bucket.uri, settings)
    with capture_logs() as logs:
        store.push_directory(tmp_path / "big", "x")
        store.child("x").pull(tmp_path / "back")
    for op in ("push", "pull"):
        lines = [e for e in logs if e["event"] == f"storage_{op}_progress"]
        assert lines, f"no progress lines for {op}"
        assert {"done_mb", "total_mb", "percent", "mb_s", "eta_s", "uri"} <= set(lines[-1])
        assert lines[-1]["total_mb"] == pytest.approx(24 * MIB / 1e6, abs=0.1)
        summary = [e for e in logs if e["event"] == f"storage_{op}_done"]
        assert len(summary) == 1 and summary[0]["bytes"] >= 24 * MIB and summary[0]["mb_s"] > 0
    # Small transfers log only their summary.
    with capture_logs() as logs:
        store.write_bytes("small/a", b"a")
        store.child("small").pull(tmp_path / "small")
    assert not [e for e in logs if e["event"].endswith("_progress")]


def test_abort_incomplete_uploads(any_s3_bucket, s3_settings):
    client = any_s3_bucket.client
    for key in ("run/ck/a.bin", "run/ck/b.bin", "other/c.bin"):
        client.create_multipart_upload(Bucket=any_s3_bucket.name, Key=key)
    store = S3Store(f"{any_s3_bucket.uri}/run", s3_settings)
    assert store.abort_incomplete_uploads("ck") == 2
    left = client.list_multipart_uploads(Bucket=any_s3_bucket.name).get("Uploads", [])
    assert [u["Key"] for u in left] == ["other/c.bin"]


def test_push_hashes_each_file_while_uploading_it(s3_bucket, s3_settings, tmp_path, monkeypatch):
    """sha256 and the expected ETag come from the bytes s3transfer reads: no second pass over big files."""
    from job.storage import s3_sync

    source = tmp_path / "src"
    files = make_tree(source)
    rehashed = []
    real = s3_sync.hash_file
    monkeypatch.setattr(s3_sync, "hash_file", lambda path, *a: (rehashed.append(path.name), real(path, *a))[1])
    manifest = S3Store(s3_bucket.uri, s3_settings).push_directory(source, "p")
    assert {e.name: e.sha256 for e in manifest.files} == {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}
    assert not [name for name in rehashed if name.endswith(".safetensors")], rehashed


def test_repull_after_a_file_became_a_directory(any_s3_bucket, s3_settings, tmp_path):
    any_s3_bucket.put("m/a", b"file")
    pull_uri(f"{any_s3_bucket.uri}/m/", tmp_path, s3_settings)
    any_s3_bucket.client.delete_object(Bucket=any_s3_bucket.name, Key="m/a")
    any_s3_bucket.put("m/a/b", b"nested")
    out = pull_uri(f"{any_s3_bucket.uri}/m/", tmp_path, s3_settings)
    assert (out / "a" / "b").read_bytes() == b"nested"
    any_s3_bucket.client.delete_object(Bucket=any_s3_bucket.name, Key="m/a/b")
    any_s3_bucket.put("m/a", b"file again")  # and back: the emptied directory goes too
    assert (pull_uri(f"{any_s3_bucket.uri}/m/", tmp_path, s3_settings) / "a").read_bytes() == b"file again"


def test_interrupted_pull_keeps_what_arrived(s3_bucket, s3_settings, tmp_path):
    """A pull that fails part-way (pod killed, store down) resumes with only the missing files."""
    for name in ("a", "b", "c"):
        s3_bucket.put(f"m/{name}.bin", name.encode() * 1000)
    store = S3Store(s3_bucket.uri, s3_settings)  # shares its cached client with pull_uri
    events = store.client.meta.events
    fail_c = _fail_for("m/c.bin")
    events.register("before-parameter-build.s3.GetObject", fail_c)
    with pytest.raises(InputNotFound, match=r"/m/c\.bin"):  # the error names the object
        pull_uri(f"{s3_bucket.uri}/m/", tmp_path, s3_settings)
    events.unregister("before-parameter-build.s3.GetObject", fail_c)
    gets = []
    events.register("before-parameter-build.s3.GetObject", lambda params, **kw: gets.append(params["Key"]))
    out = pull_uri(f"{s3_bucket.uri}/m/", tmp_path, s3_settings)
    assert gets == ["m/c.bin"]
    assert sorted(p.name for p in out.iterdir()) == ["a.bin", "b.bin", "c.bin"]


def _fail_for(key):
    def hook(params, **kwargs):
        if params["Key"] == key:
            params["Key"] = key + ".vanished"  # a real 404 from the server, as if deleted meanwhile

    return hook
