"""Examples as Arrow rows of `ROW_COLUMNS`: written a batch at a time, read back memory-mapped.

`RowWriter` streams validated examples into an Arrow IPC file (or memory), so reading a dataset
holds one batch of records, never all of them; `Examples` decodes rows back into `Example`s for
code and tests that want them one at a time.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from job.data.formats import ROW_COLUMNS, Example, row_features

ROWS_PER_BATCH = 2048
"""Valid records buffered before they are written to the Arrow table as one record batch."""


class RowWriter:
    """Examples appended as rows of an Arrow IPC stream, a batch at a time: to a file in `workdir`
    (then memory-mapped by `datasets.Dataset.from_file`), or to memory without one."""

    def __init__(self, workdir: Path | None) -> None:
        import pyarrow as pa

        self.schema = row_features().arrow_schema
        if workdir is not None:
            workdir.mkdir(parents=True, exist_ok=True)
            self.path: Path | None = workdir / f"records-{uuid.uuid4().hex[:12]}.arrow"
            self.sink: Any = pa.OSFile(str(self.path), "wb")
        else:
            self.path, self.sink = None, pa.BufferOutputStream()
        self.stream = pa.ipc.new_stream(self.sink, self.schema)
        self.pending: list[dict[str, Any]] = []
        self.count = 0

    def add(self, example: Example) -> None:
        self.pending.append(example.to_row())
        self.count += 1
        if len(self.pending) >= ROWS_PER_BATCH:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa

        if self.pending:
            self.stream.write_batch(pa.RecordBatch.from_pylist(self.pending, schema=self.schema))
            self.pending = []

    def close(self) -> Any:
        import datasets

        self.flush()
        self.stream.close()
        if self.path is None:
            return datasets.Dataset.from_buffer(self.sink.getvalue())
        self.sink.close()
        return datasets.Dataset.from_file(str(self.path))


class Examples(Sequence[Example]):
    """A read-only sequence of `Example`s over an Arrow table of `ROW_COLUMNS`."""

    def __init__(self, rows: Any) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return example_from_row(self.rows[index])

    def __iter__(self) -> Iterator[Example]:
        for batch in self.rows.iter(batch_size=ROWS_PER_BATCH):
            for index in range(len(batch["source"])):
                yield example_from_row({name: batch[name][index] for name in ROW_COLUMNS})


def example_from_row(row: dict[str, Any]) -> Example:
    """The inverse of `Example.to_row`."""
    messages = row["messages"]
    return Example(
        source=row["source"],
        messages=None if messages is None else tuple(json.loads(messages)),
        text=row["text"],
        completion=row["completion"],
        prompt_turns=row["prompt_turns"] or 0,
        tools=row.get("tools"),
    )
