"""The writer lease with real conditional writes (local store, moto and SeaweedFS), real clock offsets
(libfaketime in separate processes) and a store that really goes away."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from job.config.schema import StorageConfig
from job.durability.lease import LEASE_KEY, STOP_FRACTION, Lease, LeaseRecord
from job.errors import LeaseLost, StorageUnavailable
from job.storage import LocalStore, Store, open_store
from s3_fixtures import raw_client, start_moto_process, stop_process

REPO = Path(__file__).resolve().parents[1]
FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
TTL = 2.0
WINDOW = TTL * 1.5  # ttl + the default margin (ttl / 2): how long a newcomer watches an unchanged lease


@pytest.fixture(params=["local", "moto", "seaweedfs"])
def store(request, tmp_path) -> Store:
    if request.param == "local":
        return LocalStore(tmp_path / "run")
    bucket = request.getfixturevalue("s3_bucket" if request.param == "moto" else "seaweedfs_bucket")
    return open_store(f"{bucket.uri}/runs/run", request.getfixturevalue("s3_settings"))


def acquire_within(lease: Lease, seconds: float) -> float:
    """`lease.acquire()` in a thread, so a lease that would be waited on for a year fails the test instead."""
    outcome: list[BaseException | float] = []

    def run() -> None:
        started = time.monotonic()
        try:
            lease.acquire()
            outcome.append(time.monotonic() - started)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"acquire() still waiting after {seconds} s"
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def record_of(store: Store) -> LeaseRecord:
    return LeaseRecord.parse(store.read_bytes(LEASE_KEY))


def test_live_holder_keeps_the_run(store) -> None:
    holder = Lease(store, ttl=TTL)
    holder.acquire()
    try:
        started = time.monotonic()
        with pytest.raises(StorageUnavailable, match="kept renewing") as refused:
            Lease(store, ttl=TTL).acquire()
        waited = time.monotonic() - started
        assert WINDOW <= waited <= WINDOW + 3  # watched one TTL plus the margin, then saw a renewal
        assert refused.value.exit_code == 69
        assert holder.held() and record_of(store).holder == holder.holder
    finally:
        holder.release()


def test_stale_lease_is_taken_over_and_the_old_holder_stops_writing(store) -> None:
    old = Lease(store, ttl=TTL)
    old.acquire()
    old._stop.set()  # a frozen process: it stops renewing but does not release
    new = Lease(store, ttl=TTL)
    waited = acquire_within(new, 20)
    assert WINDOW <= waited <= WINDOW + 2.5  # one TTL plus the margin of watching an unchanged ETag
    assert record_of(store).holder == new.holder
    assert not old.held()  # its proof ran out long before the takeover
    with pytest.raises(LeaseLost) as lost:
        old.ensure_held()
    assert lost.value.exit_code == 75 and "no renewal proven" in str(lost.value)
    assert old.renew() is False and old.lost.is_set()
    assert record_of(store).holder == new.holder  # and it did not overwrite the new holder's lease
    assert new.renew() is True and new.held()
    new.ensure_held()
    new.release()


def test_a_renewal_that_finds_another_holder_loses_the_lease(tmp_path) -> None:
    store = LocalStore(tmp_path / "run")
    holder = Lease(store, ttl=30)
    holder.acquire()
    holder._stop.set()
    intruder = LeaseRecord("elsewhere/1/x", 0.0, 0.0, renewals=7)  # written by another process, any clock
    store.write_bytes(LEASE_KEY, json.dumps({**intruder.__dict__, "expires": 1e308}).encode())
    assert holder.renew() is False
    with pytest.raises(LeaseLost, match="another process replaced our lease"):
        holder.ensure_held()
    holder.release()  # writes nothing: the lease is someone else's
    assert record_of(store).holder == "elsewhere/1/x"


def test_release_lets_the_next_start_in_at_once(store) -> None:
    first = Lease(store, ttl=30)
    first.acquire()
    first.release()
    released = record_of(store)
    assert released.released and released.holder == first.holder and released.heartbeat > 0
    assert not first.held()
    started = time.monotonic()
    second = Lease(store, ttl=30)
    second.acquire()
    assert time.monotonic() - started < 2
    second.release()


@pytest.mark.parametrize(
    "content",
    [
        b'{"holder": "pod-a/1/ab", "heartbeat": 17000',  # truncated
        b'{"holder": "pod-a/1/ab", "heartbeat": NaN, "expires": NaN}',
        b'{"holder": "pod-a/1/ab", "heartbeat": 1e308, "expires": 1e308}',
        b'{"holder": "pod-a/1/ab"}',  # missing fields
        b'{"holder": "pod-a/1/ab", "heartbeat": 1, "expires": 1e999, "ttl": 1e999}',  # inf, and an absurd TTL
        b"[]",
    ],
    ids=["truncated", "nan", "huge", "missing", "inf", "not-an-object"],
)
def test_malformed_lease_is_taken_after_one_ttl_of_watching(tmp_path, content: bytes) -> None:
    store = LocalStore(tmp_path / "run")
    store.write_bytes(LEASE_KEY, content)
    lease = Lease(store, ttl=1.0)
    waited = acquire_within(lease, 15)
    assert 1.5 <= waited <= 4  # one TTL plus the margin: not exit 1, not forever
    assert record_of(store).holder == lease.holder
    lease.release()


def test_malformed_lease_on_seaweedfs(seaweedfs_bucket, s3_settings) -> None:
    store = open_store(f"{seaweedfs_bucket.uri}/run", s3_settings)
    store.write_bytes(LEASE_KEY, b'{"holder": "x", "heartbeat": NaN, "expires": NaN}')
    lease = Lease(store, ttl=1.0)
    assert 1.5 <= acquire_within(lease, 15) <= 4
    assert record_of(store).holder == lease.holder
    lease.release()


def test_a_holder_whose_store_goes_away_stops_writing_within_its_ttl(s3_env, tmp_path) -> None:
    """moto in its own process, stopped under a live holder: renewals fail, and the fence closes in time."""
    process, endpoint = start_moto_process()
    try:
        raw_client(endpoint).create_bucket(Bucket="lease-bucket")
        settings = StorageConfig(endpoint_url=endpoint, max_attempts=1, connect_timeout=1, read_timeout=2)
        lease = Lease(open_store("s3://lease-bucket/run", settings), ttl=TTL)
        lease.acquire()
        time.sleep(TTL / 2)  # a renewal or two went through
        assert lease.held()
        with capture_logs() as logs:
            process.kill()  # the store is gone at once: connections refused
            stopped = time.monotonic()
            while lease.held():
                assert time.monotonic() - stopped < TTL, "still claims the lease a whole TTL after the store went away"
                time.sleep(0.02)
            closed = time.monotonic()
    finally:
        stop_process(process)
    # The fence closes STOP_FRACTION * ttl after the last proven renewal (polling adds a little on a busy machine).
    assert STOP_FRACTION * TTL <= closed - lease.proven_at <= STOP_FRACTION * TTL + 0.5
    with pytest.raises(LeaseLost, match="no renewal proven"):
        lease.ensure_held()
    assert any(e["event"] == "lease_renewal_failed" for e in logs)
    lease.release()  # must not hang on the dead store


# ---------------------------------------------------------------- real clock offsets, separate processes

HELPER = """
import json, sys, time
from job.config.schema import StorageConfig
from job.durability.lease import Lease
from job.storage import open_store

