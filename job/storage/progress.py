"""Progress of a pull or push: steady progress lines for big transfers, one summary line each.

Transfer threads only add byte counts (under a lock); a separate reporter thread logs at a
fixed interval, so a stalled transfer still shows up in the log (as 0 MB/s) instead of going quiet.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType

import structlog

log = structlog.get_logger(__name__)

MB = 1_000_000
PROGRESS_MIN_BYTES = 8 * 1024 * 1024
"""Transfers below this size log only their summary line."""


class Progress:
    """Counts bytes of one operation (`pull`/`push`) on `uri`; use as a context manager."""

    def __init__(self, op: str, uri: str, total_bytes: int, interval: float, *, files: int = 0) -> None:
        self.op = op
        self.uri = uri
        self.total_bytes = total_bytes
        self.files = files
        self.skipped_files = 0
        self.skipped_bytes = 0
        self.interval = interval
        self.done_bytes = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0
        self.seconds = 0.0

    def add(self, amount: int) -> None:
        """Bytes moved (negative when s3transfer rewinds a retried part)."""
        with self._lock:
            self.done_bytes += amount

    def skip(self, size: int) -> None:
        """A file that did not need transferring (unchanged since the last pull)."""
        self.skipped_files += 1
        self.skipped_bytes += size

    def __enter__(self) -> Progress:
        self._started = time.monotonic()
        if self.total_bytes >= PROGRESS_MIN_BYTES:
            self._thread = threading.Thread(target=self._report_loop, name=f"storage-{self.op}-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.seconds = time.monotonic() - self._started
        moved = self.done_bytes
        fields = {
            "uri": self.uri,
            "files": self.files,
            "bytes": moved,
            "seconds": round(self.seconds, 3),
            "mb_s": round(moved / MB / self.seconds, 1) if self.seconds > 0 else None,
        }
        if self.skipped_files:
            fields.update(skipped_files=self.skipped_files, skipped_bytes=self.skipped_bytes)
        if error is None:
            log.info(f"storage_{self.op}_done", **fields)
        else:
            log.warning(f"storage_{self.op}_failed", error_type=type(error).__name__, **fields)

    def _report_loop(self) -> None:
        last_bytes, last_time = 0, self._started
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            with self._lock:
                done = self.done_bytes
            if done >= self.total_bytes:
                continue  # all bytes moved; the rest (verification, commit) ends with the summary line
            # Rate over the last interval (what the link does now), ETA from the overall average.
            rate = (done - last_bytes) / (now - last_time) if now > last_time else 0.0
            average = done / (now - self._started) if now > self._started else 0.0
            remaining = max(self.total_bytes - done, 0)
            log.info(
                f"storage_{self.op}_progress",
                uri=self.uri,
                done_mb=round(done / MB, 1),
                total_mb=round(self.total_bytes / MB, 1),
                percent=round(100.0 * done / self.total_bytes, 1),
                mb_s=round(rate / MB, 1),
                eta_s=round(remaining / average) if done >= MB else None,  # no guess from a standing start
            )
            last_bytes, last_time = done, now
