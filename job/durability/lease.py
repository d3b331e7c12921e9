"""One writer per run: a lease object in the store, taken and renewed with conditional writes.

Safety never rests on clocks agreeing across hosts: each process measures durations on its
own monotonic clock only. The wall-clock `heartbeat` and `expires` in `lease.json` are for
people and `status`; no decision reads them.

- Holder: creates `lease.json` (`If-None-Match: *`), rewrites it every `ttl / 3` (`If-Match`),
  each time with a new `renewals` count so its ETag changes. A renewal is proven when its write
  succeeds, as of the moment it was sent. `ensure_held()`, the fence before each durable write,
  raises LeaseLost (75) once the last proof is `0.8 * ttl` old or a renewal found another
  holder's record; store errors are retried until then.
- Newcomer: a lease whose ETag stays the same for `ttl + margin` of the newcomer's own time is
  stale (malformed records too) and is taken with `If-Match`; a `released` one is taken at once.
  A change after the newcomer has watched for `ttl + margin` means the holder kept renewing
  through a whole TTL: it is alive, and the newcomer exits 69 without writing. So a newcomer
  waits at most about `2 * (ttl + margin)`.
- Why that is safe: each watch starts after the holder's last write landed, so a takeover comes
  at least `ttl + margin` after the holder's last proof, and the holder stops at `0.8 * ttl`:
  `0.2 * ttl + margin` is left for a write that passed the fence to land, and for clock-rate drift.
"""

from __future__ import annotations

import contextvars
import json
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass

from job.errors import InputNotFound, LeaseLost, StorageUnavailable
from job.logs import get_logger
from job.storage import AlreadyExists, Store
from job.storage.base import ETagMismatch

log = get_logger(__name__)

LEASE_KEY = "lease.json"
RENEW_FRACTION = 1 / 3
"""Renew every third of the TTL: two more tries before the proof runs out."""
STOP_FRACTION = 0.8
"""Stop writing once the last proven renewal is this much of the TTL old."""
TRUSTED_TTL_FACTOR = 10
"""A record's own `ttl` lengthens a newcomer's watch only up to this multiple of its own TTL."""

_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", None)


def monotonic() -> float:
    """This host's monotonic seconds; CLOCK_BOOTTIME where there is one, which keeps counting while suspended."""
    return time.clock_gettime(_BOOTTIME) if _BOOTTIME is not None else time.monotonic()


@dataclass
class LeaseRecord:
    holder: str
    heartbeat: float
    """The holder's wall clock at its last renewal: for people and `status`, never for deciding."""
    expires: float
    """`heartbeat + ttl` on the holder's wall clock, 0.0 once released: for `status` only."""
    released: bool = False
    renewals: int = 0
    """Counts the holder's writes, so that every renewal changes the content and hence the ETag."""
    ttl: float = 0.0

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def parse(cls, data: bytes) -> LeaseRecord:
        """The record; ValueError when it is not one (truncated, missing fields, wrong types)."""
        try:
            body = json.loads(data)
            return cls(
                str(body["holder"]),
                float(body["heartbeat"]),
                float(body["expires"]),
                body.get("released") is True,
                int(body.get("renewals", 0)),
                float(body.get("ttl", 0.0)),
            )
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
            raise ValueError(f"malformed lease record: {type(exc).__name__}: {exc}") from None

    @property
    def is_released(self) -> bool:
        return self.released or self.expires == 0.0  # expires 0.0: a release written before `released` existed


def read_record(data: bytes) -> LeaseRecord | None:
    """The record, or None when it is malformed."""
    try:
        return LeaseRecord.parse(data)
    except ValueError:
        return None


