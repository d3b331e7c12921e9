"""S3 failure paths against real servers: exit codes, credentials kept out of logs, retried faults.

Not-found and fault tests use the session's moto server; 403s use a second moto server in its own
process with authentication on and real IAM keys; transient faults are injected through botocore's
event hooks (503 SlowDown, a closed connection) or a loopback proxy that really cuts connections.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ConnectionClosedError

from job.config.schema import StorageConfig
from job.errors import AccessDenied, InputNotFound, StorageUnavailable
from job.storage import fetch_input, open_store
from job.storage.manifest import MANIFEST_NAME
from job.storage.s3 import S3Store, pull_uri
from s3_fixtures import aws_env

MIB = 1024 * 1024
SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
)


class _Raw:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **kwargs):
        yield self.body


def slow_down(url: str) -> AWSResponse:
    """What a busy S3 answers: 503 SlowDown (returned by a before-send hook instead of sending)."""
    return AWSResponse(url, 503, {"Content-Type": "application/xml"}, _Raw(SLOW_DOWN))


def part_number(request) -> str | None:
    return parse_qs(urlsplit(request.url).query).get("partNumber", [None])[0]


def write_tree(root: Path, big: int = 12 * MIB) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "weights.bin").write_bytes(os.urandom(big))
    (root / "config.json").write_bytes(b"{}")


# ---------------------------------------------------------------- 66: not found


def test_missing_bucket_key_and_empty_prefix_exit_66(s3_bucket, s3_settings, tmp_path):
    s3_bucket.put("data/train.jsonl", b"{}\n")
    cases = {
        "s3://no-such-bucket-x1/data/train.jsonl": "bucket does not exist",
        f"{s3_bucket.uri}/data/missing.jsonl": "no such object",
        f"{s3_bucket.uri}/empty-prefix/": "no objects under this prefix",
    }
    for uri, words in cases.items():
        with pytest.raises(InputNotFound) as caught:
            fetch_input(uri, tmp_path, s3_settings)
        assert caught.value.exit_code == 66
        assert uri.rstrip("/") in str(caught.value) and words in str(caught.value)
    with pytest.raises(InputNotFound, match="no-such-bucket-x1"):
        open_store("s3://no-such-bucket-x1/runs", s3_settings).read_bytes("config.resolved.yaml")
    with pytest.raises(InputNotFound, match="bucket does not exist"):  # the job's first question, before training
        open_store("s3://no-such-bucket-x1/runs", s3_settings).is_committed("final")
    assert open_store(f"{s3_bucket.uri}/runs", s3_settings).is_committed("final") is False
    write_tree(tmp_path / "ck", big=10)
    with pytest.raises(InputNotFound, match="bucket does not exist"):  # pushing to a missing bucket
        open_store("s3://no-such-bucket-x1/runs", s3_settings).push_directory(tmp_path / "ck", "final")


# ---------------------------------------------------------------- 69: unreachable


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens there once the socket is closed


def test_unreachable_endpoint_exits_69(s3_env, tmp_path):
    settings = StorageConfig(endpoint_url=f"http://127.0.0.1:{closed_port()}", max_attempts=2, connect_timeout=1)
    with pytest.raises(StorageUnavailable) as caught:
        fetch_input("s3://some-bucket/data/train.jsonl", tmp_path, settings)
    assert caught.value.exit_code == 69
    assert "s3://some-bucket/data/train.jsonl" in str(caught.value) and "after 2 attempts" in str(caught.value)


def test_endpoint_precedence(s3_bucket, s3_settings, monkeypatch, tmp_path):
    """storage.endpoint_url beats AWS_ENDPOINT_URL_S3, which beats AWS_ENDPOINT_URL."""
    s3_bucket.put("k", b"v")
    dead = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_bucket.endpoint)
    assert open_store(s3_bucket.uri, s3_settings).read_bytes("k") == b"v"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", dead)
    fast = StorageConfig(max_attempts=1, connect_timeout=1)
    with pytest.raises(StorageUnavailable):
        open_store(s3_bucket.uri, fast).read_bytes("k")
    pinned = StorageConfig(endpoint_url=s3_bucket.endpoint, max_attempts=1)
    assert open_store(s3_bucket.uri, pinned).read_bytes("k") == b"v"


# ---------------------------------------------------------------- 77: denied (moto with auth on)


def use_keys(monkeypatch, tmp_path, server, key: str, secret: str) -> StorageConfig:
    aws_env(monkeypatch, tmp_path, server.endpoint, key, secret)
    return StorageConfig(max_attempts=2)


def test_real_keys_work_on_the_authenticating_server(moto_auth, monkeypatch, tmp_path):
    """The control for the 403 tests below: the same server accepts the admin's real key."""
    settings = use_keys(monkeypatch, tmp_path, moto_auth, *moto_auth.admin)
    path = fetch_input(f"s3://{moto_auth.bucket}/data/train.jsonl", tmp_path, settings)
    assert path.read_bytes() == b'{"text": "hello"}\n'


