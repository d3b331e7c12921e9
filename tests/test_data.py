"""Data: format detection, every bad-record message with file:line, files and directories."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from conftest import write_jsonl
from job.data.read import load_dataset, split_for_eval
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


# ---------------------------------------------------------------- every format, every container

FIXTURES = Path(__file__).parent / "fixtures" / "data"


@pytest.mark.parametrize(
    ("name", "fmt", "first"),
    [
        ("messages.jsonl", "messages",
         ["Answer in one sentence.", "What is the capital of Ruritania?", "Strelsau is the capital."]),
        ("sharegpt.json", "sharegpt", ["Be terse.", "Name a colour.", "Teal."]),
        ("alpaca.jsonl.gz", "alpaca", ["Translate to French.\n\nGood morning", "Bonjour"]),
        ("prompt_completion_chat.jsonl.zst", "prompt_completion",
         ["Hi", "Hello, what do you need?", "A haiku.", "Old pond, frog jumps in."]),
    ],
)  # fmt: skip
def test_chat_formats_from_fixture_files_become_turns(name: str, fmt: str, first: list[str]) -> None:
    dataset = load_dataset(FIXTURES / name)
    assert dataset.format == fmt
    assert [turn["content"] for turn in dataset.examples[0].messages] == first
    assert all(turn["role"] in ("system", "user", "assistant") for e in dataset.examples for turn in e.messages)


def test_sharegpt_roles_and_json_array_lines() -> None:
    dataset = load_dataset(FIXTURES / "sharegpt.json")
    assert [t["role"] for t in dataset.examples[1].messages] == ["user", "assistant", "user", "assistant"]
    assert [e.source.rsplit(":", 1)[1] for e in dataset.examples] == ["2", "18"]  # the line each record starts on


def test_prompt_completion_strings_and_conversational() -> None:
    strings = load_dataset(FIXTURES / "prompt_completion.parquet")
    first = strings.examples[0]
    assert (first.kind, first.text, first.completion) == ("completion", "The capital of Syldavia is", " Klow.")
    assert first.source.endswith("prompt_completion.parquet:row 0")
    chat = load_dataset(FIXTURES / "prompt_completion_chat.jsonl.zst").examples[0]
    assert chat.kind == "chat" and chat.prompt_turns == 3 and len(chat.messages) == 4


def test_alpaca_without_input_and_text_format() -> None:
    alpaca = load_dataset(FIXTURES / "alpaca.jsonl.gz").examples[1]
    assert [t["content"] for t in alpaca.messages] == ["Name a prime number.", "Seven."]
    text = load_dataset(FIXTURES / "text.jsonl")
    assert text.format == "text" and text.examples[1].text == "Another one, with unicode: café ☕."


def test_zstd_written_by_the_zstd_tool_and_json_holding_json_lines(tmp_path: Path) -> None:
    import shutil
    import subprocess

    plain = write_jsonl(tmp_path / "plain.jsonl", [{"text": "one"}, {"text": "two"}])
    if shutil.which("zstd"):
        subprocess.run(["zstd", "-q", str(plain), "-o", str(tmp_path / "x.jsonl.zst")], check=True)
        assert [e.text for e in load_dataset(tmp_path / "x.jsonl.zst").examples] == ["one", "two"]
    lines_named_json = tmp_path / "lines.json"
    lines_named_json.write_text(plain.read_text())
    assert [e.source.rsplit(":", 1)[1] for e in load_dataset(lines_named_json).examples] == ["1", "2"]


def test_directory_of_mixed_containers_in_stable_order(tmp_path: Path) -> None:
    import shutil

    shards = tmp_path / "shards"
    shards.mkdir()
    shutil.copy(FIXTURES / "messages.jsonl", shards / "b.jsonl")
    shutil.copy(FIXTURES / "sharegpt.json", shards / "c.json")  # another chat format: a different format is refused
    (shards / ".hidden.jsonl").write_text("not json\n")  # hidden files are never read
    write_jsonl(shards / "a" / "x.jsonl", [CHAT])
    with pytest.raises(DataError, match=r"c\.json:2: format `messages` needs field"):
        load_dataset(shards)
    (shards / "c.json").unlink()
    dataset = load_dataset(shards)
    assert [f.relative_to(shards).as_posix() for f in dataset.files] == ["a/x.jsonl", "b.jsonl"]
    assert dataset.records_per_file == {"a/x.jsonl": 1, "b.jsonl": 2}


# ---------------------------------------------------------------- bad records in every format


@pytest.mark.parametrize(
    ("record", "fmt", "message"),
    [
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}, "sharegpt", "from 'bot'"),
        ({"conversations": [{"from": "gpt", "value": "a"}]}, "sharegpt", "'assistant' where 'user'"),
        ({"instruction": "do", "output": ""}, "alpaca", "field 'output' is empty"),
        ({"instruction": "do", "input": 3, "output": "x"}, "alpaca", "field 'input' must be a string"),
        ({"prompt": "p", "completion": [{"role": "assistant", "content": "a"}]}, "prompt_completion",
         "both be strings"),
        ({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]},
         "prompt_completion", "completion[0] is 'user'"),
        ({"prompt": "  ", "completion": "a"}, "prompt_completion", "field 'prompt' is empty"),
        ({"messages": [{"role": "user", "content": "\ud800"}, {"role": "assistant", "content": "a"}]},
         "messages", "invalid UTF-8 (lone surrogate"),
        ({"text": "x", "instruction": "y"}, "alpaca", "needs field(s) ['output']"),
    ],
)  # fmt: skip
def test_bad_records_of_each_format_name_file_and_line(tmp_path: Path, record: dict, fmt: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n" + json.dumps(record) + "\n")  # line 1 is blank: the record is on line 2
    with pytest.raises(DataError) as info:
        load_dataset(path, fmt)
    assert f"{path}:2" in str(info.value) and message in str(info.value), str(info.value)
    assert info.value.exit_code == 65


def test_bad_rows_in_parquet_and_json_arrays(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"text": "fine"}, {"text": ""}]), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t\.parquet:row 1: field 'text' is empty"):
        load_dataset(tmp_path / "t.parquet")
    (tmp_path / "a.json").write_text('[\n  {"text": "ok"},\n  {"text": "broken"\n  }}\n]')
    with pytest.raises(DataError, match=r"a\.json:4: malformed JSON") as info:
        load_dataset(tmp_path / "a.json")
    assert info.value.exit_code == 65
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_dataset(tmp_path / "bad.parquet")


def test_corrupt_compressed_files_are_data_errors(tmp_path: Path) -> None:
    (tmp_path / "x.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(DataError, match=r"x\.jsonl\.gz"):
        load_dataset(tmp_path / "x.jsonl.gz")
    (tmp_path / "y.jsonl.zst").write_bytes(b"(\xb5/\xfd garbage")
    with pytest.raises(DataError, match=r"y\.jsonl\.zst"):
        load_dataset(tmp_path / "y.jsonl.zst")


def test_max_invalid_skips_and_lists_up_to_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "some-bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": 1}\nnot json\n{"text": "also ok"}\n')
    dataset = load_dataset(path, max_invalid=2)
    assert [e.text for e in dataset.examples] == ["ok", "also ok"]
    assert [s.split(": ", 1)[0] for s in dataset.skipped] == [f"{path}:2", f"{path}:3"]
    with pytest.raises(DataError, match=r"2 bad record\(s\).*max_invalid=1"):
        load_dataset(path, max_invalid=1)
    path.write_text("not json\n")
    with pytest.raises(DataError, match="holds no records"):  # skipping everything leaves nothing to train
        load_dataset(path, max_invalid=5)


def test_a_record_in_another_format_names_where_the_format_was_detected(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mixed.jsonl", [CHAT, {"text": "a document"}])
    with pytest.raises(DataError) as info:
        load_dataset(path)
    text = str(info.value)
    assert f"{path}:2" in text and f"detected at {path}:1" in text and "looks like `text`" in text


# ---------------------------------------------------------------- bounded records


def test_a_200_mb_jsonl_line_is_a_bad_record_read_in_bounded_memory(tmp_path: Path) -> None:
    """The line is skipped in pieces: never held whole (it once went on to a 10 GB tokenization)."""
    import tracemalloc

    path = tmp_path / "huge.jsonl"
    piece = b"a" * (1 << 20)
    with path.open("wb") as handle:  # streamed out: the test never holds the line either
        handle.write(b'{"text": "fine"}\n{"text": "')
        for _ in range(200):
            handle.write(piece)
        handle.write(b'"}\n{"text": "also fine"}\n')
    tracemalloc.start()
    try:
        dataset = load_dataset(path, max_invalid=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [e.text for e in dataset.examples] == ["fine", "also fine"]
    size = 200 * (1 << 20) + len('{"text": ""}')
    assert dataset.skipped == [f"{path}:2: record of {size} bytes, over data.max_record_bytes={8 << 20} "
                               "(raise it if records really are that large)"]  # fmt: skip
    assert peak < 32 << 20, f"peak {peak >> 20} MiB while reading"
    with pytest.raises(DataError, match=rf"huge\.jsonl:2: record of {size} bytes, over data\.max_record_bytes") as info:
        load_dataset(path)
    assert info.value.exit_code == 65


def test_record_limit_applies_to_every_container(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    big = {"text": "b" * 5000}
    write_jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, big])
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as handle:
        handle.write(json.dumps(big) + "\n" + json.dumps({"text": "ok"}) + "\n")
    (tmp_path / "c.json").write_text(json.dumps([{"text": "ok"}, big, {"text": "ok"}], indent=1))
    pq.write_table(pa.Table.from_pylist([{"text": "ok"}, big]), tmp_path / "d.parquet")
    dataset = load_dataset(tmp_path, max_invalid=10, max_record_bytes=4096)
    assert [e.source.rsplit("/", 1)[1] for e in dataset.examples] == [
        "a.jsonl:1",
        "b.jsonl.gz:2",
        "c.json:2",
        "c.json:8",
        "d.parquet:row 0",
    ]
    where = [line.split(": record of")[0].rsplit("/", 1)[1] for line in dataset.skipped]
    assert where == ["a.jsonl:2", "b.jsonl.gz:1", "c.json:5", "d.parquet:row 1"]
    assert all("over data.max_record_bytes=4096" in line for line in dataset.skipped)
    assert load_dataset(tmp_path, max_invalid=10).skipped == []  # within the default limit


def test_a_json_array_element_too_large_to_hold_ends_the_file(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    path.write_text('[\n{"text": "ok"},\n{"text": "' + "c" * (3 << 20) + '"}\n]')
    with pytest.raises(DataError, match=r"big\.json:3: record of more than 4096 bytes, over data\.max_record_bytes"):
        load_dataset(path, max_record_bytes=4096)
    assert len(load_dataset(path).examples) == 2


def test_data_max_record_bytes_is_checked() -> None:
    from job.config.schema import DataConfig
    from job.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data\.max_record_bytes must be at least 1024"):
        DataConfig(train="t.jsonl", max_record_bytes=10)


@pytest.mark.parametrize(
    ("record", "fmt"),
    [
        ({"messages": [{"role": "x" * 1_000_000, "content": "q"}]}, "messages"),
        ({"k" * 1_000_000: 1}, "auto"),
        ({"k" * 1_000_000: 1}, "text"),
    ],
)
def test_a_huge_value_is_quoted_cut_short(tmp_path: Path, record: dict, fmt: str) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [record])
    with pytest.raises(DataError) as info:
        load_dataset(path, fmt)
    assert f"{path}:1" in str(info.value) and "[cut 999" in str(info.value)
    assert len(str(info.value)) < 2000


def test_a_byte_order_mark_is_accepted_in_every_container(tmp_path: Path) -> None:
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.jsonl").write_bytes(bom + b'{"text": "one"}\n')
    (tmp_path / "b.json").write_bytes(bom + b'[{"text": "two"}]')
    with gzip.open(tmp_path / "c.jsonl.gz", "wb") as handle:
        handle.write(bom + b'{"text": "three"}\n')
    assert [e.text for e in load_dataset(tmp_path).examples] == ["one", "two", "three"]


def test_one_json_object_and_a_dataset_catalogue_get_their_own_messages(tmp_path: Path) -> None:
    (tmp_path / "one.json").write_text(json.dumps({"data": [{"text": "x"}], "version": 1}, indent=2))
    with pytest.raises(DataError, match=r"one.json: holds one JSON object \(keys data, version\), not a list") as info:
        load_dataset(tmp_path / "one.json")
    assert "'data' holds a list of objects" in str(info.value) and info.value.exit_code == 65
    folder = tmp_path / "llamafactory"
    catalogue = {"alpaca_en_demo": {"file_name": "alpaca_en_demo.json"}, "c4": {"hf_hub_url": "allenai/c4"}}
    write_jsonl(folder / "alpaca_en_demo.jsonl", [{"instruction": "i", "output": "o"}])
    (folder / "dataset_info.json").write_text(json.dumps(catalogue, indent=2))
    assert [f.name for f in load_dataset(folder).files] == ["alpaca_en_demo.jsonl"]  # skipped, with a log line
    with pytest.raises(DataError, match="dataset catalogue") as info:
        load_dataset(folder / "dataset_info.json")
    assert "alpaca_en_demo.json" in info.value.hint and "list of sources" in info.value.hint


def test_a_folder_whose_files_hold_different_formats_points_to_a_list_of_sources(tmp_path) -> None:
    write_jsonl(tmp_path / "d" / "a.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                           {"role": "assistant", "content": "Hello"}]}])  # fmt: skip
    write_jsonl(tmp_path / "d" / "b.jsonl", [{"instruction": "Say hi", "output": "hi"}] * 2)
    with pytest.raises(DataError) as caught:
        load_dataset(tmp_path / "d")
    assert "b.jsonl:1" in caught.value.message and "looks like `alpaca`" in caught.value.message
    assert "list them under data.train as sources" in caught.value.hint
    write_jsonl(tmp_path / "one" / "a.jsonl", [{"instruction": "Say hi"}])  # one file: a plain bad record
    with pytest.raises(DataError) as caught:
        load_dataset(tmp_path / "one", "alpaca")
    assert "sources" not in caught.value.hint


def test_json_nested_deeper_than_the_reader_allows_is_a_bad_record_not_a_crash(tmp_path) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    call = {"id": "abcdefghi", "type": "function", "function": {"name": "f", "arguments": deep}}
    tool_use = {"messages": [good["messages"][0], {"role": "assistant", "tool_calls": [call]},
                             {"role": "tool", "content": "x"}, {"role": "assistant", "content": "ok"}]}  # fmt: skip
    lines = tmp_path / "deep.jsonl"
    lines.write_text(json.dumps(good) + "\n" + '{"messages": ' + deep + "}\n" + json.dumps(tool_use) + "\n")
    dataset = load_dataset(lines, max_invalid=2)
    assert len(dataset) == 1 and [e.split(": ", 1)[0] for e in dataset.skipped] == [f"{lines}:2", f"{lines}:3"]
    assert all("nested too deeply" in e for e in dataset.skipped)
    array = tmp_path / "deep.json"
    array.write_text("[" + json.dumps(good) + ",\n" + deep + "]")
    with pytest.raises(DataError, match=f"{array}:2: JSON nested too deeply"):
        load_dataset(array)