class Lease:
    def __init__(
        self,
        store: Store,
        ttl: float,
        *,
        margin: float | None = None,
        clock: Callable[[], float] = monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.ttl = ttl
        self.margin = ttl / 2 if margin is None else margin
        self.clock = clock
        self.wall_clock = wall_clock
        self.holder = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self.etag: str | None = None
        self.renewals = 0
        self.last_heartbeat = 0.0
        self.proven_at: float | None = None
        """`clock()` when the last successful write was sent."""
        self.lost = threading.Event()
        self.lost_reason = "the lease was never acquired"
        self._lose_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the holder's side

    def held(self) -> bool:
        """True while the last proven renewal is younger than `STOP_FRACTION * ttl` and nobody replaced us."""
        if self.lost.is_set() or self.proven_at is None:
            return False
        age = self.clock() - self.proven_at
        if age >= self.ttl * STOP_FRACTION:
            self._lose(f"no renewal proven for {age:.1f} s (ttl {self.ttl:g} s)")
            return False
        return True

    def ensure_held(self) -> None:
        """The fence before each durable write: LeaseLost (75) unless `held()`."""
        if not self.held():
            raise LeaseLost(
                f"this process no longer holds the run's lease: {self.lost_reason}",
                hint="another process may be writing the run; this one stops before writing again",
            )

    def _lose(self, reason: str) -> None:
        with self._lose_lock:
            if self.lost.is_set():
                return
            self.lost_reason = reason
            self.lost.set()
        log.error("lease_lost", holder=self.holder, reason=reason)

    def _record(self, *, released: bool = False) -> LeaseRecord:
        if not released:
            self.last_heartbeat = self.wall_clock()
        self.renewals += 1
        expires = 0.0 if released else self.last_heartbeat + self.ttl
        return LeaseRecord(self.holder, self.last_heartbeat, expires, released, self.renewals, self.ttl)

    def renew(self) -> bool:
        """Extend the lease, retrying store errors; False (and `lost`) once replaced or not proven in time."""
        while self.etag is not None and self.held():
            sent = self.clock()
            record = self._record()
            try:
                with self._write_lock:
                    etag = self.store.write_bytes_if_match(LEASE_KEY, record.to_bytes(), self.etag)
            except ETagMismatch:
                etag = self._landed(record)  # a retried request may have found its own first attempt
                if etag is None:
                    self._lose("another process replaced our lease")
                    return False
            except Exception as exc:  # unreachable or slow store: retry until the proof runs out
                log.warning("lease_renewal_failed", error=str(exc)[:300], proven_seconds_ago=self._proof_age())
                if self._stop.wait(min(self.ttl / 10, 1.0)):
                    return True  # released meanwhile
                continue
            self.etag, self.proven_at = etag, sent
            return True
        return False

    def _landed(self, record: LeaseRecord) -> str | None:
        """The ETag of `lease.json` if it is exactly the record we just sent, else None."""
        try:
            data, etag = self.store.read_bytes_with_etag(LEASE_KEY)
        except Exception:
            return None
        return etag if read_record(data) == record else None

    def _proof_age(self) -> float | None:
        return None if self.proven_at is None else round(self.clock() - self.proven_at, 1)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl * RENEW_FRACTION):
            if not self.renew():
                return

    def release(self) -> None:
        """Stop renewing and mark the lease released, so the next start takes it at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.etag is None or self.lost.is_set():
            return
        held, self.proven_at, self.lost_reason = self.held(), None, "released by this process"
        if not held:
            return
        # Released, but the last heartbeat kept: `status` orders a failure record against it.
        released = self._record(released=True)
        if not self._write_lock.acquire(timeout=5):  # a renewal still hangs: the lease runs out by itself
            return
        try:
            self.store.write_bytes_if_match(LEASE_KEY, released.to_bytes(), self.etag)
        except Exception as exc:  # it runs out by itself
            log.warning("lease_release_failed", error=str(exc)[:300])
        finally:
            self._write_lock.release()
        self.etag = None

    # ------------------------------------------------------------------ the newcomer's side

    def acquire(self) -> None:
        """Take the lease (see the module docstring); StorageUnavailable (69) if a live holder keeps it."""
        started = self.clock()
        watched: str | None = None  # the ETag being watched, and since when
        since = started
        while True:
            sent = self.clock()
            try:
                self._taken(self.store.write_bytes(LEASE_KEY, self._record().to_bytes(), if_absent=True), sent)
                return
            except AlreadyExists:
                pass
            try:
                data, etag = self.store.read_bytes_with_etag(LEASE_KEY)
            except InputNotFound:
                continue  # deleted meanwhile: create it
            record = read_record(data)
            now = self.clock()
            window = self._window(record)
            stale = None
            if record is not None and record.is_released:
                stale = "released"
            elif etag != watched:
                if watched is not None and now - started >= window:
                    raise StorageUnavailable(
                        f"run is being written by a live process ({_holder(record)}); it kept renewing its lease "
                        f"while this process watched it for {now - started:.0f} s",
                        hint="two jobs on one run name: stop one, or wait for it to finish",
                    )
                if watched is None:
                    self._log_waiting(record, data, window)
                watched, since = etag, now
            elif now - since >= window:
                stale = "unchanged" if record is not None else "malformed"
            if stale is not None:
                sent = self.clock()
                try:
                    new_etag = self.store.write_bytes_if_match(LEASE_KEY, self._record().to_bytes(), etag)
                except ETagMismatch:
                    continue  # someone else moved first; look again
                log.info(
                    "lease_taken_over",
                    previous_holder=_holder(record),
                    reason=stale,
                    watched_seconds=round(now - since, 1),
                )
                self._taken(new_etag, sent)
                return
            time.sleep(min(max(self.ttl / 10, 0.2), 2.0))

    def _window(self, record: LeaseRecord | None) -> float:
        """How long an unchanged lease is watched before it counts as stale (a longer TTL of its holder's counts)."""
        ttl = self.ttl
        if record is not None and math.isfinite(record.ttl) and 0 < record.ttl <= TRUSTED_TTL_FACTOR * self.ttl:
            ttl = max(ttl, record.ttl)
        return ttl + self.margin

    def _log_waiting(self, record: LeaseRecord | None, data: bytes, window: float) -> None:
        if record is None:
            log.warning("lease_malformed_waiting", content=repr(data[:200]), wait_seconds=round(window, 1))
        else:
            log.warning("lease_held_waiting", holder=record.holder, wait_seconds=round(window, 1))

    def _taken(self, etag: str | None, sent: float) -> None:
        self.etag, self.proven_at = etag or "", sent
        self.lost.clear()
        log.info("lease_acquired", holder=self.holder, ttl_seconds=self.ttl)
        context = contextvars.copy_context()  # the heartbeat's log lines carry the run name
        self._thread = threading.Thread(
            target=context.run, args=(self._heartbeat,), name="lease-heartbeat", daemon=True
        )
        self._thread.start()


def _holder(record: LeaseRecord | None) -> str:
    return record.holder if record is not None else "unknown: malformed lease.json"
