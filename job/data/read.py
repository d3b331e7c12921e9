"""Read dataset files and validate every record with its file:line, before any model weights load.

Files: `.jsonl`, `.json` (an array of records, or JSON Lines under that name),
`.parquet`, and gzip- or zstd-compressed JSON/JSONL (`.gz`, `.zst`); one file
or a directory of them, read in sorted order. Formats and their checks live
in `job.data.formats`. Up to `max_invalid` bad records are skipped and returned
for the run's report; more, or none left, is a DataError (exit 65) listing
them.
"""

from __future__ import annotations

import gzip
import io
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from job.data.formats import Example, describe_unknown, detect_format, parse_record
from job.errors import DataError, InputNotFound
from job.logs import get_logger

__all__ = ["Dataset", "Example", "file_digests", "list_data_files", "load_dataset", "split_for_eval"]

log = get_logger(__name__)

COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
BASE_SUFFIXES = (".jsonl", ".ndjson", ".json")
DATA_SUFFIXES = (
    *BASE_SUFFIXES,
    *(base + comp for base in BASE_SUFFIXES for comp in COMPRESSIONS),
    ".parquet",
)
MAX_REPORTED_ERRORS = 10
READ_ERRORS = (OSError, EOFError, ValueError)  # ValueError: pyarrow's ArrowInvalid on a corrupt zstd frame


@dataclass
class Dataset:
    examples: list[Example]
    format: str
    files: list[Path]
    skipped: list[str] = field(default_factory=list)
    """Bad records skipped under `data.max_invalid`, each `location: reason`."""
    records_per_file: dict[str, int] = field(default_factory=dict)
    """Valid records per file (paths relative to the dataset root)."""

    def __len__(self) -> int:
        return len(self.examples)


def list_data_files(path: Path) -> list[Path]:
    """The data files under `path` (itself if a file), in a stable order; hidden files are ignored."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputNotFound(f"dataset {path} does not exist")
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.name.lower().endswith(DATA_SUFFIXES)
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise InputNotFound(
            f"dataset directory {path} holds no data files", hint=f"expected files ending in {', '.join(DATA_SUFFIXES)}"
        )
    return files


def relative_name(file: Path, root: Path) -> str:
    """A file's name relative to the dataset root: stable across machines and scratch directories."""
    return file.name if file == root else file.relative_to(root).as_posix()


def load_dataset(path: Path, fmt: str = "auto", *, max_invalid: int = 0) -> Dataset:
    """Read and validate every record under `path`; DataError lists bad records with file:line."""
    files = list_data_files(path)
    examples: list[Example] = []
    errors: list[str] = []
    per_file: dict[str, int] = {}
    detected, detected_at = (None, "") if fmt == "auto" else (fmt, "data.format")
    for file in files:
        before = len(examples)
        for location, record in read_records(file, errors):
            if detected is None:
                detected = detect_format(record)
                if detected is None:
                    errors.append(str(describe_unknown(record, location)))
                    continue
                detected_at = location
            try:
                examples.append(parse_record(record, detected, location))
            except DataError as exc:
                errors.append(_with_format_note(exc, record, detected, detected_at))
        per_file[relative_name(file, path)] = len(examples) - before
    if len(errors) > max_invalid:
        shown = "\n  ".join(errors[:MAX_REPORTED_ERRORS])
        more = f"\n  ... and {len(errors) - MAX_REPORTED_ERRORS} more" if len(errors) > MAX_REPORTED_ERRORS else ""
        raise DataError(
            f"{len(errors)} bad record(s) in {path} (data.max_invalid={max_invalid}):\n  {shown}{more}",
            hint="fix the records, or raise data.max_invalid to skip them (they are listed in the run's reports/)",
        )
    if not examples:
        raise DataError(f"dataset {path} holds no records", hint="an empty dataset trains nothing")
    if errors:
        log.warning("invalid_records_skipped", count=len(errors), max_invalid=max_invalid, first=errors[0])
    log.info("dataset_loaded", path=str(path), files=len(files), records=len(examples), format=detected)
    return Dataset(examples, detected or fmt, files, errors, per_file)


def _with_format_note(exc: DataError, record: Any, fmt: str, detected_at: str) -> str:
    """Name where the dataset's format came from when a record is in another one."""
    other = detect_format(record)
    if other is None or other == fmt:
        return str(exc)
    return f"{exc} (the dataset's format `{fmt}` was detected at {detected_at}; this record looks like `{other}`)"


# ---------------------------------------------------------------- readers


