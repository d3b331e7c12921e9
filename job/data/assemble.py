"""Every `data.train` source read and validated, then mixed: cap, eval hold-out, weight.

Each source is read with its own format into its own Arrow table (`job.data.read`), tagged with
an `origin` column (its index in `data.train`) and capped to `max_examples` (a seeded sample).
The tables are joined, `data.eval_fraction` is held out of the join, and only then is each
source's training part repeated or sampled by `weight`: evaluation never holds a copy of a
training row. One plain path is a mixture of one source and reads as it always did.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from job.config.schema import JobConfig
from job.data.mixture import SourceStats, cap_indices, summarize, weight_indices
from job.data.notes import RecordNotes
from job.data.read import Dataset, file_digests, list_data_files, load_dataset, split_for_eval
from job.data.sources import FetchedSource
from job.logs import get_logger

log = get_logger(__name__)

__all__ = ["Assembled", "assemble", "data_digests", "source_rows"]

SEPARATOR = "#"
"""Between a source's name and a file inside it, in `records_per_file` and the digests of several sources."""


@dataclass
class Assembled:
    train: Any
    """A `datasets.Dataset` of `ROW_COLUMNS` plus `origin`: the training rows, weights applied."""
    eval: Any | None
    """The evaluation rows (held out of the join, or `data.eval`), or None."""
    record: dict[str, Any]
    """What validation found (cached with the data's fingerprint): format, counts, skipped records, notes and
    the sources without their token counts."""


def data_digests(fetched: list[FetchedSource]) -> dict[str, str]:
    """sha256 of every data file. One source: named relative to its root (as always); several: prefixed with
    the source's name, so equal file names in two sources stay apart."""
    if len(fetched) == 1:
        root = fetched[0].root
        return file_digests(list_data_files(root), root)
    out: dict[str, str] = {}
    for source in fetched:
        digests = file_digests(list_data_files(source.root), source.root)
        out.update({_file_key(source, name): digest for name, digest in digests.items()})
    return out


def _file_key(source: FetchedSource, name: str) -> str:
    """A file of one of several sources: the source's name, and the file's inside a directory or prefix."""
    return source.name if source.root.is_file() else f"{source.name}{SEPARATOR}{name}"


def assemble(config: JobConfig, fetched: list[FetchedSource], eval_root: Path | None, workdir: Path) -> Assembled:
    """Read, validate and mix every source (DataError, exit 65, on bad records), and the eval data."""
    import numpy as np

    data, seed = config.data, config.train.seed
    notes = RecordNotes()
    limits: dict[str, Any] = {"max_invalid": data.max_invalid, "max_record_bytes": data.max_record_bytes}
    single = len(fetched) == 1
    loaded: list[Dataset] = []
    parts, per_file, skipped = [], {}, []
    for source in fetched:
        dataset = load_dataset(
            source.root, source.config.format, workdir=workdir / f"source-{source.index}", notes=notes, **limits
        )
        loaded.append(dataset)
        rows = dataset.rows.add_column("origin", np.full(len(dataset), source.index, dtype=np.int32))
        kept = cap_indices(len(rows), source.config, seed)
        if len(kept) < len(rows):
            log.info("source_capped", source=source.name, records=len(rows), kept=len(kept))
            rows = rows.select(kept)
        parts.append(rows)
        per_file.update(
            {(name if single else _file_key(source, name)): count for name, count in dataset.records_per_file.items()}
        )
        skipped += dataset.skipped
    joined = parts[0] if single else _concatenate(parts)
    formats = sorted({dataset.format for dataset in loaded})
    fmt = formats[0] if len(formats) == 1 else "mixed"
    files = [file for dataset in loaded for file in dataset.files]
    train, held_out = split_for_eval(Dataset(joined, fmt, files), data.eval_fraction, seed)
    train_rows = _weighted(train.rows, fetched, seed)
    eval_rows, eval_per_file = (held_out.rows if held_out else None), {}
    if eval_root is not None:
        separate = load_dataset(
            eval_root, fmt if fmt != "mixed" else data.format, workdir=workdir / "eval", notes=notes, **limits
        )
        eval_rows, eval_per_file = separate.rows, separate.records_per_file
        skipped += [f"(eval) {line}" for line in separate.skipped]
        loaded.append(separate)
    notes.log()
    examples = _count_by_origin(train_rows, len(fetched))
    record = {
        "format": fmt,
        "chat": any(_has_chat(dataset) for dataset in loaded),
        "records": sum(len(dataset) for dataset in loaded[: len(fetched)]),
        "records_per_file": per_file,
        "eval_records_per_file": eval_per_file,
        "skipped": skipped,
        "notes": notes.summary(),
        "sources": [
            {"name": source.name, "format": dataset.format, "records": len(dataset), "examples": int(count),
             "weight": source.config.weight, "max_examples": source.config.max_examples, "revision": source.revision}
            for source, dataset, count in zip(fetched, loaded, examples, strict=False)
        ],
    }  # fmt: skip
    return Assembled(train_rows, eval_rows, record)


def source_rows(record: dict[str, Any], tokens_by_origin: list[int]) -> list[dict[str, Any]]:
    """The per-source rows `validate --json` and the model card show: the validation record's sources with the
    tokens each gives the training split and its share of them."""
    stats = [
        SourceStats(
            name=entry["name"], format=entry["format"], records=entry["records"], examples=entry["examples"],
            weight=entry["weight"], max_examples=entry["max_examples"],
            tokens=tokens_by_origin[index] if index < len(tokens_by_origin) else 0, revision=entry["revision"],
        )
        for index, entry in enumerate(record.get("sources", []))
    ]  # fmt: skip
    return summarize(stats)


def _concatenate(parts: list[Any]) -> Any:
    import datasets

    return datasets.concatenate_datasets(parts)


def _weighted(rows: Any, fetched: list[FetchedSource], seed: int) -> Any:
    """Each source's training rows taken `weight` times (whole repeats, then a seeded sample), in source order."""
    import numpy as np

    if all(source.config.weight == 1 for source in fetched):
        return rows
    origin = _origins(rows)
    chosen = []
    for source in fetched:
        own = np.flatnonzero(origin == source.index)
        taken = weight_indices(own, source.config, seed)
        if len(own) and not len(taken):
            log.warning("source_weight_leaves_nothing", source=source.name, weight=source.config.weight)
        chosen.append(taken)
    return rows.select(np.concatenate(chosen))


def _origins(rows: Any) -> Any:
    return rows.select_columns(["origin"]).with_format("arrow")[:]["origin"].to_numpy(zero_copy_only=False)


def _count_by_origin(rows: Any, sources: int) -> list[int]:
    import numpy as np

    return [int(n) for n in np.bincount(_origins(rows), minlength=sources)[:sources]] if len(rows) else [0] * sources


def _has_chat(dataset: Dataset) -> bool:
    """Whether any row is a chat (the whole table: a split's rows are a selection of it)."""
    messages = dataset.rows.data.column("messages")
    return messages.null_count < len(messages)
