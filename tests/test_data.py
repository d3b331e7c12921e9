"""Data: format detection, every bad-record message with file:line, files and directories."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from conftest import write_jsonl
from job.data import load_dataset, split_for_eval
from job.errors import DataError, InputNotFound

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def test_detects_messages_and_text(tmp_path: Path) -> None:
    chat = load_dataset(write_jsonl(tmp_path / "chat.jsonl", [CHAT, CHAT]))
    assert chat.format == "messages" and len(chat) == 2
    assert chat.examples[0].messages[1] == {"role": "assistant", "content": "hello"}
    assert chat.examples[1].source.endswith("chat.jsonl:2")
    text = load_dataset(write_jsonl(tmp_path / "text.jsonl", [{"text": "a document"}]))
    assert text.format == "text" and text.examples[0].text == "a document"


def test_content_parts_system_and_multi_turn(tmp_path: Path) -> None:
    record = {
        "messages": [
            {"role": "system", "content": "be kind"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": "c"},
            {"role": "user", "content": "d"},
            {"role": "assistant", "content": "e"},
        ]
    }
    dataset = load_dataset(write_jsonl(tmp_path / "x.jsonl", [record]))
    assert [t["content"] for t in dataset.examples[0].messages] == ["be kind", "ab", "c", "d", "e"]


def test_directory_reads_shards_in_sorted_order_and_gzip(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d" / "b.jsonl", [{"text": "second"}])
    write_jsonl(tmp_path / "d" / "a.jsonl", [{"text": "first"}])
    with gzip.open(tmp_path / "d" / "c.jsonl.gz", "wt") as handle:
        handle.write(json.dumps({"text": "third"}) + "\n")
    (tmp_path / "d" / "notes.txt").write_text("ignored")
    dataset = load_dataset(tmp_path / "d")
    assert [e.text for e in dataset.examples] == ["first", "second", "third"]
    assert [f.name for f in dataset.files] == ["a.jsonl", "b.jsonl", "c.jsonl.gz"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"messages": [', "malformed JSON"),
        (b'{"text": "caf\xe9"}', "invalid UTF-8"),
        (b'{"text": 3}', "field 'text' must be a string"),
        (b'{"text": "  "}', "field 'text' is empty"),
        (b"[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_text_records_name_file_and_line(tmp_path: Path, line: bytes, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "fine"}\n' + line + b"\n")
    with pytest.raises(DataError) as info:
        load_dataset(path, "text")
    assert f"{path}:2" in str(info.value) and message in str(info.value)
    assert info.value.exit_code == 65


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([{"role": "user", "content": "q"}], "no assistant turn"),
        ([{"role": "assistant", "content": "a"}], "'assistant' where 'user' was expected"),
        ([{"role": "user", "content": "q"}, {"role": "user", "content": "q"}], "where 'assistant' was expected"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}], "empty content"),
        ([{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}], "role 'bot'"),
        ([{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}], "content must be a string"),
        ([{"role": "user", "content": "q"}, {"role": "system", "content": "s"}], "'system' where 'assistant'"),
        ([], "non-empty list"),
    ],
)
def test_bad_conversations_name_file_line_and_turn(tmp_path: Path, messages: list, message: str) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT, {"messages": messages}])
    with pytest.raises(DataError) as info:
        load_dataset(path)
    assert f"{path}:2" in str(info.value) and message in str(info.value)


def test_every_bad_record_is_listed(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": 1}\nnot json\n{"text": ""}\n')
    with pytest.raises(DataError) as info:
        load_dataset(path)
    text = str(info.value)
    assert "3 bad record(s)" in text
    assert all(f"{path}:{n}" in text for n in (2, 3, 4))


def test_unknown_format_says_what_was_found_and_expected(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as info:
        load_dataset(path)
    assert "['answer', 'question']" in str(info.value) and "messages" in str(info.value)


def test_empty_and_missing(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="holds no records"):
        load_dataset(tmp_path / "empty.jsonl")
    with pytest.raises(InputNotFound):
        load_dataset(tmp_path / "missing.jsonl")
    (tmp_path / "nodata").mkdir()
    with pytest.raises(InputNotFound, match="holds no data files"):
        load_dataset(tmp_path / "nodata")


def test_eval_split_is_seeded_and_disjoint(tmp_path: Path) -> None:
    records = [{"text": f"doc {i}"} for i in range(50)]
    dataset = load_dataset(write_jsonl(tmp_path / "x.jsonl", records))
    train, held = split_for_eval(dataset, 0.2, seed=3)
    _, again_held = split_for_eval(dataset, 0.2, seed=3)
    _, other_held = split_for_eval(dataset, 0.2, seed=4)
    assert len(held) == 10 and len(train) == 40
    assert {e.text for e in held.examples} == {e.text for e in again_held.examples}
    assert {e.text for e in held.examples} != {e.text for e in other_held.examples}
    assert not {e.text for e in held.examples} & {e.text for e in train.examples}
