"""One tokenized split: examples → Arrow dataset of `input_ids`/`labels` (packed or blocks: plus `seq_lengths`).

Tokenization runs through `datasets.map` on every core the job has (`data.num_proc`) over the
memory-mapped rows; truncation, dropping and packing follow for examples, while `text` documents
(`data.text_mode: blocks`) are tokenized whole and cut into blocks. The split's statistics
(tokens before and after, trainable tokens, truncated, dropped, length percentiles, special
strings) are computed once here and kept with the cache entry, so a restart and `validate`
report the same numbers without tokenizing.
"""

from __future__ import annotations

import inspect
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from job.config.schema import DataConfig, TrainConfig
from job.data.formats import row_features
from job.data.masking import Tokenize, describe_example, examples_to_columns
from job.data.packing import cut_blocks, pack_dataset, packing_summary
from job.data.templates import RENDER_MAX_CHARS
from job.errors import DataError
from job.logs import get_logger

log = get_logger(__name__)

MAX_LISTED = 10
EXAMPLES_PER_PROCESS = 2000  # below this a worker process costs more than it saves
BATCH_SIZE = 256
WHOLE = 1 << 62
"""`max_length` that makes `Tokenize` tokenize a document whole."""
WHOLE_CHARS = 1 << 22
"""Characters of documents tokenized together: a group's encodings and Python lists stay bounded."""
OUTPUTS = ("input_ids", "labels", "full_length", "partial", "trainable", "error", "special_strings")


def _features() -> Any:
    import datasets

    ints = datasets.List(datasets.Value("int32"))
    kinds = {"source": "string", "full_length": "int32", "partial": "bool", "trainable": "int32", "error": "string"}
    kinds["origin"] = "int32"  # the example's source in `data.train` (its index): token shares per source
    columns = {"input_ids": ints, "labels": ints, **{k: datasets.Value(v) for k, v in kinds.items()}}
    columns |= {"special_strings": datasets.Value("int32"), "block": datasets.Value("bool")}
    return datasets.Features(columns)


@dataclass
class DataSplit:
    """The dataset the trainer takes, and what it holds."""

    dataset: Any
    """A `datasets.Dataset`: `input_ids`, `labels` (-100: no loss) and, packed, `seq_lengths`."""
    stats: dict[str, Any]

    @property
    def packed(self) -> bool:
        """Rows carry `seq_lengths` (packing, or continued-pretraining blocks): the trainer must run padding-free."""
        return bool(self.stats.get("seq_lengths", self.stats["packed"]))

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


class TokenizeRows:
    """`Tokenize` per row kind: `text` documents whole when they become blocks (their ids kept as int32
    arrays, so a batch of long documents costs about its text's size), everything else per example with
    `data.max_length`. Adds `block` (the row goes to blocks) and `special_strings` (0 where `Tokenize`
    does not count them)."""

    def __init__(self, tokenizer: Any, data: DataConfig) -> None:
        options: dict[str, Any] = {"train_on": data.train_on, "max_invalid": data.max_invalid}
        options["render_chars"] = max(RENDER_MAX_CHARS, 4 * data.max_record_bytes)
        if "special_strings" in inspect.signature(Tokenize).parameters:
            options["special_strings"] = data.special_strings
        self.examples = Tokenize(tokenizer, max_length=data.max_length, **options)
        self.documents = Tokenize(tokenizer, max_length=WHOLE, **options) if data.text_mode == "blocks" else None

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        import numpy as np

        count = len(batch["source"])
        whole = [
            self.documents is not None and batch["messages"][i] is None and batch["completion"][i] is None
            for i in range(count)
        ]
        out: dict[str, list] = {name: [None] * count for name in OUTPUTS}
        groups = [(self.examples, [i for i in range(count) if not whole[i]])]
        rows = [i for i in range(count) if whole[i]]
        while rows:  # documents in groups of bounded size: one huge document is tokenized alone
            size, cut = 0, 0
            while cut < len(rows) and (cut == 0 or size + len(batch["text"][rows[cut]]) <= WHOLE_CHARS):
                size, cut = size + len(batch["text"][rows[cut]]), cut + 1
            groups.append((self.documents, rows[:cut]))
            rows = rows[cut:]
        for tokenize, indices in groups:
            if not indices:
                continue
            result = tokenize({name: [values[i] for i in indices] for name, values in batch.items()})
            for name in OUTPUTS:
                values = result.get(name) or [0] * len(indices)
                for index, value in zip(indices, values, strict=True):
                    compact = name in ("input_ids", "labels") and value is not None  # one type per batch
                    out[name][index] = np.asarray(value, dtype=np.int32) if compact else value
        out["block"] = whole
        out["source"] = batch["source"]
        out["origin"] = batch["origin"] if "origin" in batch else [0] * count
        return out


