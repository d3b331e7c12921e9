"""Packing: TRL's best-fit decreasing (`trl.pack_dataset(strategy="bfd")`) over a whole split, and
continued-pretraining blocks.

Each packed row keeps `seq_lengths`; TRL's padding-free collator turns them into positions that
restart per example, so no loss or attention crosses an example boundary. This adapter packs the
split as one batch (TRL's default of 1000 leaves half-empty rows per batch), refuses over-long or
empty examples (truncation happened before: such an example is a bug), and goes 64-bit past 2^31
tokens. Measurements against the former packer: docs/data.md, "Packing".

`cut_blocks` joins whole documents in order and cuts them into `max_length` rows (the last one
shorter), streaming: its `seq_lengths` are the document pieces, so a block is trained as if each
piece ran alone and no token is lost.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from job.errors import DataError

COLUMNS = ["input_ids", "labels"]
LARGE_LIST_FROM = 2**31
"""Total tokens from which the packed columns are `large_list` (64-bit offsets)."""
IGNORE_INDEX = -100
DOCUMENTS_PER_READ = 256
"""Documents read at once when cutting blocks: at most 256 x data.max_record_bytes of text's tokens."""


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


def cut_blocks(documents: Any, capacity: int, workdir: Path | None) -> tuple[Any, dict[str, int]]:
    """Whole documents (`input_ids`, `labels`, in order) joined and cut into rows of `capacity` tokens.

    Returns a `datasets.Dataset` of `input_ids`, `labels`, `seq_lengths` (written to `workdir` and
    memory-mapped, or in memory without one) and its counts: `blocks`, `tokens`, `trainable_tokens`
    (labels that take a loss: the first token of each piece predicts nothing, as in packing)."""
    import datasets
    import pyarrow as pa

    schema = pa.schema([(name, pa.list_(pa.int32())) for name in (*COLUMNS, "seq_lengths")])
    path = workdir / f"blocks-{id(documents):x}-{capacity}.arrow" if workdir is not None else None
    sink: Any = pa.OSFile(str(path), "wb") if path is not None else pa.BufferOutputStream()
    counts = {"blocks": 0, "tokens": 0, "trainable_tokens": 0}
    with pa.ipc.new_stream(sink, schema) as stream:
        for batch, trainable in _blocks(documents, capacity, schema):
            stream.write_batch(batch)
            counts["blocks"] += batch.num_rows
            counts["tokens"] += len(batch.column(0).values)
            counts["trainable_tokens"] += trainable
    if path is None:
        return datasets.Dataset.from_buffer(sink.getvalue()), counts
    sink.close()
    return datasets.Dataset.from_file(str(path)), counts


def _blocks(documents: Any, capacity: int, schema: Any) -> Iterator[tuple[Any, int]]:
    """Record batches of full blocks as documents are read; the rest carries over, the last block is shorter."""
    import numpy as np
    import pyarrow.compute as pc

    ids = labels = np.empty(0, dtype=np.int32)
    pieces = np.empty(0, dtype=np.int64)
    reader = documents.select_columns(COLUMNS).with_format("arrow").iter(batch_size=DOCUMENTS_PER_READ)
    for table in (*reader, None):
        if table is not None:
            column = table["input_ids"]
            ids = np.concatenate([ids, pc.list_flatten(column).to_numpy(zero_copy_only=False)])
            labels = np.concatenate([labels, pc.list_flatten(table["labels"]).to_numpy(zero_copy_only=False)])
            pieces = np.concatenate([pieces, pc.list_value_length(column).to_numpy(zero_copy_only=False)])
        used = len(ids) if table is None else len(ids) // capacity * capacity
        if used:
            yield _cut(ids[:used], labels[:used], pieces, capacity, schema)
            ends = np.cumsum(pieces)
            pieces = np.diff(ends[ends > used] - used, prepend=0)
            ids, labels = ids[used:], labels[used:]


def _cut(ids: Any, labels: Any, pieces: Any, capacity: int, schema: Any) -> tuple[Any, int]:
    """Rows of `capacity` tokens (the last may be shorter) and their trainable labels."""
    import numpy as np
    import pyarrow as pa

    used = len(ids)
    ends = np.cumsum(pieces)
    bounds = np.union1d(ends[ends < used], np.arange(0, used, capacity))  # document ends and block starts
    lengths = np.diff(bounds, append=used)
    rows = -(-used // capacity)
    token_offsets = pa.array(np.minimum(np.arange(rows + 1) * capacity, used), pa.int32())
    piece_offsets = pa.array(np.searchsorted(bounds // capacity, np.arange(rows + 1)), pa.int32())
    columns = [
        pa.ListArray.from_arrays(token_offsets, pa.array(ids, pa.int32())),
        pa.ListArray.from_arrays(token_offsets, pa.array(labels, pa.int32())),
        pa.ListArray.from_arrays(piece_offsets, pa.array(lengths, pa.int32())),
    ]
    trained = labels != IGNORE_INDEX
    return pa.RecordBatch.from_arrays(columns, schema=schema), int(trained.sum() - trained[bounds].sum())
