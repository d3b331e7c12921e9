"""Step metrics that outlive the pod: chunk objects in the store, merged by readers.

S3 has no append, so metrics go to `logs/metrics/<first>-<last>.jsonl`, one new
object per flush. After a resume some steps are trained (and written) twice; a
reader merges all chunks and keeps one line per step, the newest chunk's.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

from job.logs import get_logger
from job.storage import Store

log = get_logger(__name__)

METRICS_PREFIX = "logs/metrics"


class MetricsLog:
    """Collects per-step records (dicts with a `step`) and flushes unwritten ones as chunks."""

    def __init__(self, store: Store, *, enabled: bool = True) -> None:
        self.store = store
        self.enabled = enabled
        """False on every rank but 0: one writer per run."""
        self._records: list[dict[str, Any]] = []
        self._flushed = 0
        self._lock = threading.Lock()

    def add(self, record: Any) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._records.append(asdict(record) if hasattr(record, "__dataclass_fields__") else dict(record))

    def flush(self, up_to_step: int | None = None) -> str | None:
        """Write the unflushed records (those up to `up_to_step`) as one chunk; returns its key."""
        with self._lock:
            pending = [r for r in self._records[self._flushed :] if up_to_step is None or r["step"] <= up_to_step]
            if not pending:
                return None
            self._flushed += len(pending)
        key = f"{METRICS_PREFIX}/{pending[0]['step']:08d}-{pending[-1]['step']:08d}.jsonl"
        body = "".join(json.dumps(r, sort_keys=True) + "\n" for r in pending).encode()
        try:
            self.store.write_bytes(key, body)
        except Exception as exc:  # metrics must never stop training
            log.warning("metrics_flush_failed", key=key, error=str(exc))
            return None
        return key


def read_step_metrics(store: Store) -> list[dict[str, Any]]:
    """All step records of a run, one per step, ordered by step (later chunks win on duplicates)."""
    by_step: dict[int, dict[str, Any]] = {}
    chunks = sorted(store.list(METRICS_PREFIX), key=lambda info: (info.key.rsplit("/", 1)[-1], info.key))
    for info in chunks:
        if not info.key.endswith(".jsonl"):
            continue
        for line in store.read_bytes(info.key).decode().splitlines():
            if line.strip():
                record = json.loads(line)
                by_step[int(record["step"])] = record
    return [by_step[step] for step in sorted(by_step)]


@dataclass
class Timings:
    """Seconds spent in each phase of this start (written to final/metrics.json as `timings`)."""

    prepare_seconds: float = 0.0
    load_seconds: float = 0.0
    train_seconds: float = 0.0
    publish_seconds: float = 0.0
    checkpoint_save_seconds: list[float] = field(default_factory=list)
    """Local save time of each checkpoint this start committed."""
    checkpoint_upload_seconds: list[float] = field(default_factory=list)

    def phases_seconds(self) -> float:
        return self.prepare_seconds + self.load_seconds + self.train_seconds + self.publish_seconds
