"""One tokenized split: examples → Arrow dataset of `input_ids`/`labels` (packed: plus `seq_lengths`).

Tokenization runs through `datasets.map` on every core the job has
(`data.num_proc`); truncation, dropping and packing follow, and the split's
statistics (tokens, trainable tokens, truncated, dropped, length percentiles)
are computed once here and kept with the cache entry, so a restart and
`validate` report the same numbers without tokenizing.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

from job.config.schema import DataConfig, TrainConfig
from job.data.formats import row_features
from job.data.masking import Tokenize, describe_example, examples_to_columns
from job.data.packing import pack_dataset, packing_summary
from job.data.read import Example
from job.data.templates import RENDER_MAX_CHARS
from job.errors import DataError
from job.logs import get_logger

log = get_logger(__name__)

MAX_LISTED = 10
EXAMPLES_PER_PROCESS = 2000  # below this a worker process costs more than it saves
BATCH_SIZE = 256


@dataclass
class DataSplit:
    """The dataset the trainer takes, and what it holds."""

    dataset: Any
    """A `datasets.Dataset`: `input_ids`, `labels` (-100: no loss) and, packed, `seq_lengths`."""
    stats: dict[str, Any]

    @property
    def packed(self) -> bool:
        return bool(self.stats["packed"])

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def tokens(self) -> int:
        """Tokens the split trains on (after truncation), padding excluded."""
        return int(self.stats["tokens"])

    @property
    def trainable_tokens(self) -> int:
        return int(self.stats["trainable_tokens"])

    @property
    def input_ids(self) -> list[list[int]]:
        return self._column("input_ids")

    @property
    def labels(self) -> list[list[int]]:
        return self._column("labels")

    def _column(self, name: str) -> list[list[int]]:
        if self.packed:  # rows without their seq_lengths would attend across examples
            raise TypeError("a packed split must reach the trainer as `.dataset` (it carries seq_lengths)")
        return self.dataset.with_format("arrow")[:][name].to_pylist()


def num_processes(configured: int, examples: int) -> int:
    """`data.num_proc` (0: every core this process may use), fewer for small data."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    wanted = configured or cores
    return max(1, min(wanted, math.ceil(examples / EXAMPLES_PER_PROCESS)))


def tokenize_split(examples: list[Example], tokenizer: Any, data: DataConfig, name: str) -> DataSplit:
    """Tokenize with masks, apply `data.truncation`, drop examples with nothing to train, pack if asked."""
    import datasets
    import numpy as np

    datasets.disable_progress_bars()  # the job logs JSON lines; progress bars would break them
    started = time.monotonic()
    processes = num_processes(data.num_proc, len(examples))
    if processes > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker process
    source = datasets.Dataset.from_dict(examples_to_columns(examples), features=row_features())
    features = datasets.Features(
        {
            "source": datasets.Value("string"),
            "input_ids": datasets.List(datasets.Value("int32")),
            "labels": datasets.List(datasets.Value("int32")),
            "full_length": datasets.Value("int32"),
            "partial": datasets.Value("bool"),
            "trainable": datasets.Value("int32"),
            "error": datasets.Value("string"),
        }
    )
    tokenized = source.map(
        Tokenize(
            tokenizer,
            train_on=data.train_on,
            max_length=data.max_length,
            max_invalid=data.max_invalid,
            render_chars=max(RENDER_MAX_CHARS, 4 * data.max_record_bytes),
        ),
        batched=True,
        batch_size=BATCH_SIZE,
        num_proc=processes if processes > 1 else None,
        remove_columns=[c for c in source.column_names if c != "source"],
        features=features,
        load_from_cache_file=False,
    )
    table = tokenized.with_format("arrow")[:]
    full = table["full_length"].to_numpy(zero_copy_only=False)
    trainable = table["trainable"].to_numpy(zero_copy_only=False)
    errors = table["error"].to_pylist()
    partial = table["partial"].to_numpy(zero_copy_only=False)
    sources = table["source"].to_pylist()
    bad = np.array([e is not None for e in errors], dtype=bool)
    full = np.where(bad, 0, full)
    too_long = full > data.max_length
    if data.truncation == "error" and too_long.any():
        shown = [
            f"{sources[i]}: {'more than ' if partial[i] else ''}{full[i]} tokens"  # only a prefix was tokenized
            for i in np.flatnonzero(too_long)[:MAX_LISTED]
        ]
        raise DataError(
            f"{int(too_long.sum())} example(s) longer than data.max_length={data.max_length}:\n  " + "\n  ".join(shown),
            hint="raise data.max_length, or set data.truncation to truncate or drop",
        )
    drop = ~bad & ((too_long & (data.truncation == "drop")) | (trainable == 0))
    keep = np.flatnonzero(~bad & ~drop)
    if not len(keep):
        raise DataError(f"no {name} example keeps a trainable token within data.max_length={data.max_length}")
    kept = tokenized.select(keep).select_columns(["input_ids", "labels"]).flatten_indices()
    lengths = np.minimum(full[keep], data.max_length)
    first = kept[0]
    stats: dict[str, Any] = {
        "examples": len(keep),
        "tokens": int(lengths.sum()),
        "trainable_tokens": int(trainable[keep].sum()),
        "truncated": int((too_long & ~bad).sum()),
        "dropped": int(drop.sum()),
        "dropped_sources": [sources[i] for i in np.flatnonzero(drop)[:100]],
        "invalid": [errors[i] for i in np.flatnonzero(bad)],
        "lengths": _percentiles(lengths),
        "packed": data.packing,
        "sequences": len(keep),
        "example": {
            "source": sources[keep[0]],
            "text": describe_example(tokenizer, first["input_ids"], first["labels"]),
        },
    }
    if data.packing:
        kept = pack_dataset(kept, data.max_length)
        stats.update(packing_summary(lengths, len(kept), data.max_length))
        stats["sequences"] = len(kept)
    seconds = time.monotonic() - started
    log.info(
        "tokenized",
        split=name,
        examples=len(examples),
        tokenized_tokens=int(full.sum()),
        processes=processes,
        seconds=round(seconds, 2),
        tokens_per_second=round(int(full.sum()) / seconds) if seconds > 0 else None,
    )
    return DataSplit(kept, stats)


def _percentiles(lengths: Any) -> dict[str, int]:
    import numpy as np

    points = {f"p{q}": int(np.percentile(lengths, q, method="inverted_cdf")) for q in (50, 90, 99)}
    return {**points, "max": int(lengths.max()), "mean": round(float(lengths.mean()), 1)}


def steps_per_epoch(sequences: int, train: TrainConfig) -> int:
    """Optimizer steps in one pass, as Trainer counts them (one process; sequences are rows, packed or not)."""
    batches = math.ceil(sequences / train.per_device_train_batch_size)
    return max(batches // train.gradient_accumulation_steps + int(batches % train.gradient_accumulation_steps > 0), 1)
