"""Metrics chunks: S3 has no append; readers merge chunks and keep each step once."""

from __future__ import annotations

from job.publish.metrics import METRICS_PREFIX, MetricsLog, read_step_metrics
from job.storage import LocalStore


def test_chunks_merge_and_duplicates_after_resume_collapse(tmp_path) -> None:
    store = LocalStore(tmp_path / "run")
    first = MetricsLog(store)
    for step in range(1, 7):
        first.add({"step": step, "loss": 10.0 - step})
    assert first.flush(up_to_step=4).endswith("00000001-00000004.jsonl")
    assert first.flush().endswith("00000005-00000006.jsonl")  # written at preemption
    assert first.flush() is None  # nothing new
    resumed = MetricsLog(store)  # restarted from the checkpoint at step 4: 5 and 6 run again
    for step in range(5, 9):
        resumed.add({"step": step, "loss": 10.0 - step})
    resumed.flush()
    merged = read_step_metrics(store)
    assert [r["step"] for r in merged] == list(range(1, 9))
    assert len(store.list(METRICS_PREFIX)) == 3
