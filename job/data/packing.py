"""Packing: TRL's best-fit decreasing (`trl.pack_dataset(strategy="bfd")`) over a whole split.

Each packed row keeps `seq_lengths`; TRL's padding-free collator turns them into positions that
restart per example, so no loss or attention crosses an example boundary. This adapter packs the
split as one batch (TRL's default of 1000 leaves half-empty rows per batch), refuses over-long or
empty examples (truncation happened before: such an example is a bug), and goes 64-bit past 2^31
tokens. Measurements against the former packer: docs/data.md, "Packing".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from job.errors import DataError

COLUMNS = ["input_ids", "labels"]
LARGE_LIST_FROM = 2**31
"""Total tokens from which the packed columns are `large_list` (64-bit offsets)."""


def pack_dataset(dataset: Any, capacity: int) -> Any:
    """A `datasets.Dataset` of packed rows: `input_ids`, `labels` and `seq_lengths`, in TRL's layout."""
    import datasets
    import pyarrow.compute as pc
    from trl import pack_dataset as trl_pack_dataset

    dataset = dataset.select_columns(COLUMNS)
    lengths = pc.list_value_length(dataset.with_format("arrow")[:]["input_ids"])
    if len(lengths):
        low, high = pc.min_max(lengths).values()
        for need in (high.as_py(), low.as_py()):
            if need > capacity or need <= 0:
                raise DataError(f"cannot pack an example of {need} tokens into sequences of {capacity}")
        if pc.sum(lengths).as_py() >= LARGE_LIST_FROM:
            features = dataset.features.copy()
            for column in COLUMNS:
                features[column] = datasets.LargeList(features[column].feature)
            dataset = dataset.cast(features)
    return trl_pack_dataset(
        dataset,
        capacity,
        strategy="bfd",
        map_kwargs={"batch_size": None, "load_from_cache_file": False, "keep_in_memory": True},
    )


def packing_summary(lengths: Sequence[int], rows: int, capacity: int) -> dict[str, float | int]:
    """How full the packed sequences are: tokens over rows x capacity."""
    total = int(sum(lengths))
    return {
        "packed_sequences": rows,
        "packing_efficiency": round(total / (rows * capacity), 4) if rows else 0.0,
    }
