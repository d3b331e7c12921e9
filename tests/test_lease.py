"""The writer lease with real conditional writes (local store and the loopback S3 endpoint)."""

from __future__ import annotations

import time

import pytest

from job.durability.lease import LEASE_KEY, Lease, LeaseRecord
from job.errors import StorageUnavailable
from job.storage import LocalStore, open_store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "run")
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"{bucket.uri}/runs/run", request.getfixturevalue("s3_settings"))


def test_live_holder_keeps_the_run(store) -> None:
    holder = Lease(store, ttl=3)
    holder.acquire()
    try:
        started = time.monotonic()
        with pytest.raises(StorageUnavailable, match="kept renewing"):
            Lease(store, ttl=3).acquire()
        waited = time.monotonic() - started
        assert 3 <= waited <= 8  # waited out the first expiry plus the margin, no longer
        assert not holder.lost.is_set()
    finally:
        holder.release()


def test_expired_lease_is_taken_over_and_the_old_holder_learns_it_lost(store) -> None:
    old = Lease(store, ttl=3)
    old.acquire()
    old._stop.set()  # a frozen process: it stops renewing but does not release
    time.sleep(3.2)
    new = Lease(store, ttl=3)
    new.acquire()
    record = LeaseRecord.parse(store.read_bytes(LEASE_KEY))
    assert record.holder == new.holder
    assert old.renew() is False and old.lost.is_set()  # its next heartbeat finds the new holder's lease
    assert LeaseRecord.parse(store.read_bytes(LEASE_KEY)).holder == new.holder  # and did not overwrite it
    assert new.renew() is True and not new.lost.is_set()
    new.release()


def test_release_lets_the_next_start_in_at_once(store) -> None:
    first = Lease(store, ttl=30)
    first.acquire()
    first.release()
    started = time.monotonic()
    second = Lease(store, ttl=30)
    second.acquire()
    assert time.monotonic() - started < 5
    second.release()