def tokenize_split(examples: Any, tokenizer: Any, data: DataConfig, name: str) -> DataSplit:
    """Tokenize with masks, apply `data.truncation`, drop examples with nothing to train, pack if asked;
    `text` documents become blocks (`data.text_mode: blocks`). `examples`: a `datasets.Dataset` of
    `ROW_COLUMNS` (`job.data.read.Dataset.rows`) or a list of `Example`s."""
    import datasets
    import numpy as np

    datasets.disable_progress_bars()  # the job logs JSON lines; progress bars would break them
    started = time.monotonic()
    if not isinstance(examples, datasets.Dataset):
        examples = datasets.Dataset.from_dict(examples_to_columns(list(examples)), features=row_features())
    processes = num_processes(data.num_proc, len(examples))
    if processes > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker process
    tokenized = examples.map(
        TokenizeRows(tokenizer, data),
        batched=True,
        batch_size=BATCH_SIZE,
        num_proc=processes if processes > 1 else None,
        remove_columns=examples.column_names,
        features=(features := _features()),
        load_from_cache_file=False,
    )
    meta = tokenized.select_columns([c for c in features if c not in ("input_ids", "labels")])
    table = meta.with_format("arrow")[:]
    full = table["full_length"].to_numpy(zero_copy_only=False)
    trainable = table["trainable"].to_numpy(zero_copy_only=False)
    partial = table["partial"].to_numpy(zero_copy_only=False)
    block = table["block"].to_numpy(zero_copy_only=False)
    special = table["special_strings"].to_numpy(zero_copy_only=False)
    sources = table["source"]
    bad = table["error"].is_valid().to_numpy(zero_copy_only=False)
    full = np.where(bad, 0, full)
    too_long = (full > data.max_length) & ~block
    if data.truncation == "error" and too_long.any():
        shown = [
            f"{sources[i]}: {'more than ' if partial[i] else ''}{full[i]} tokens"  # only a prefix was tokenized
            for i in np.flatnonzero(too_long)[:MAX_LISTED]
        ]
        raise DataError(
            f"{int(too_long.sum())} example(s) longer than data.max_length={data.max_length}:\n  " + "\n  ".join(shown),
            hint="raise data.max_length, or set data.truncation to truncate or drop",
        )
    drop = ~bad & ~block & ((too_long & (data.truncation == "drop")) | (trainable == 0))
    keep = np.flatnonzero(~bad & ~drop & ~block)
    documents = np.flatnonzero(~bad & block)
    if not len(keep) and not len(documents):
        raise DataError(f"no {name} example keeps a trainable token within data.max_length={data.max_length}")
    lengths = np.minimum(full[keep], data.max_length)
    stats: dict[str, Any] = {
        "examples": len(keep) + len(documents),
        "tokens_total": int(full.sum()),
        "tokens_total_at_least": bool(partial[~bad].any()),  # some long example was tokenized only in part
        "tokens": int(lengths.sum()),
        "trainable_tokens": int(trainable[keep].sum()),
        "truncated": int(too_long[~bad].sum()),
        "dropped": int(drop.sum()),
        "dropped_sources": _take(sources, np.flatnonzero(drop)[:100]),
        "invalid": _take(table["error"], np.flatnonzero(bad)),
        "packed": data.packing,
        "documents": len(documents),
        "blocks": 0,
        "special_strings": _special_strings(special, sources, bad),
        "sources_head": _take(sources, np.concatenate([keep[:100], documents[: max(0, 100 - len(keep))]])),
    }
    parts, row_lengths = [], [lengths]
    if len(keep):
        kept = tokenized.select(keep).select_columns(["input_ids", "labels"]).flatten_indices()
        first = kept[0]
        if data.packing:
            kept = pack_dataset(kept, data.max_length)
            stats.update(packing_summary(lengths, len(kept), data.max_length))
        elif len(documents):
            kept = kept.with_format("arrow").map(_one_piece, batched=True).with_format(None)
        parts.append(kept)
    if len(documents):
        whole = tokenized.select(documents).select_columns(["input_ids", "labels"])
        if not len(keep):
            first = {k: v[: data.max_length] for k, v in whole[0].items()}
        blocks, counts = cut_blocks(whole, data.max_length, _workdir(tokenized))
        stats["blocks"] = counts["blocks"]
        stats["tokens"] += counts["tokens"]
        stats["trainable_tokens"] += counts["trainable_tokens"]
        row_lengths.append(_row_lengths(blocks))
        parts.append(blocks.cast(parts[0].features) if parts else blocks)
    dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    stats["tokens_kept"] = stats["tokens"]
    origin = table["origin"].to_numpy(zero_copy_only=False)
    size = int(origin.max()) + 1 if len(origin) else 1
    by_origin = np.zeros(size, dtype=np.int64)
    np.add.at(by_origin, origin[keep], lengths)
    np.add.at(by_origin, origin[documents], full[documents])  # blocks keep every document token
    stats["tokens_by_origin"] = [int(t) for t in by_origin]
    stats["lengths"] = _percentiles(np.concatenate(row_lengths))
    stats["seq_lengths"] = "seq_lengths" in dataset.column_names
    stats["sequences"] = len(dataset)
    stats["example"] = {
        "source": stats["sources_head"][0],
        "text": describe_example(tokenizer, first["input_ids"], first["labels"]),
    }
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
    return DataSplit(dataset, stats)