def read_records(file: Path, errors: list[str]) -> Iterator[tuple[str, Any]]:
    """(location, record) for every record of `file`; unreadable records are appended to `errors`."""
    name = file.name.lower()
    if name.endswith(".parquet"):
        yield from _read_parquet(file)
        return
    try:
        with _open(file) as handle:
            is_json = name.endswith((".json", *(f".json{c}" for c in COMPRESSIONS)))
            head = handle.peek(4096).lstrip()[:1]
            if is_json and head == b"[":  # an array; otherwise the file holds JSON Lines under a .json name
                yield from _read_json_array(file, handle.read())
            else:
                yield from _read_jsonl(file, handle, errors)
    except READ_ERRORS as exc:  # a corrupt gzip/zstd stream fails on its first read
        raise DataError(f"{file}: cannot read the file: {exc}") from None


def _open(file: Path) -> io.BufferedReader:
    """A buffered binary stream of the file, decompressed by suffix (zstd through pyarrow, which `datasets`
    already brings)."""
    compression = COMPRESSIONS.get(file.suffix.lower())
    if compression == "gzip":
        return io.BufferedReader(gzip.open(file, "rb"))  # type: ignore[arg-type]
    if compression == "zstd":
        import pyarrow as pa

        return io.BufferedReader(pa.input_stream(str(file), compression="zstd"))  # type: ignore[arg-type]
    return open(file, "rb")


def _read_jsonl(file: Path, handle: io.BufferedReader, errors: list[str]) -> Iterator[tuple[str, Any]]:
    number = 0
    try:
        for number, raw in enumerate(handle, start=1):
            location = f"{file}:{number}"
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                errors.append(f"{location}: invalid UTF-8 at byte {exc.start}")
                continue
            try:
                yield location, json.loads(line)
            except json.JSONDecodeError as exc:
                errors.append(f"{location}: malformed JSON ({exc.msg} at column {exc.colno})")
    except READ_ERRORS as exc:  # gzip/zstd streams fail while reading, not on open
        raise DataError(f"{file}:{number + 1}: cannot decompress the file: {exc}") from None


def _read_json_array(file: Path, data: bytes) -> Iterator[tuple[str, Any]]:
    """Each element of a JSON array with the line it starts on; a syntax error ends the file (exit 65)."""
    start = len(data) - len(data.lstrip())
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{file}:{line}: invalid UTF-8 at byte {exc.start}; the JSON array cannot be read") from None
    decoder = json.JSONDecoder()
    line, counted = 1, 0
    pos = _skip_space(text, start + 1)
    if text.startswith("]", pos):
        return
    while True:
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{file}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno}); "
                "the rest of the JSON array cannot be read"
            ) from None
        yield f"{file}:{line}", record
        pos = _skip_space(text, end)
        if text.startswith(",", pos):
            pos = _skip_space(text, pos + 1)
        elif text.startswith("]", pos):
            if text[pos + 1 :].strip():
                raise DataError(f"{file}:{line + text.count(chr(10), counted, pos)}: data after the JSON array's end")
            return
        else:
            where = line + text.count("\n", counted, pos)
            raise DataError(f"{file}:{where}: malformed JSON array (expected ',' or ']' after a record)")


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _read_parquet(file: Path) -> Iterator[tuple[str, Any]]:
    """Rows as dicts; locations are `file:row N` (0-based, as pandas and datasets count)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
        row = 0
        for batch in parquet.iter_batches(batch_size=4096):
            for record in batch.to_pylist():
                yield f"{file}:row {row}", _drop_nulls(record)
                row += 1
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{file}: not a readable Parquet file ({exc})") from None


def _drop_nulls(value: Any) -> Any:
    """Parquet fills a struct's missing fields with nulls; JSON would have left them out."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


# ---------------------------------------------------------------- splits and digests


def split_for_eval(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """A seeded random hold-out of `fraction` of the examples (at least one when fraction > 0)."""
    if fraction <= 0:
        return dataset, None
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    held = max(1, round(len(order) * fraction))
    if held >= len(order):
        raise DataError(f"data.eval_fraction {fraction} leaves no training records out of {len(order)}")
    held_out = set(order[:held])
    train = [e for i, e in enumerate(dataset.examples) if i not in held_out]
    evaluation = [e for i, e in enumerate(dataset.examples) if i in held_out]
    return (
        Dataset(train, dataset.format, dataset.files, dataset.skipped, dataset.records_per_file),
        Dataset(evaluation, dataset.format, dataset.files),
    )


def file_digests(files: list[Path], root: Path | None = None) -> dict[str, str]:
    """sha256 of each data file, named relative to `root` (for the model card, drift check and cache key)."""
    from job.storage.manifest import sha256_file

    if root is None:  # the historical naming: the bare name of a single file, else the full path
        return {file.name if len(files) == 1 else str(file): sha256_file(file) for file in files}
    return {relative_name(file, root): sha256_file(file) for file in files}