@pytest.mark.parametrize(
    ("who", "code"),
    [("nobody", "AccessDenied"), ("unknown-key", "InvalidAccessKeyId"), ("wrong-secret", "SignatureDoesNotMatch")],
)
def test_denied_exits_77(moto_auth, monkeypatch, tmp_path, who, code):
    key, secret = {
        "nobody": moto_auth.nobody,
        "unknown-key": ("AKIAUNKNOWNUNKNOWN00", "x" * 40),
        "wrong-secret": (moto_auth.admin[0], "wrong-secret-" + "y" * 27),
    }[who]
    settings = use_keys(monkeypatch, tmp_path, moto_auth, key, secret)
    uri = f"s3://{moto_auth.bucket}/data/train.jsonl"
    with pytest.raises(AccessDenied) as caught:
        fetch_input(uri, tmp_path, settings)
    assert caught.value.exit_code == 77 and uri in str(caught.value) and code in str(caught.value)
    assert secret not in str(caught.value) and key not in str(caught.value)
    write_tree(tmp_path / "ck", big=10)
    with pytest.raises(AccessDenied):
        open_store(f"s3://{moto_auth.bucket}/runs/r", settings).push_directory(tmp_path / "ck", "final")


def test_no_credentials_exits_77(s3_env, monkeypatch, tmp_path):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(AccessDenied, match="no S3 credentials"):
        open_store("s3://some-bucket/x", StorageConfig())


# ---------------------------------------------------------------- credentials never logged


SENTINEL_SECRET = "SENTINELsecretQx7v9kP2mZr4Lw8Jd3Hn6Tb1Yc5Gf0Ae"
SENTINEL_TOKEN = "SENTINELtokenRk2Wp9Vb4Nq7Xs1Jm6Cd3Lh8Fz5Gt0Ya"


