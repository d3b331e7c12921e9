"""Tokenization cache: a restart reuses the tokenized data (scratch, else the run's store), never tokenizing twice."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from conftest import write_jsonl
from job.config.load import load_config
from job.config.schema import JobConfig
from job.data.cache import tokenizer_digest
from job.data.prepare import prepare
from job.errors import DataError
from job.storage import LocalStore


def chat_records(count: int, offset: int = 0) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
            ]
        }
        for i in range(offset, offset + count)
    ]


def job_config(tmp_path: Path, model_dir: Path, train: Path, *overrides: str) -> JobConfig:
    return load_config(
        None,
        [
            f"data.train={train}",
            f"run.scratch={tmp_path / 'scratch'}",
            f"run.output={tmp_path / 'out'}",
            f"model.source={model_dir}",
            "data.num_proc=1",
            "data.max_length=64",
            *overrides,
        ],
        environ={},
    )


def events(logs: list[dict], name: str) -> list[dict]:
    return [e for e in logs if e["event"] == name]


def rows(split) -> list[tuple]:
    return [(tuple(r["input_ids"]), tuple(r["labels"])) for r in split.dataset]


def test_restart_reuses_the_cache_without_reading_or_tokenizing(tmp_path, tiny_model_dir, monkeypatch) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", chat_records(30))
    config = job_config(tmp_path, tiny_model_dir, train, "data.packing=true", "data.eval_fraction=0.2")
    store = LocalStore(tmp_path / "out" / "run")
    with capture_logs() as logs:
        first = prepare(config, store=store)
    assert events(logs, "tokenize_cache_miss") and not first.cache_hit
    assert store.is_committed(f"cache/{first.fingerprint}")
    assert any(info.key.startswith("cache/validated/") for info in store.list("cache"))

    def forbidden(*args, **kwargs):
        raise AssertionError("the data was read or tokenized again")

    monkeypatch.setattr("job.data.prepare.tokenize_split", forbidden)
    monkeypatch.setattr("job.data.assemble.load_dataset", forbidden)
    with capture_logs() as logs:
        again = prepare(config, store=store)  # same node: scratch
    assert again.cache_hit and events(logs, "tokenize_cache_hit")[0]["where"] == "scratch"
    assert rows(again.train) == rows(first.train) and rows(again.eval) == rows(first.eval)
    assert again.train.stats == first.train.stats and again.format == "messages"

    shutil.rmtree(tmp_path / "scratch" / "cache")  # another node: nothing in scratch
    with capture_logs() as logs:
        elsewhere = prepare(config, store=store)
    assert events(logs, "data_validated_earlier") and events(logs, "tokenize_cache_hit")[0]["where"] == "store"
    assert rows(elsewhere.train) == rows(first.train)
    assert "seq_lengths" in elsewhere.train.dataset.column_names
    assert events(logs, "example_masked")[0]["text"].endswith("</s>»")


def test_every_setting_that_changes_tokens_changes_the_fingerprint(tmp_path, tiny_model_dir) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", chat_records(6))
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}")
    variants = [
        (),
        ("data.max_length=32",),
        ("data.train_on=all",),
        ("data.packing=true",),
        ("data.truncation=drop",),
        (f"data.chat_template={template}",),
        ("data.eval_fraction=0.5",),
        ("data.max_record_bytes=4096",),  # which records are valid
    ]
    keys = [prepare(job_config(tmp_path, tiny_model_dir, train, *v)).fingerprint for v in variants]
    assert len(set(keys)) == len(keys)
    same = prepare(job_config(tmp_path, tiny_model_dir, train, "data.num_proc=2", "data.max_invalid=3"))
    assert same.fingerprint == keys[0] and same.cache_hit  # neither changes the tokens
    write_jsonl(train, chat_records(6, offset=1))
    assert prepare(job_config(tmp_path, tiny_model_dir, train)).fingerprint not in keys  # other data


def test_tokenizer_digest_sees_vocabulary_and_special_tokens(tokenizer) -> None:
    import copy

    other = copy.deepcopy(tokenizer)
    other.backend_tokenizer.enable_truncation(7)  # call-time state transformers sets: not part of the tokenizer
    assert tokenizer_digest(other) == tokenizer_digest(tokenizer)
    other.add_special_tokens({"additional_special_tokens": ["<|new|>"]})
    assert tokenizer_digest(other) != tokenizer_digest(tokenizer)


def test_a_damaged_store_entry_is_refused_and_the_data_tokenized_again(tmp_path, tiny_model_dir) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", chat_records(12))
    config = job_config(tmp_path, tiny_model_dir, train)
    store = LocalStore(tmp_path / "out" / "run")
    first = prepare(config, store=store)
    arrow = next((store.root / "cache" / first.fingerprint / "train").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:-8] + b"\x00" * 8)  # same size, different bytes
    shutil.rmtree(tmp_path / "scratch" / "cache")
    with capture_logs() as logs:
        again = prepare(config, store=store)
    assert events(logs, "tokenize_cache_damaged") and events(logs, "tokenize_cache_miss")
    assert not again.cache_hit and rows(again.train) == rows(first.train)


def test_skipped_records_are_reported_and_rechecked_on_a_cache_hit(tmp_path, tiny_model_dir) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [*chat_records(5), {"messages": []}, {"prompt": "p"}])
    store = LocalStore(tmp_path / "out" / "run")
    with capture_logs() as logs:
        prepared = prepare(job_config(tmp_path, tiny_model_dir, train, "data.max_invalid=2"), store=store)
    assert len(prepared.skipped) == 2 and prepared.train.stats["examples"] == 5
    report = events(logs, "invalid_records_skipped")[-1]["report"]
    assert report.startswith(store.uri) and "reports/invalid-records-" in report
    stored = [info.key for info in store.list("reports")]
    assert len(stored) == 1 and f"{train}:6" in store.read_bytes(stored[0]).decode()
    with pytest.raises(DataError, match=r"2 bad record\(s\), more than data.max_invalid=1") as info:
        prepare(job_config(tmp_path, tiny_model_dir, train, "data.max_invalid=1"), store=store)  # cached: still checked
    assert info.value.exit_code == 65 and f"{train}:7" in str(info.value)


def test_cache_off_writes_nothing(tmp_path, tiny_model_dir) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", chat_records(4))
    store = LocalStore(tmp_path / "out" / "run")
    with capture_logs() as logs:
        prepared = prepare(job_config(tmp_path, tiny_model_dir, train, "data.cache=false"), store=store)
    assert prepared.train.stats["examples"] == 4 and not events(logs, "tokenize_cache_miss")
    assert not (tmp_path / "scratch" / "cache").exists() and not store.list("cache")
