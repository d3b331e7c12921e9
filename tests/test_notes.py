"""Record notes: unused fields and template placeholders counted once per kind, never silently dropped."""

from __future__ import annotations

import json

import pytest
from structlog.testing import capture_logs

from job.data.notes import PLACEHOLDER, USED_FIELDS, RecordNotes


def observe_all(records: list[tuple[dict, str]]) -> RecordNotes:
    notes = RecordNotes()
    for line, (record, fmt) in enumerate(records, start=1):
        notes.observe(record, fmt, f"f.jsonl:{line}")
    return notes


def test_unused_fields_are_counted_with_their_first_location() -> None:
    alpaca = {"instruction": "Add.", "input": "", "output": "2", "system": "s", "history": []}
    notes = observe_all(
        [
            ({**alpaca, "id": 1}, "alpaca"),
            ({**alpaca, "id": 2, "lang": "en"}, "alpaca"),
            ({"conversations": [], "system": "s", "tools": "[]", "id": 3}, "sharegpt"),
            ({"text": "a document", "meta": {"url": "x"}}, "text"),
            ({"text": "a Parquet row", "id": None, "lang": "", "meta": {}, "tags": []}, "text"),  # empty: nothing lost
        ]
    )
    assert notes.summary()["unused_fields"] == {
        "id": {"records": 3, "first": "f.jsonl:1"},
        "lang": {"records": 1, "first": "f.jsonl:2"},
        "meta": {"records": 1, "first": "f.jsonl:4"},
    }


def test_unused_turn_fields_are_counted_once_per_record() -> None:
    """Axolotl's per-turn `weight` (0: do not train this turn) means nothing here: say so."""
    turns = [{"from": "human", "value": "Hi", "weight": 0}, {"from": "gpt", "value": "Hello", "weight": 1}]
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "reasoning_content": "r"}]
    notes = observe_all(
        [
            ({"conversations": turns}, "sharegpt"),
            ({"conversations": [*turns[:1], {"from": "gpt", "value": "x"}]}, "sharegpt"),
            ({"messages": chat}, "messages"),
            ({"messages": [{"role": "user", "content": "Hi", "tool_call_id": "a", "name": "f"}]}, "messages"),
        ]
    )
    assert notes.summary()["unused_fields"] == {
        "conversations[].weight": {"records": 2, "first": "f.jsonl:1"},
        "messages[].reasoning_content": {"records": 1, "first": "f.jsonl:3"},
    }


def test_fields_each_format_uses_are_never_reported() -> None:
    for fmt, fields in USED_FIELDS.items():
        notes = observe_all([(dict.fromkeys(fields, "x"), fmt)])
        assert notes.summary()["unused_fields"] == {}, fmt
    # A field one format uses is unused under another: `system` is alpaca's and sharegpt's, not text's.
    assert list(observe_all([({"text": "t", "system": "s"}, "text")]).summary()["unused_fields"]) == ["system"]


@pytest.mark.parametrize(
    "text, found",
    [
        ("I am {{name}}, made by {{ author }}.", ["{{name}}", "{{ author }}"]),
        ("Hi {{ user.name | title }} and {{first-name}} {{{raw}}}", ["{{ user.name | title }}", "{{first-name}}",
                                                                     "{{{raw}}}"]),
        ("我是 {{name}}，由{{author}}开发", ["{{name}}", "{{author}}"]),
        ('{{}} {"a": {"b": 1}} {{"a": 1}} [{{1}}] {{#each}} {{ .Values.x }}', []),  # JSON, code, Go/Helm
        (r"$\frac{{a}}{{b}} + x^{{2}}$ and f{{x}}", []),  # LaTeX groups, braces glued to a word
    ],
)  # fmt: skip
def test_placeholder_rule(text: str, found: list[str]) -> None:
    assert PLACEHOLDER.findall(text) == found


def test_placeholders_are_counted_in_the_text_that_trains_only() -> None:
    chat = {
        "messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am {{name}}."}]
    }
    notes = observe_all(
        [
            ({"text": "no placeholder here"}, "text"),
            ({"instruction": "{{a}} {{b}} {{c}}", "output": "{{d}} {{e}} {{f}} {{a}}"}, "alpaca"),
            (chat, "messages"),
            ({"text": "plain", "template": "{{unused_field}}"}, "text"),  # not rendered: reported as unused instead
        ]
    )
    placeholders = notes.summary()["placeholders"]
    assert placeholders == {
        "records": 2,
        "occurrences": 8,
        "first": "f.jsonl:2",
        "examples": ["{{a}}", "{{b}}", "{{c}}", "{{d}}", "{{e}}"],  # at most five, distinct
    }
    assert notes.summary()["unused_fields"] == {"template": {"records": 1, "first": "f.jsonl:4"}}


def test_merge_adds_counts_and_keeps_the_first_locations() -> None:
    first = observe_all([({"text": "{{x}}", "id": 1}, "text")])
    second = RecordNotes()
    second.observe({"text": "{{y}} {{x}}", "id": 2, "url": "u"}, "text", "g.jsonl:7")
    first.merge(second)
    summary = first.summary()
    assert summary["unused_fields"] == {
        "id": {"records": 2, "first": "f.jsonl:1"},
        "url": {"records": 1, "first": "g.jsonl:7"},
    }
    expected = {"records": 2, "occurrences": 3, "first": "f.jsonl:1", "examples": ["{{x}}", "{{y}}"]}
    assert summary["placeholders"] == expected
    json.dumps(summary)  # what validate --json prints


def test_log_writes_one_warning_per_kind_not_per_record() -> None:
    notes = observe_all([({"text": f"doc {{{{n}}}} {i}", "id": i, "url": "u"}, "text") for i in range(500)])
    with capture_logs() as logs:
        notes.log()
    assert [(e["event"], e["log_level"]) for e in logs] == [
        ("record_fields_unused", "warning"),
        ("template_placeholders_in_text", "warning"),
    ]
    assert logs[0]["fields"]["id"] == {"records": 500, "first": "f.jsonl:1"}
    assert (logs[1]["records"], logs[1]["examples"]) == (500, ["{{n}}"])

    with capture_logs() as logs:
        observe_all([({"text": "clean"}, "text")]).log()
    assert logs == []
