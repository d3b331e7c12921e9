"""One writer per run: a lease object in the store, taken and renewed with conditional writes.

`lease.json` holds the holder's id, its heartbeat time and its expiry. A starting
process creates it (`IfNoneMatch: *`); finding a live one, it waits until that
lease's expiry plus a margin: a dead predecessor (a replaced pod) leaves a lease
that simply runs out, and is taken over (`IfMatch: <etag>`); a holder that kept
renewing meanwhile is alive, and we exit 69 without writing anything. The holder
renews every `ttl / 3` seconds; a renewal that finds another holder's lease means
we lost it, and training stops before writing again.
"""

from __future__ import annotations

import contextvars
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from job.errors import StorageUnavailable
from job.logs import get_logger
from job.storage import AlreadyExists, Store
from job.storage.base import ETagMismatch

log = get_logger(__name__)

LEASE_KEY = "lease.json"


@dataclass
class LeaseRecord:
    holder: str
    heartbeat: float
    expires: float

    def to_bytes(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()

    @classmethod
    def parse(cls, data: bytes) -> LeaseRecord:
        body = json.loads(data)
        return cls(str(body["holder"]), float(body["heartbeat"]), float(body["expires"]))


class Lease:
    def __init__(self, store: Store, ttl: float, *, margin: float | None = None, clock=time.time) -> None:
        self.store = store
        self.ttl = ttl
        self.margin = ttl / 2 if margin is None else margin
        self.clock = clock
        self.holder = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self.etag: str | None = None
        self.last_heartbeat = 0.0
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> LeaseRecord:
        now = self.clock()
        self.last_heartbeat = now
        return LeaseRecord(self.holder, now, now + self.ttl)

    def acquire(self) -> None:
        """Take the lease, waiting out a predecessor's; StorageUnavailable(69) if a live holder keeps it."""
        deadline: float | None = None
        while True:
            try:
                self.etag = self.store.write_bytes(LEASE_KEY, self._record().to_bytes(), if_absent=True)
                break
            except AlreadyExists:
                pass
            data, etag = self.store.read_bytes_with_etag(LEASE_KEY)
            current = LeaseRecord.parse(data)
            now = self.clock()
            if current.expires <= now:
                try:
                    self.etag = self.store.write_bytes_if_match(LEASE_KEY, self._record().to_bytes(), etag)
                    log.info("lease_taken_over", previous_holder=current.holder)
                    break
                except ETagMismatch:
                    continue  # someone else moved first; look again
            if deadline is None:
                deadline = current.expires + self.margin
                log.warning(
                    "lease_held_waiting",
                    holder=current.holder,
                    expires_in_seconds=round(current.expires - now, 1),
                    wait_seconds=round(deadline - now, 1),
                )
            elif now >= deadline:
                # Past the expiry we first saw, yet not expired: its holder renewed it, so it is alive.
                raise StorageUnavailable(
                    f"run is being written by a live process ({current.holder}); it kept renewing its lease",
                    hint="two jobs on one run name: stop one, or wait for it to finish",
                )
            time.sleep(min(max(self.ttl / 10, 0.2), 2.0))
        log.info("lease_acquired", holder=self.holder, ttl_seconds=self.ttl)
        context = contextvars.copy_context()  # the heartbeat's log lines carry the run name
        self._thread = threading.Thread(
            target=context.run, args=(self._heartbeat,), name="lease-heartbeat", daemon=True
        )
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            if not self.renew():
                return

    def renew(self) -> bool:
        """Extend the lease; False (and `lost` set) when another process has replaced it."""
        try:
            self.etag = self.store.write_bytes_if_match(LEASE_KEY, self._record().to_bytes(), self.etag or "")
        except ETagMismatch:
            self.lost.set()
            log.error("lease_lost", holder=self.holder, reason="another process replaced our lease")
            return False
        except Exception as exc:  # a transient store error: keep trying until the lease would expire
            log.warning("lease_renewal_failed", error=str(exc))
        return True

    def release(self) -> None:
        """Stop renewing and expire the lease at once, so the next start need not wait."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.etag is None or self.lost.is_set():
            return
        # Expired, but the last heartbeat kept: `status` orders a failure record against it.
        expired = LeaseRecord(self.holder, self.last_heartbeat, 0.0)
        try:
            self.store.write_bytes_if_match(LEASE_KEY, expired.to_bytes(), self.etag)
        except Exception as exc:  # it will expire by itself
            log.warning("lease_release_failed", error=str(exc))
        self.etag = None