def test_sentinel_secret_never_in_any_output(s3_bucket, s3_settings, moto_auth, monkeypatch, tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)  # every logger, botocore's and urllib3's included
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SENTINEL_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", SENTINEL_TOKEN)
    errors: list[BaseException] = []
    write_tree(tmp_path / "src", big=6 * MIB)
    store = S3Store(f"{s3_bucket.uri}/runs/r", s3_settings)  # moto here checks no signature
    store.push_directory(tmp_path / "src", "final")
    store.child("final").pull(tmp_path / "back")
    for uri in (f"{s3_bucket.uri}/missing.jsonl", "s3://no-such-bucket-x2/x"):
        with pytest.raises(InputNotFound) as caught:
            fetch_input(uri, tmp_path, s3_settings)
        errors.append(caught.value)
    # And a denied request: the real key id with the sentinel as its secret.
    aws_env(monkeypatch, tmp_path, moto_auth.endpoint, moto_auth.admin[0], SENTINEL_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", SENTINEL_TOKEN)
    with pytest.raises(AccessDenied) as caught:
        fetch_input(f"s3://{moto_auth.bucket}/data/train.jsonl", tmp_path, StorageConfig(max_attempts=1))
    errors.append(caught.value)

    out, err = capfd.readouterr()
    records = "\n".join(f"{r.name} {r.getMessage()}" for r in caplog.records)
    texts = [out, err, records, *(f"{e} {e.hint} {e.__context__}" for e in errors)]
    assert "botocore" in records and "Sending http request" in records  # DEBUG really was captured
    assert "x-amz-security-token" in records.lower()  # the token header was logged... redacted
    assert "storage_push_done" in out  # and so was our own structured output
    for text in texts:
        assert SENTINEL_SECRET not in text
        assert SENTINEL_TOKEN not in text


# ---------------------------------------------------------------- transient faults are retried


def test_slow_down_and_closed_connections_on_parts_are_retried(s3_bucket, s3_settings, tmp_path):
    write_tree(tmp_path / "src", big=14 * MIB)  # three 5 MiB parts
    store = S3Store(f"{s3_bucket.uri}/runs/r", s3_settings)
    tries: Counter[str] = Counter()

    def flaky(request, **kwargs):
        part = part_number(request)
        tries[part] += 1
        if tries[part] == 1 and part in ("2", "3"):
            return slow_down(request.url)
        if tries[part] == 1 and part == "1":
            raise ConnectionClosedError(endpoint_url=request.url)
        return None

    store.client.meta.events.register("before-send.s3.UploadPart", flaky)
    tries_get: Counter[str] = Counter()

    def flaky_get(request, **kwargs):
        attempt = f"{request.url} {request.headers.get('Range')}"
        tries_get[attempt] += 1
        return slow_down(request.url) if tries_get[attempt] == 1 else None

    store.client.meta.events.register("before-send.s3.GetObject", flaky_get)
    store.push_directory(tmp_path / "src", "final")
    assert tries == {"1": 2, "2": 2, "3": 2}  # each part failed once, then went through
    assert s3_bucket.get("runs/r/final/weights.bin") == (tmp_path / "src" / "weights.bin").read_bytes()
    store.child("final").pull(tmp_path / "back")
    assert tries_get and all(count == 2 for count in tries_get.values())
    assert (tmp_path / "back" / "weights.bin").read_bytes() == (tmp_path / "src" / "weights.bin").read_bytes()


def test_connections_cut_mid_transfer_are_retried(s3_bucket, s3_settings, flaky_proxy, tmp_path):
    write_tree(tmp_path / "src", big=12 * MIB)
    proxy = flaky_proxy(drops=2, cut_after=1 * MIB)
    settings = StorageConfig(**{**s3_settings.__dict__, "endpoint_url": proxy.endpoint})
    store = S3Store(f"{s3_bucket.uri}/runs/r", settings)
    store.push_directory(tmp_path / "src", "final")
    assert proxy.cuts == 2  # two uploads really lost their connection mid-body
    proxy.drops_left = 2
    store.child("final").pull(tmp_path / "back")
    assert proxy.cuts == 4  # and two downloads
    assert (tmp_path / "back" / "weights.bin").read_bytes() == (tmp_path / "src" / "weights.bin").read_bytes()


# ---------------------------------------------------------------- faults that outlast the retries


def test_persistent_faults_exit_69_and_leave_no_manifest(s3_bucket, s3_settings, tmp_path):
    write_tree(tmp_path / "src", big=12 * MIB)
    store = S3Store(f"{s3_bucket.uri}/runs/r", s3_settings)
    tries: Counter[str] = Counter()

    def always_busy(request, **kwargs):
        tries[part_number(request)] += 1
        return slow_down(request.url)

    store.client.meta.events.register("before-send.s3.UploadPart", always_busy)
    with pytest.raises(StorageUnavailable) as caught:
        store.push_directory(tmp_path / "src", "final")
    assert caught.value.exit_code == 69 and "SlowDown" in str(caught.value)
    assert f"{s3_bucket.uri}/runs/r/final/weights.bin" in str(caught.value)
    assert max(tries.values()) == s3_settings.max_attempts  # retried up to the limit, no further
    assert not [k for k in s3_bucket.list_keys() if k.endswith(MANIFEST_NAME)]
    store.abort_incomplete_uploads()
    assert not s3_bucket.client.list_multipart_uploads(Bucket=s3_bucket.name).get("Uploads")


def test_persistent_download_faults_exit_69(s3_bucket, s3_settings, tmp_path):
    s3_bucket.put("data/train.jsonl", b"{}\n")
    store = S3Store(s3_bucket.uri, s3_settings)
    store.client.meta.events.register("before-send.s3.GetObject", lambda request, **kw: slow_down(request.url))
    with pytest.raises(StorageUnavailable):
        pull_uri(f"{s3_bucket.uri}/data/train.jsonl", tmp_path / "x", s3_settings)
    assert not [p for p in (tmp_path / "x").rglob("*.jsonl")]  # no half file left as data


def test_retried_single_put_still_gets_the_right_manifest(s3_bucket, s3_settings, tmp_path):
    """A retried PutObject reads its body twice; the manifest's sha256 must still be the file's."""
    import hashlib

    from job.storage.manifest import Manifest

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_bytes(b'{"a": 1}' * 1000)
    store = S3Store(s3_bucket.uri, s3_settings)
    tries: Counter[str] = Counter()

    def busy_once(request, **kwargs):
        tries[request.url] += 1
        return slow_down(request.url) if tries[request.url] == 1 and "config.json" in request.url else None

    store.client.meta.events.register("before-send.s3.PutObject", busy_once)
    store.push_directory(tmp_path / "src", "final")
    assert max(tries.values()) == 2
    manifest = Manifest.from_json(s3_bucket.get("final/MANIFEST.json"))
    assert manifest.files[0].sha256 == hashlib.sha256(b'{"a": 1}' * 1000).hexdigest()
