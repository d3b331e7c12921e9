"""Read dataset files and validate every record with its file:line, before any model weights load.

Files: `.jsonl`, `.json` (an array of records, or JSON Lines under that name; a UTF-8 byte-order
mark is accepted), `.parquet`, and gzip- or zstd-compressed JSON/JSONL (`.gz`, `.zst`); one file
or a directory of them, read in sorted order. Formats and their checks live in `job.data.formats`.
Valid records stream into an Arrow table of `ROW_COLUMNS` (on disk in `workdir`, memory-mapped):
memory stays flat in the number of records. Up to `max_invalid` bad records are skipped and
returned for the run's report; more, or none left, is a DataError (exit 65) listing them.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from job.config.schema import MAX_RECORD_BYTES
from job.data.formats import Example, describe_unknown, detect_format, parse_record
from job.data.notes import RecordNotes
from job.data.rows import Examples, RowWriter
from job.errors import DataError, InputNotFound
from job.logs import get_logger

__all__ = ["Dataset", "Example", "Examples", "file_digests", "list_data_files", "load_dataset", "split_for_eval"]

log = get_logger(__name__)

COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
BASE_SUFFIXES = (".jsonl", ".ndjson", ".json")
DATA_SUFFIXES = (
    *BASE_SUFFIXES,
    *(base + comp for base in BASE_SUFFIXES for comp in COMPRESSIONS),
    ".parquet",
)
MAX_REPORTED_ERRORS = 10
TOO_DEEP = "JSON nested too deeply (more levels than Python's JSON reader allows)"
FORMAT_NOTE = "the dataset's format"
CHUNK_BYTES = 1 << 20
READ_ERRORS = (OSError, EOFError, ValueError)  # ValueError: pyarrow's ArrowInvalid on a corrupt zstd frame
BOM = codecs.BOM_UTF8
DATASET_INFO = "dataset_info.json"
"""LLaMA-Factory's catalogue of datasets (`file_name`, `hf_hub_url`, ... per entry): describes data, is none."""
CATALOGUE_KEYS = ("file_name", "hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
_noted: set[str] = set()


@dataclass
class Dataset:
    rows: Any
    """A `datasets.Dataset` of `ROW_COLUMNS` (`Example.to_row()`), memory-mapped when read with a workdir."""
    format: str
    files: list[Path]
    skipped: list[str] = field(default_factory=list)
    """Bad records skipped under `data.max_invalid`, each `location: reason`."""
    records_per_file: dict[str, int] = field(default_factory=dict)
    """Valid records per file (paths relative to the dataset root)."""

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def examples(self) -> Examples:
        """The rows as `Example`s, decoded on access (for small data and tests; the job maps over `rows`)."""
        return Examples(self.rows)


def list_data_files(path: Path) -> list[Path]:
    """The data files under `path` (itself if a file), in a stable order; hidden files and LLaMA-Factory's
    `dataset_info.json` catalogue are left out."""
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
    catalogues = [p for p in files if p.name == DATASET_INFO and _catalogue_entries(p) is not None]
    for catalogue in catalogues:
        if str(catalogue) not in _noted:  # once per process: prepare lists the files more than once
            _noted.add(str(catalogue))
            log.info(
                "dataset_catalogue_skipped",
                file=str(catalogue),
                reason="LLaMA-Factory's dataset_info.json describes datasets (file_name entries); it holds no records",
            )
    files = [p for p in files if p not in catalogues]
    if not files:
        raise InputNotFound(
            f"dataset directory {path} holds no data files", hint=f"expected files ending in {', '.join(DATA_SUFFIXES)}"
        )
    return files


def _catalogue_entries(file: Path) -> list[str] | None:
    """The `file_name`s of a LLaMA-Factory catalogue (an object whose values describe datasets), else None."""
    if file.stat().st_size > MAX_RECORD_BYTES:
        return None
    try:
        value = json.loads(file.read_bytes().removeprefix(BOM))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(value, dict) or not value or not all(isinstance(v, dict) for v in value.values()):
        return None
    if not any(key in entry for entry in value.values() for key in CATALOGUE_KEYS):
        return None
    return [str(entry["file_name"]) for entry in value.values() if "file_name" in entry]


def relative_name(file: Path, root: Path) -> str:
    """A file's name relative to the dataset root: stable across machines and scratch directories."""
    return file.name if file == root else file.relative_to(root).as_posix()


def load_dataset(
    path: Path,
    fmt: str = "auto",
    *,
    max_invalid: int = 0,
    max_record_bytes: int = MAX_RECORD_BYTES,
    workdir: Path | None = None,
    notes: RecordNotes | None = None,
) -> Dataset:
    """Read and validate every record under `path`; DataError lists bad records with file:line.

    With `workdir` the records are written there as an Arrow file and memory-mapped; without, the
    table is built in memory (small data, tests)."""
    files = list_data_files(path)
    writer = RowWriter(workdir)
    errors: list[str] = []
    per_file: dict[str, int] = {}
    detected, detected_at = (None, "") if fmt == "auto" else (fmt, "data.format")
    for file in files:
        before = writer.count
        for location, record in read_records(file, errors, max_record_bytes):
            if detected is None:
                detected = detect_format(record)
                if detected is None:
                    errors.append(str(describe_unknown(record, location)))
                    continue
                detected_at = location
            if notes is not None and isinstance(record, dict):
                notes.observe(record, detected, location)
            try:
                writer.add(parse_record(record, detected, location))
            except DataError as exc:
                errors.append(_with_format_note(exc, record, detected, detected_at))
            except RecursionError:  # a value nested too deeply to check, copy or render
                errors.append(f"{location}: {TOO_DEEP}")
        per_file[relative_name(file, path)] = writer.count - before
    examples = writer.close()
    if len(errors) > max_invalid:
        shown = "\n  ".join(errors[:MAX_REPORTED_ERRORS])
        more = f"\n  ... and {len(errors) - MAX_REPORTED_ERRORS} more" if len(errors) > MAX_REPORTED_ERRORS else ""
        mixed = len(files) > 1 and any(FORMAT_NOTE in error for error in errors)
        raise DataError(
            f"{len(errors)} bad record(s) in {path} (data.max_invalid={max_invalid}):\n  {shown}{more}",
            hint="its files hold different formats: list them under data.train as sources, each with its own format"
            if mixed
            else "fix the records, or raise data.max_invalid to skip them (they are listed in the run's reports/)",
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
    return f"{exc} ({FORMAT_NOTE} `{fmt}` was detected at {detected_at}; this record looks like `{other}`)"


# ---------------------------------------------------------------- readers


def read_records(file: Path, errors: list[str], max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[tuple[str, Any]]:
    """(location, record) for every record of `file`; unreadable or oversized records are appended to `errors`."""
    name = file.name.lower()
    if name.endswith(".parquet"):
        yield from _read_parquet(file, errors, max_record_bytes)
        return
    try:
        with _open(file) as handle:
            if handle.peek(len(BOM)).startswith(BOM):  # written by some Windows tools; not part of the JSON
                handle.read(len(BOM))
            is_json = name.endswith((".json", *(f".json{c}" for c in COMPRESSIONS)))
            head = handle.peek(4096).lstrip()[:1]
            if is_json and head == b"[":  # an array; otherwise the file holds JSON Lines under a .json name
                yield from _JsonArray(file, handle, errors, max_record_bytes).records()
            elif is_json and head == b"{" and not _first_line_is_json(handle):
                raise _one_object(file, handle, max_record_bytes)
            else:
                yield from _read_jsonl(file, handle, errors, max_record_bytes)
    except READ_ERRORS as exc:  # a corrupt gzip/zstd stream fails on its first read
        raise DataError(f"{file}: cannot read the file: {exc}") from None


def _first_line_is_json(handle: io.BufferedReader) -> bool:
    """Whether the first line is a whole JSON value (JSON Lines), judged from the buffered start."""
    head = handle.peek(CHUNK_BYTES)
    line = head.split(b"\n", 1)[0]
    if b"\n" not in head and len(head) >= CHUNK_BYTES:
        return True  # a first line over a chunk: JSON Lines with a long record, or the message below in a moment
    try:
        json.loads(line)
    except (ValueError, RecursionError):
        return False
    return True


def _one_object(file: Path, handle: io.BufferedReader, limit: int) -> DataError:
    """The message for a .json file holding one JSON object (spread over lines) instead of records."""
    body = handle.read(limit + 1)
    if len(body) > limit:
        return DataError(f"{file}: holds one JSON object larger than data.max_record_bytes={limit}, not records")
    try:
        value = json.loads(body)
    except ValueError as exc:
        return DataError(f"{file}: malformed JSON ({exc})")
    except RecursionError:
        return DataError(f"{file}: {TOO_DEEP}")
    entries = [str(v["file_name"]) for v in value.values() if isinstance(v, dict) and "file_name" in v]
    if file.name == DATASET_INFO or entries:
        return DataError(
            f"{file}: is a dataset catalogue (LLaMA-Factory's dataset_info.json), not a dataset",
            hint=f"point data.train at the data file(s) it names ({', '.join(entries[:5]) or 'its file_name entries'})"
            ", or list several under data.train (a list of sources)",
        )
    lists = [k for k, v in value.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
    inside = f"; its key {lists[0]!r} holds a list of objects: make that list the file's content" if lists else ""
    return DataError(
        f"{file}: holds one JSON object (keys {clip_keys(value)}), not a list of records{inside}",
        hint="a .json file holds a JSON array of records [{...}, ...] or JSON Lines (one record per line)",
    )


def clip_keys(value: dict) -> str:
    keys = sorted(map(str, value))
    return ", ".join(keys[:8]) + (f", ... ({len(keys)} keys)" if len(keys) > 8 else "")


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


def _oversized(location: str, size: int, limit: int, *, at_least: bool = False) -> str:
    more = "more than " if at_least else ""
    return (
        f"{location}: record of {more}{size} bytes, over data.max_record_bytes={limit} "
        "(raise it if records really are that large)"
    )


def _read_jsonl(file: Path, handle: io.BufferedReader, errors: list[str], limit: int) -> Iterator[tuple[str, Any]]:
    number = 0
    try:
        while raw := handle.readline(limit + 1):  # bounded: a 200 MB line is never held whole
            number += 1
            location = f"{file}:{number}"
            if len(raw) > limit and not raw.endswith(b"\n"):
                errors.append(_oversized(location, _skip_line(handle, len(raw)), limit))
                continue
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
            except RecursionError:
                errors.append(f"{location}: {TOO_DEEP}")
    except READ_ERRORS as exc:  # gzip/zstd streams fail while reading, not on open
        raise DataError(f"{file}:{number + 1}: cannot decompress the file: {exc}") from None


def _skip_line(handle: io.BufferedReader, size: int) -> int:
    """Read past the rest of a line in pieces; its size in bytes (without the newline)."""
    while piece := handle.readline(CHUNK_BYTES):
        if piece.endswith(b"\n"):
            return size + len(piece) - 1
        size += len(piece)
    return size


class _JsonArray:
    """The elements of a JSON array, read in chunks: memory holds about one record and a chunk, never the
    whole file. Each element's location is the line it starts on. A syntax error, invalid UTF-8 or an
    element too large to hold ends the file (exit 65): the rest cannot be found without parsing it."""

    def __init__(self, file: Path, handle: io.BufferedReader, errors: list[str], limit: int) -> None:
        self.file, self.handle, self.errors, self.limit = file, handle, errors, limit
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.text = ""
        self.eof = False
        self.read_bytes = 0
        self.line = 1  # the line of text[counted]
        self.counted = 0

    def records(self) -> Iterator[tuple[str, Any]]:
        decoder = json.JSONDecoder()
        self.fill()
        pos = self.skip_space(self.skip_space(0) + 1)  # past the '['
        if self.text.startswith("]", pos):
            self.end(pos)
            return
        while True:
            pos = self.drop_before(pos)
            line = self.line_of(pos)
            record, end = self.decode(decoder, pos, line)
            if record is not _OVERSIZED:
                yield f"{self.file}:{line}", record
            pos = self.skip_space(end)
            if self.text.startswith(",", pos):
                pos = self.skip_space(pos + 1)
            elif self.text.startswith("]", pos):
                self.end(pos)
                return
            else:
                where = self.line_of(pos)
                raise DataError(f"{self.file}:{where}: malformed JSON array (expected ',' or ']' after a record)")

    def decode(self, decoder: json.JSONDecoder, pos: int, line: int) -> tuple[Any, int]:
        """The element at `pos` and where it ends, reading more while it is cut short by the chunk's end."""
        while True:
            try:
                record, end = decoder.raw_decode(self.text, pos)
                if end < len(self.text) or self.eof:  # else a number may go on in the next chunk
                    break
            except json.JSONDecodeError as exc:
                cut_short = exc.pos >= len(self.text) - 64 or exc.msg.startswith("Unterminated string")
                if self.eof or not cut_short:
                    at = line + self.text.count("\n", pos, exc.pos)
                    raise DataError(
                        f"{self.file}:{at}: malformed JSON ({exc.msg} at column {exc.colno}); "
                        "the rest of the JSON array cannot be read"
                    ) from None
            except RecursionError:
                raise DataError(f"{self.file}:{line}: {TOO_DEEP}; the rest of the JSON array cannot be read") from None
            if len(self.text) - pos > self.limit:  # characters: at least as many bytes
                message = _oversized(f"{self.file}:{line}", self.limit, self.limit, at_least=True)
                raise DataError(f"{message}; the rest of the JSON array cannot be read")
            self.fill(len(self.text) - pos)  # doubling: a long record is parsed a few times, not once a chunk
        if (end - pos) * 4 > self.limit:  # a UTF-8 character is at most 4 bytes: only then count them
            size = len(self.text[pos:end].encode("utf-8", "surrogatepass"))
            if size > self.limit:
                self.errors.append(_oversized(f"{self.file}:{line}", size, self.limit))
                return _OVERSIZED, end
        return record, end

    def fill(self, at_least: int = CHUNK_BYTES) -> None:
        data = self.handle.read(max(at_least, CHUNK_BYTES))
        pending = len(self.utf8.getstate()[0])  # bytes of a character cut by the last chunk
        try:
            self.text += self.utf8.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            line = self.line_of(len(self.text)) + data.count(b"\n", 0, max(exc.start - pending, 0))
            where = self.read_bytes - pending + exc.start
            raise DataError(
                f"{self.file}:{line}: invalid UTF-8 at byte {where}; the JSON array cannot be read"
            ) from None
        self.read_bytes += len(data)
        self.eof = not data

    def skip_space(self, pos: int) -> int:
        """The next non-space position, reading on as needed (len(text) at the end of the file)."""
        while True:
            while pos < len(self.text) and self.text[pos] in " \t\r\n":
                pos += 1
            if pos < len(self.text) or self.eof:
                return pos
            pos = self.drop_before(pos)
            self.fill()

    def drop_before(self, pos: int) -> int:
        """Forget text before `pos` once it is a chunk long; returns `pos` in the kept text."""
        if pos < CHUNK_BYTES:
            return pos
        self.line_of(pos)
        self.text, self.counted = self.text[pos:], 0
        return 0

    def line_of(self, pos: int) -> int:
        """The line of text[pos]; positions asked for only grow."""
        self.line += self.text.count("\n", self.counted, pos)
        self.counted = pos
        return self.line

    def end(self, pos: int) -> None:
        """After the closing ']' at `pos` only whitespace may follow."""
        pos = self.skip_space(pos + 1)
        if pos < len(self.text):
            raise DataError(f"{self.file}:{self.line_of(pos)}: data after the JSON array's end")


_OVERSIZED = object()


def _read_parquet(file: Path, errors: list[str], limit: int) -> Iterator[tuple[str, Any]]:
    """Rows as dicts; locations are `file:row N` (0-based, as pandas and datasets count). Parquet reads a
    column chunk at once: a row's size is checked after reading, from its Arrow buffers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
        row = 0
        for batch in parquet.iter_batches(batch_size=1024):
            sizes = _row_sizes(batch) if batch.nbytes > limit else None
            for index, record in enumerate(batch.to_pylist()):
                if sizes is not None and sizes[index] > limit:
                    errors.append(_oversized(f"{file}:row {row}", sizes[index], limit))
                else:
                    yield f"{file}:row {row}", _drop_nulls(record)
                row += 1
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{file}: not a readable Parquet file ({exc})") from None


def _row_sizes(batch: Any) -> list[int]:
    """Bytes each row of an Arrow record batch holds (its slice of every column's buffers)."""
    sizes = [0] * batch.num_rows
    for column in batch.columns:
        for index in range(batch.num_rows):
            sizes[index] += column.slice(index, 1).nbytes
    return sizes


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
    import numpy as np

    held_out = np.zeros(len(order), dtype=bool)
    held_out[order[:held]] = True
    train = dataset.rows.select(np.flatnonzero(~held_out))  # indices into the memory-mapped rows, in file order
    evaluation = dataset.rows.select(np.flatnonzero(held_out))
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