def _take(column: Any, indices: Any) -> list:
    return column.take(indices).to_pylist() if len(indices) else []


def _special_strings(counts: Any, sources: Any, bad: Any) -> dict[str, Any]:
    """Records whose content holds special-token strings, how many strings, and the first record."""
    hits = (counts > 0) & ~bad
    first = _take(sources, hits.nonzero()[0][:1])
    return {"records": int(hits.sum()), "occurrences": int(counts[~bad].sum()), "first": first[0] if first else None}


def _one_piece(table: Any) -> Any:
    """Unpacked rows as single pieces, so they share a split with blocks (padding-free, positions per piece)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    lengths = pc.list_value_length(table["input_ids"]).cast(pa.int32()).combine_chunks()
    offsets = pa.array(range(len(lengths) + 1), pa.int32())
    return table.append_column("seq_lengths", pa.ListArray.from_arrays(offsets, lengths))


def _row_lengths(dataset: Any) -> Any:
    import pyarrow.compute as pc

    column = dataset.with_format("arrow")[:]["input_ids"]
    return pc.list_value_length(column).to_numpy(zero_copy_only=False)


def _workdir(dataset: Any) -> Path | None:
    """Where `datasets` keeps this dataset's files (the blocks go next to them), or None in memory."""
    files = dataset.cache_files
    return Path(files[0]["filename"]).parent if files else None


def _percentiles(lengths: Any) -> dict[str, int]:
    import numpy as np

    points = {f"p{q}": int(np.percentile(lengths, q, method="inverted_cdf")) for q in (50, 90, 99)}
    return {**points, "max": int(lengths.max()), "mean": round(float(lengths.mean()), 1)}


def steps_per_epoch(sequences: int, train: TrainConfig) -> int:
    """Optimizer steps in one pass, as Trainer counts them (one process; sequences are rows, packed or not)."""
    batches = math.ceil(sequences / train.per_device_train_batch_size)
    return max(batches // train.gradient_accumulation_steps + int(batches % train.gradient_accumulation_steps > 0), 1)
