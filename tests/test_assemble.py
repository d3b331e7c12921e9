"""Mixtures through the real reader and tokenizer: caps, eval hold-out, weights, token shares, Hub commits."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
from test_tokenize_cache import chat_records, job_config

from conftest import go_offline, write_cache, write_jsonl
from job.config.schema import SourceConfig
from job.data.assemble import assemble
from job.data.prepare import validate
from job.data.sources import fetch_sources


def alpaca_records(count: int) -> list[dict]:
    return [{"instruction": f"Spell {i}.", "output": " ".join(str(i)) + " done", "id": i} for i in range(count)]


def text_records(count: int) -> list[dict]:
    return [{"text": " ".join(f"w{i}x{j}" for j in range(20 + 5 * i))} for i in range(count)]


def mixture(tmp_path: Path, tiny_model_dir: Path, entries: list[dict], *overrides: str):
    listing = json.dumps(entries)  # YAML flow syntax is JSON's superset
    return job_config(tmp_path, tiny_model_dir, Path("unused"), f"data.train={listing}", *overrides)


@pytest.fixture
def three_sources(tmp_path: Path) -> dict[str, Path]:
    return {
        "chat": write_jsonl(tmp_path / "chat.jsonl", chat_records(20)),
        "alpaca": write_jsonl(tmp_path / "alpaca.jsonl", alpaca_records(30)),
        "text": write_jsonl(tmp_path / "text.jsonl", text_records(5)),
    }


def test_each_source_gives_the_tokens_it_gives_alone_times_its_weight(tmp_path, tiny_model_dir, three_sources):
    entries = [
        {"path": str(three_sources["chat"]), "weight": 2},
        {"path": str(three_sources["alpaca"]), "max_examples": 10},
        {"path": str(three_sources["text"]), "weight": 0.5},
    ]
    report = validate(mixture(tmp_path / "mix", tiny_model_dir, entries, "data.max_length=512"))
    rows = report["sources"]
    assert [(r["format"], r["records"], r["examples"]) for r in rows] == [
        ("messages", 20, 40), ("alpaca", 30, 10), ("text", 5, 3)  # 2.5 documents round half up
    ]  # fmt: skip
    assert report["format"] == "mixed" and report["records"] == 55
    assert sum(r["tokens"] for r in rows) == report["tokens_kept"]
    assert sum(r["token_share"] for r in rows) == pytest.approx(1, abs=1e-5)
    alone = [
        validate(mixture(tmp_path / f"alone{i}", tiny_model_dir, [{**entry, "weight": 1}], "data.max_length=512"))
        for i, entry in enumerate(entries)
    ]
    assert rows[0]["tokens"] == 2 * alone[0]["tokens_kept"]
    assert rows[1]["tokens"] == alone[1]["tokens_kept"]  # the same seeded 10 records
    assert 0 < rows[2]["tokens"] < alone[2]["tokens_kept"]
    assert report["notes"]["unused_fields"]["id"]["records"] == 30  # alpaca's `id`, counted once per record


def test_eval_never_holds_a_repeat_of_a_training_row(tmp_path, tiny_model_dir, three_sources) -> None:
    entries = [{"path": str(three_sources["chat"]), "weight": 3}, {"path": str(three_sources["alpaca"])}]
    config = mixture(tmp_path, tiny_model_dir, entries, "data.eval_fraction=0.2")
    fetched = fetch_sources(config.data, tmp_path / "scratch", config.storage)
    built = assemble(config, fetched, None, tmp_path / "work")
    train = collections.Counter(built.train["source"])
    held = set(built.eval["source"])
    assert len(held) == 10 and not held & set(train)
    chat = [n for where, n in train.items() if where.startswith(str(three_sources["chat"]))]
    alpaca = [n for where, n in train.items() if where.startswith(str(three_sources["alpaca"]))]
    assert set(chat) == {3} and set(alpaca) == {1} and len(chat) + len(alpaca) == 40
    assert built.record["sources"][0]["examples"] == 3 * len(chat)


def test_a_cap_is_a_seeded_sample_that_changes_with_the_seed(tmp_path, tiny_model_dir, three_sources) -> None:
    def kept(seed: int) -> list[str]:
        config = mixture(tmp_path, tiny_model_dir, [{"path": str(three_sources["alpaca"]), "max_examples": 5}],
                         f"train.seed={seed}")  # fmt: skip
        fetched = fetch_sources(config.data, tmp_path / f"s{seed}", config.storage)
        return list(assemble(config, fetched, None, tmp_path / f"w{seed}").train["source"])

    first = kept(1)
    assert len(first) == 5 and first == kept(1) and first != kept(2)
    assert first == sorted(first, key=lambda where: int(where.rsplit(":", 1)[1]))  # kept in file order


def test_a_hub_source_is_read_at_its_commit_and_the_commit_is_reported(
    tmp_path,
    tiny_model_dir,
    hub_env,
    monkeypatch,
) -> None:
    commit = "3" * 40
    body = "".join(json.dumps(r) + "\n" for r in chat_records(6)).encode()
    write_cache(hub_env / "hub", "org/chats", {"main": commit}, {"data/train.jsonl": body, "README.md": b"# card"})
    go_offline(monkeypatch)
    local = write_jsonl(tmp_path / "mine.jsonl", alpaca_records(4))
    entries = [{"path": "hf://datasets/org/chats/data/*.jsonl"}, {"path": str(local)}]
    config = mixture(tmp_path, tiny_model_dir, entries, f"run.scratch={hub_env}")
    report = validate(config)
    assert [(r["name"], r["revision"], r["records"]) for r in report["sources"]] == [
        ("hf://datasets/org/chats/data/*.jsonl", commit, 6), (str(local), None, 4)
    ]  # fmt: skip
    assert report["files"].keys() == {"hf://datasets/org/chats/data/*.jsonl#data/train.jsonl", str(local)}


def test_one_plain_path_reads_as_it_always_did(tmp_path, tiny_model_dir, three_sources) -> None:
    config = job_config(tmp_path, tiny_model_dir, three_sources["alpaca"])
    assert config.data.sources() == [SourceConfig(str(three_sources["alpaca"]), "auto")]
    report = validate(config)
    assert report["files"].keys() == {"alpaca.jsonl"} and report["format"] == "alpaca"
    assert [(r["examples"], r["token_share"]) for r in report["sources"]] == [(30, 1.0)]


def test_a_restart_reads_the_commit_the_first_start_read(tmp_path, tiny_model_dir, hub_env, monkeypatch) -> None:
    from job.data.prepare import COMMITS, prepare
    from job.storage.local import LocalStore

    first, moved = "4" * 40, "5" * 40
    body = "".join(json.dumps(r) + "\n" for r in chat_records(6)).encode()
    write_cache(hub_env / "hub", "org/chats", {"main": first}, {"train.jsonl": body})
    go_offline(monkeypatch)
    config = job_config(tmp_path, tiny_model_dir, Path("unused"), "data.train=hf://datasets/org/chats",
                        f"run.scratch={hub_env}")  # fmt: skip
    store = LocalStore(tmp_path / "out" / "run")
    assert prepare(config, store=store).sources[0]["revision"] == first
    assert json.loads(store.read_bytes(COMMITS)) == {"hf://datasets/org/chats": first}
    more = "".join(json.dumps(r) + "\n" for r in chat_records(9)).encode()
    write_cache(hub_env / "hub", "org/chats", {"main": moved}, {"train.jsonl": more})  # the branch moved
    again = prepare(config, store=store)
    assert again.sources[0]["revision"] == first and again.dataset.records == 6
    fresh = prepare(config, store=LocalStore(tmp_path / "out" / "other"))  # another run reads the branch now
    assert fresh.sources[0]["revision"] == moved and fresh.dataset.records == 9
