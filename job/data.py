"""Read dataset files, detect their format, and validate every record with its file:line.

Everything here runs before any model weights are loaded, so bad data costs
seconds, not GPU hours. Formats: `messages` (chat: a list of role/content
turns) and `text` (plain documents). Files: `.jsonl` and `.jsonl.gz`, one
file or a directory of them read in sorted order.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from job.errors import DataError, InputNotFound
from job.logs import get_logger

log = get_logger(__name__)

DATA_SUFFIXES = (".jsonl", ".jsonl.gz")
ROLES = ("system", "user", "assistant")
MAX_REPORTED_ERRORS = 10


@dataclass(frozen=True)
class Example:
    source: str
    """Where the record came from: `file:line`."""
    messages: tuple[dict[str, str], ...] | None = None
    """Chat turns with `role` and string `content` (parts already joined)."""
    text: str | None = None
    """A plain document (the `text` format)."""


@dataclass
class Dataset:
    examples: list[Example]
    format: str
    files: list[Path]

    def __len__(self) -> int:
        return len(self.examples)


def list_data_files(path: Path) -> list[Path]:
    """The data files under `path` (itself if a file), in a stable order."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputNotFound(f"dataset {path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(DATA_SUFFIXES))
    if not files:
        raise InputNotFound(
            f"dataset directory {path} holds no data files", hint=f"expected files ending in {', '.join(DATA_SUFFIXES)}"
        )
    return files


def load_dataset(path: Path, fmt: str = "auto") -> Dataset:
    """Read and validate every record under `path`; DataError lists bad records with file:line."""
    files = list_data_files(path)
    examples: list[Example] = []
    errors: list[str] = []
    detected = None if fmt == "auto" else fmt
    for file in files:
        for location, record in _read_jsonl(file, errors):
            if detected is None:
                detected = detect_format(record, location)
            try:
                examples.append(parse_record(record, detected, location))
            except DataError as exc:
                errors.append(str(exc))
    if errors:
        shown = "\n  ".join(errors[:MAX_REPORTED_ERRORS])
        more = f"\n  ... and {len(errors) - MAX_REPORTED_ERRORS} more" if len(errors) > MAX_REPORTED_ERRORS else ""
        raise DataError(f"{len(errors)} bad record(s) in {path}:\n  {shown}{more}")
    if not examples:
        raise DataError(f"dataset {path} holds no records", hint="an empty dataset trains nothing")
    log.info("dataset_loaded", path=str(path), files=len(files), records=len(examples), format=detected)
    return Dataset(examples=examples, format=detected or fmt, files=files)


def _read_jsonl(file: Path, errors: list[str]) -> Iterator[tuple[str, Any]]:
    opener = gzip.open if file.name.endswith(".gz") else open
    with opener(file, "rb") as handle:
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


def detect_format(record: Any, location: str) -> str:
    if isinstance(record, dict):
        if "messages" in record:
            return "messages"
        if "text" in record:
            return "text"
    found = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise DataError(
        f"{location}: cannot tell the record's format: found fields {found}",
        hint="expected `messages` (chat: a list of {role, content}) or `text`; or set data.format",
    )


def parse_record(record: Any, fmt: str, location: str) -> Example:
    if not isinstance(record, dict):
        raise DataError(f"{location}: expected a JSON object, got {type(record).__name__}")
    if fmt == "text":
        text = record.get("text")
        if not isinstance(text, str):
            raise DataError(f"{location}: field 'text' must be a string, got {type(text).__name__}")
        if not text.strip():
            raise DataError(f"{location}: field 'text' is empty")
        return Example(source=location, text=text)
    if fmt == "messages":
        return Example(source=location, messages=_parse_messages(record.get("messages"), location))
    raise DataError(f"{location}: unsupported format {fmt!r}")


def _parse_messages(messages: Any, location: str) -> tuple[dict[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{location}: 'messages' must be a non-empty list of turns")
    turns = []
    for index, turn in enumerate(messages):
        where = f"{location}: messages[{index}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where} must be an object with role and content")
        role = turn.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
        content = _content_text(turn.get("content"), where)
        if not content.strip():
            raise DataError(f"{where}: empty content")
        turns.append({"role": role, "content": content})
    _check_role_order(turns, location)
    return tuple(turns)


def _content_text(content: Any, where: str) -> str:
    """A string, or a list of `{"type": "text", "text": ...}` parts joined together."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise DataError(f"{where}: content parts must be {{'type': 'text', 'text': str}}, got {part!r:.60}")
        return "".join(texts)
    raise DataError(f"{where}: content must be a string or a list of text parts, got {type(content).__name__}")


def _check_role_order(turns: list[dict[str, str]], location: str) -> None:
    """Optional system turn first, then user and assistant alternating, starting with user."""
    body = turns[1:] if turns[0]["role"] == "system" else turns
    for index, turn in enumerate(body):
        expected = "user" if index % 2 == 0 else "assistant"
        if turn["role"] != expected:
            offset = len(turns) - len(body)
            raise DataError(
                f"{location}: messages[{index + offset}] is '{turn['role']}' where '{expected}' was expected",
                hint="after an optional system turn, turns alternate user/assistant",
            )
    if not any(turn["role"] == "assistant" for turn in body):
        raise DataError(f"{location}: conversation has no assistant turn, so nothing would be trained")


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
        Dataset(train, dataset.format, dataset.files),
        Dataset(evaluation, dataset.format, dataset.files),
    )


def file_digests(files: list[Path]) -> dict[str, str]:
    """sha256 of each data file, for the model card and the drift check."""
    from job.manifest import sha256_file

    return {file.name if len(files) == 1 else str(file): sha256_file(file) for file in files}
