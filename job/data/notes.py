"""Nothing dropped silently: what the records hold that training will not use, or use as literal text.

The reader calls `RecordNotes.observe` once per raw record, after its format is known. It counts
top-level fields the format does not use (each with its record count and first location) and
template placeholders such as `{{name}}` left in the text that trains. `summary()` is what
`validate --json` shows under `notes`; `log()` writes one warning per kind, never one per record.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from job.logs import get_logger

log = get_logger(__name__)

USED_FIELDS: dict[str, frozenset[str]] = {
    "messages": frozenset({"messages", "tools"}),
    "sharegpt": frozenset({"conversations", "system", "tools"}),
    "alpaca": frozenset({"instruction", "input", "output", "system", "history"}),
    "prompt_completion": frozenset({"prompt", "completion", "tools"}),
    "text": frozenset({"text"}),
}
"""Top-level fields each format reads; any other non-empty field of a record is reported as unused."""

TURN_FIELDS: dict[str, frozenset[str]] = {
    "messages": frozenset({"role", "content", "tool_calls", "tool_call_id", "name"}),
    "conversations": frozenset({"from", "value"}),
    "prompt": frozenset({"role", "content", "tool_calls", "tool_call_id", "name"}),
    "completion": frozenset({"role", "content", "tool_calls", "tool_call_id", "name"}),
}
"""Fields of each turn a turn list's entries may use; another one (Axolotl's per-turn `weight`, a `train` flag)
is reported as `messages[].weight`: it changes nothing here, and its author meant it to."""

PLACEHOLDER = re.compile(
    r"(?<![A-Za-z0-9_\\}^$])"  # not glued to a word, a LaTeX command or group (`\frac{{x}}{{y}}`), `^{{2}}`
    r"\{\{\{?\s*"  # `{{`, or Mustache's unescaped `{{{`
    r"[A-Za-z_][A-Za-z0-9_]*(?:[.-][A-Za-z0-9_]+)*"  # a name: `name`, `user.name`, `first-name`
    r"(?:\s*\|\s*[A-Za-z_]\w*)*"  # Jinja filters: `{{ name | upper }}`
    r"\s*\}?\}\}"
)
"""A template placeholder: a name between `{{` and `}}`, spaces allowed. Not matched: anything that is not a
bare name (`{{}}`, `{{"a": 1}}`, `{{ .Values.x }}`, `{{#each}}`, `{{1}}`), doubled braces glued to a word or
LaTeX (`f{{x}}`, `\\frac{{a}}{{b}}`); JSON such as `{"a": {"b": 1}}` never holds `{{`."""

MAX_EXAMPLES = 5


@dataclass
class UnusedField:
    records: int
    first: str


@dataclass
class RecordNotes:
    """Counts over the records observed; cheap enough to run on every record of a large dataset."""

    unused: dict[str, UnusedField] = field(default_factory=dict)
    placeholder_records: int = 0
    placeholder_occurrences: int = 0
    placeholder_first: str | None = None
    placeholder_examples: list[str] = field(default_factory=list)
    _unused_by_keys: dict[tuple[str, tuple[str, ...]], tuple[str, ...]] = field(default_factory=dict, repr=False)

    def observe(self, record: dict, fmt: str, location: str) -> None:
        """Note `record` (a raw record whose format is `fmt`), found at `location` (`file:line`)."""
        keys = tuple(record)
        unused = self._unused_by_keys.get((fmt, keys))
        if unused is None:  # records of one file mostly share their keys: work them out once per key set
            used = USED_FIELDS.get(fmt, frozenset())
            unused = self._unused_by_keys[(fmt, keys)] = tuple(k for k in keys if k not in used)
        for name in unused:
            self._count_unused(name, record[name], location)
        for key in keys:
            turn_fields = TURN_FIELDS.get(key)
            if turn_fields is None or key in unused or not isinstance(record[key], list):
                continue
            extra: dict[str, Any] = {}
            for turn in record[key]:
                if isinstance(turn, dict) and not turn.keys() <= turn_fields:
                    for field_name in turn.keys() - turn_fields:
                        extra.setdefault(field_name, turn[field_name])
            for field_name, value in extra.items():
                self._count_unused(f"{key}[].{field_name}", value, location)
        found = 0
        for key in keys:
            if key not in unused:
                found += self._placeholders(record[key])
        if found:
            self.placeholder_records += 1
            self.placeholder_occurrences += found
            if self.placeholder_first is None:
                self.placeholder_first = location

    def _count_unused(self, name: str, value: Any, location: str) -> None:
        if value is None or (not value and isinstance(value, (str, list, dict))):
            return  # an empty value (a Parquet column this record leaves null) loses nothing
        seen = self.unused.get(name)
        if seen is None:
            self.unused[name] = UnusedField(1, location)
        else:
            seen.records += 1

    def _placeholders(self, value: Any) -> int:
        """Placeholders in the strings of `value` (nested lists and objects included)."""
        if isinstance(value, str):
            if "{{" not in value:  # the common case, at C speed
                return 0
            matches = PLACEHOLDER.findall(value)
            for match in matches:
                if len(self.placeholder_examples) < MAX_EXAMPLES and match not in self.placeholder_examples:
                    self.placeholder_examples.append(match)
            return len(matches)
        found = 0
        if isinstance(value, dict):
            value = value.values()
        elif not isinstance(value, list):
            return 0
        for item in value:
            found += self._placeholders(item) if type(item) is not str or "{{" in item else 0
        return found

    def merge(self, other: RecordNotes) -> None:
        """Add `other`'s counts (another worker's, or another source's); `self`'s first locations win."""
        for name, seen in other.unused.items():
            mine = self.unused.get(name)
            if mine is None:
                self.unused[name] = UnusedField(seen.records, seen.first)
            else:
                mine.records += seen.records
        self.placeholder_records += other.placeholder_records
        self.placeholder_occurrences += other.placeholder_occurrences
        self.placeholder_first = self.placeholder_first or other.placeholder_first
        for example in other.placeholder_examples:
            if len(self.placeholder_examples) < MAX_EXAMPLES and example not in self.placeholder_examples:
                self.placeholder_examples.append(example)

    def summary(self) -> dict[str, Any]:
        """`{"unused_fields": {name: {"records", "first"}}, "placeholders": {"records", "occurrences", "first",
        "examples"}}`: the shape `validate --json` shows under `notes`."""
        return {
            "unused_fields": {
                name: {"records": seen.records, "first": seen.first} for name, seen in sorted(self.unused.items())
            },
            "placeholders": {
                "records": self.placeholder_records,
                "occurrences": self.placeholder_occurrences,
                "first": self.placeholder_first,
                "examples": list(self.placeholder_examples),
            },
        }

    def log(self) -> None:
        """One warning per kind of note, with its counts and first location."""
        summary = self.summary()
        if summary["unused_fields"]:
            log.warning(
                "record_fields_unused",
                fields=summary["unused_fields"],
                note="these fields are not part of the record's format: training ignores them",
            )
        placeholders = summary["placeholders"]
        if placeholders["records"]:
            log.warning(
                "template_placeholders_in_text",
                **placeholders,
                note="{{...}} placeholders train as literal text: fill them in before training",
            )