mode, uri, ttl = sys.argv[1], sys.argv[2], float(sys.argv[3])
store = open_store(uri, StorageConfig(max_attempts=2, connect_timeout=2, read_timeout=5))
lease = Lease(store, ttl)
started = time.monotonic()

def say(event, **fields):
    print("@@" + json.dumps({"event": event, "wall": time.time(), **fields}), flush=True)

if mode == "acquire":
    try:
        lease.acquire()
    except Exception as exc:
        say("refused", error=str(exc), seconds=time.monotonic() - started)
        sys.exit(getattr(exc, "exit_code", 1))
    say("acquired", holder=lease.holder, seconds=time.monotonic() - started)
    lease.release()
else:  # hold, renewing, until killed or stdin closes
    lease.acquire()
    say("acquired", holder=lease.holder)
    sys.stdin.read()
    lease.release()
"""


def faked_env(offset: str) -> dict[str, str]:
    if not FAKETIME_LIB.is_file():
        pytest.skip("libfaketime is not installed (apt-get install faketime; .ci/run installs it)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SFT_")}
    # Wall clock and monotonic clock both shifted (rates equal); file times left alone, no .pyc written.
    env.update(LD_PRELOAD=str(FAKETIME_LIB), FAKETIME=offset, NO_FAKE_STAT="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def events(stdout: str) -> list[dict]:
    return [json.loads(line[2:]) for line in stdout.splitlines() if line.startswith("@@")]


def store_and_uri(kind: str, request, tmp_path: Path) -> tuple[Store, str]:
    if kind == "local":
        return LocalStore(tmp_path / "run"), str(tmp_path / "run")
    bucket = request.getfixturevalue("seaweedfs_bucket")
    uri = f"{bucket.uri}/runs/run"
    return open_store(uri, request.getfixturevalue("s3_settings")), uri


@pytest.mark.slow
@pytest.mark.parametrize("offset", ["+120s", "-120s"])
@pytest.mark.parametrize("kind", ["local", "seaweedfs"])
def test_a_newcomer_whose_clock_is_off_leaves_a_live_holder_alone(kind, offset, request, tmp_path) -> None:
    store, uri = store_and_uri(kind, request, tmp_path)
    holder = Lease(store, ttl=TTL)
    holder.acquire()
    try:
        newcomer = subprocess.run(
            [sys.executable, "-c", HELPER, "acquire", uri, str(TTL)],
            cwd=REPO, env=faked_env(offset), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        said = events(newcomer.stdout)
        assert newcomer.returncode == 69, (newcomer.stdout[-2000:], newcomer.stderr[-2000:])
        assert said[-1]["event"] == "refused" and "kept renewing" in said[-1]["error"]
        assert abs(said[-1]["wall"] - time.time() - (120 if offset == "+120s" else -120)) < 30  # really offset
        assert WINDOW <= said[-1]["seconds"] <= WINDOW + 3
        assert holder.held() and record_of(store).holder == holder.holder  # never taken over
    finally:
        holder.release()


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "offset"), [("local", "+1y"), ("seaweedfs", "+120s")])
def test_a_dead_holder_whose_clock_ran_ahead_is_taken_over_after_one_ttl(kind, offset, request, tmp_path) -> None:
    """The crashed predecessor's record says it expires a year (or two minutes) from now: irrelevant."""
    store, uri = store_and_uri(kind, request, tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", HELPER, "hold", uri, str(TTL)],
        cwd=REPO, env=faked_env(offset), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        said: list[dict] = []
        for line in holder.stdout:  # until the holder says it holds the lease
            said += events(line)
            if said:
                break
        assert said and said[0]["event"] == "acquired"
        assert record_of(store).expires - time.time() > 100  # its clock is far ahead of ours
    finally:
        holder.send_signal(signal.SIGKILL)  # crashed: no release
        holder.wait(timeout=10)
    newcomer = Lease(store, ttl=TTL)
    waited = acquire_within(newcomer, 30)
    assert WINDOW <= waited <= WINDOW + 3
    assert record_of(store).holder == newcomer.holder and newcomer.held()
    newcomer.release()
