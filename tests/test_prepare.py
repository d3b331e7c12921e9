"""prepare/validate: statistics a user sizes a run with, truncation policies, splits, worker processes."""

from __future__ import annotations

import math
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs
from test_tokenize_cache import chat_records, events, job_config, rows

from conftest import write_jsonl
from job.data.masking import tokenize_examples
from job.data.prepare import prepare, validate
from job.data.read import load_dataset
from job.errors import DataError, InputNotFound

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def long_and_short(count: int) -> list[dict]:
    """Answers of growing length, so percentiles and truncation have something to bite on."""
    return [
        {"messages": [{"role": "user", "content": f"Say {i} words."}, {"role": "assistant", "content": "word " * i}]}
        for i in range(1, count + 1)
    ]


def test_validate_reports_per_file_counts_percentiles_and_steps(tmp_path, tiny_model_dir) -> None:
    shards = tmp_path / "shards"
    write_jsonl(shards / "a.jsonl", long_and_short(30))
    write_jsonl(shards / "b.jsonl", chat_records(10))
    config = job_config(
        tmp_path, tiny_model_dir, shards, "data.max_length=40", "train.per_device_train_batch_size=4",
        "train.gradient_accumulation_steps=2",
    )  # fmt: skip
    report = validate(config)
    assert report["records_per_file"] == {"a.jsonl": 30, "b.jsonl": 10} and report["records"] == 40
    prepared = prepare(config)
    lengths = np.array([len(ids) for ids in prepared.train.input_ids])
    for q in (50, 90, 99):
        assert report[f"length_p{q}"] == int(np.percentile(lengths, q, method="inverted_cdf"))
    full = [len(ids) for ids in tokenize_examples(load_dataset(shards).examples, prepared.tokenizer,
            max_length=10_000, train_on="assistant").input_ids]  # fmt: skip
    assert report["truncated"] == sum(n > 40 for n in full) > 0
    assert report["length_max"] == lengths.max() == 40  # the longest answers were truncated to max_length
    assert report["tokens"] == lengths.sum() and 0 < report["trainable_tokens"] < report["tokens"]
    assert report["optimizer_steps_per_epoch"] == math.ceil(math.ceil(40 / 4) / 2) == 5
    assert report["tokenize_cache_hit"] is False and prepared.cache_hit  # prepare reused what validate made
    packed = validate(job_config(tmp_path, tiny_model_dir, shards, "data.max_length=40", "data.packing=true"))
    assert packed["sequences"] < 40 and packed["packing_efficiency"] > 0.5
    per_step = packed["sequences_per_optimizer_step"]
    assert packed["optimizer_steps_per_epoch"] == max(math.ceil(packed["sequences"] / per_step), 1)


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.iterdir() if p.suffix != ".py"))
def test_every_fixture_format_prepares(tmp_path, tiny_model_dir, name: str) -> None:
    with capture_logs() as logs:
        prepared = prepare(job_config(tmp_path, tiny_model_dir, FIXTURES / name))
    assert prepared.train.stats["examples"] >= 1 and prepared.train.stats["trainable_tokens"] > 0
    masked = events(logs, "example_masked")[0]["text"]
    assert "«" in masked and masked.endswith("</s>»")
    chat = prepared.format in ("messages", "sharegpt", "alpaca") or name.startswith("prompt_completion_chat")
    assert (prepared.template_origin == "default-mistral-v3") == chat


def test_truncation_error_and_drop(tmp_path, tiny_model_dir) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", long_and_short(80))
    with pytest.raises(DataError, match=r"longer than data.max_length=64") as info:
        prepare(job_config(tmp_path, tiny_model_dir, train, "data.truncation=error"))
    assert info.value.exit_code == 65 and re.search(rf"{re.escape(str(train))}:\d+: \d+ tokens", str(info.value))
    dropped = prepare(job_config(tmp_path, tiny_model_dir, train, "data.truncation=drop")).train.stats
    truncated = prepare(job_config(tmp_path, tiny_model_dir, train, "data.truncation=truncate")).train.stats
    assert dropped["dropped"] == truncated["truncated"] > 0 and dropped["truncated"] == truncated["truncated"]
    assert dropped["examples"] + dropped["dropped"] == truncated["examples"] == 80
    assert dropped["lengths"]["max"] <= 64 and f"{train}:80" in dropped["dropped_sources"]


def test_prompt_alone_filling_max_length_is_dropped_not_trained(tmp_path, tiny_model_dir) -> None:
    records = [
        {"messages": [{"role": "user", "content": "long " * 100}, {"role": "assistant", "content": "ok"}]},
        *chat_records(3),
    ]
    with capture_logs() as logs:
        stats = prepare(job_config(tmp_path, tiny_model_dir, write_jsonl(tmp_path / "t.jsonl", records))).train.stats
    assert stats["dropped"] == 1 and stats["examples"] == 3 and stats["dropped_sources"][0].endswith("t.jsonl:1")
    assert events(logs, "examples_truncated")[0]["dropped"] == 1


def test_eval_fraction_is_seeded_and_eval_files_are_separate(tmp_path, tiny_model_dir) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", chat_records(20))
    split = prepare(job_config(tmp_path, tiny_model_dir, train, "data.eval_fraction=0.25"))
    assert split.eval.stats["examples"] == 5 and split.train.stats["examples"] == 15
    reseeded = prepare(job_config(tmp_path, tiny_model_dir, train, "data.eval_fraction=0.25", "train.seed=7"))
    assert rows(reseeded.eval) != rows(split.eval) and split.dataset.records == 20
    held = write_jsonl(tmp_path / "eval.jsonl", chat_records(4, offset=100))
    separate = prepare(job_config(tmp_path, tiny_model_dir, train, f"data.eval={held}"))
    assert separate.eval.stats["examples"] == 4 and separate.train.stats["examples"] == 20


def test_worker_processes_give_the_same_dataset(tmp_path, tiny_model_dir, monkeypatch) -> None:
    monkeypatch.setattr("job.data.splits.EXAMPLES_PER_PROCESS", 10)  # 2 workers for 60 examples
    train = write_jsonl(tmp_path / "train.jsonl", [*chat_records(30), *long_and_short(30)])
    one = prepare(job_config(tmp_path, tiny_model_dir, train, "data.cache=false"))
    with capture_logs() as logs:
        two = prepare(job_config(tmp_path, tiny_model_dir, train, "data.cache=false", "data.num_proc=2"))
    assert events(logs, "tokenized")[0]["processes"] == 2
    assert rows(two.train) == rows(one.train) and two.train.stats == one.train.stats


def test_a_packed_split_only_reaches_the_trainer_whole(tmp_path, tiny_model_dir) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", chat_records(10))
    prepared = prepare(job_config(tmp_path, tiny_model_dir, train, "data.packing=true"))
    assert set(prepared.train.dataset.column_names) == {"input_ids", "labels", "seq_lengths"}
    with pytest.raises(TypeError, match="seq_lengths"):
        _ = prepared.train.input_ids


def test_bad_data_fails_before_the_model_is_resolved(tmp_path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [*chat_records(2), {"messages": [{"role": "user", "content": "?"}]}])
    config = job_config(tmp_path, tmp_path / "no-such-model", train)  # would be exit 66 if it were reached
    with pytest.raises(DataError, match=r"train\.jsonl:3: conversation has no assistant turn"):
        prepare(config)
    shutil.rmtree(tmp_path / "scratch", ignore_errors=True)


def test_eval_steps_alone_turns_on_step_evaluation(tmp_path, tiny_model_dir) -> None:
    from job.train.trainer import build_sft_config

    train = write_jsonl(tmp_path / "train.jsonl", chat_records(4))
    args = build_sft_config(
        job_config(tmp_path, tiny_model_dir, train, "train.eval_steps=5"), tmp_path, "cpu", has_eval=True
    )
    assert args.eval_strategy == "steps" and args.eval_steps == 5
    plain = build_sft_config(job_config(tmp_path, tiny_model_dir, train), tmp_path, "cpu", has_eval=True)
    assert plain.eval_strategy == "no" and not plain.packing and not plain.padding_free


@pytest.mark.slow
def test_packed_training_run_stores_its_tokenization_cache(tmp_path, tiny_model_dir) -> None:
    from conftest import cpu_run_args, run_job

    args = cpu_run_args(tmp_path, tiny_model_dir, "packed", "--set", "data.packing=true", "--set", "train.max_steps=3")
    result = run_job(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    ready = result.events("data_ready")[0]
    assert ready["packed"] is True and ready["sequences"] < ready["train_examples"]
    fingerprint = result.events("tokenize_cache_miss")[0]["fingerprint"]
    assert (tmp_path / "outputs" / "packed" / "cache" / fingerprint / "MANIFEST.json").is_file()
    assert result.events("tokenize_cache_stored")


def test_a_runaway_template_stops_every_worker_process(tmp_path, tiny_model_dir, monkeypatch) -> None:
    """The deadline is checked in the render itself (no signals): it works inside datasets.map workers."""
    monkeypatch.setattr("job.data.templates.RENDER_SECONDS", 0.5)  # forked workers inherit it
    monkeypatch.setattr("job.data.splits.EXAMPLES_PER_PROCESS", 10)
    template = tmp_path / "loops.jinja"
    template.write_text("{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}")
    train = write_jsonl(tmp_path / "train.jsonl", chat_records(30))
    config = job_config(tmp_path, tiny_model_dir, train, f"data.chat_template={template}", "data.num_proc=2")
    started = time.monotonic()
    with pytest.raises(DataError, match=r"train\.jsonl:\d+: the chat template ran longer than 0\.5 s") as info:
        prepare(config)
    assert info.value.exit_code == 65 and time.monotonic() - started < 60


def test_record_limit_and_template_path_reach_prepare(tmp_path, tiny_model_dir) -> None:
    records = [
        *chat_records(3),
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * 3000}]},
    ]
    train = write_jsonl(tmp_path / "train.jsonl", records)
    with pytest.raises(DataError, match=r"train\.jsonl:4: record of \d+ bytes, over data\.max_record_bytes=2048"):
        prepare(job_config(tmp_path, tiny_model_dir, train, "data.max_record_bytes=2048"))
    skipped = prepare(job_config(tmp_path, tiny_model_dir, train, "data.max_record_bytes=2048", "data.max_invalid=1"))
    assert skipped.train.stats["examples"] == 3 and len(skipped.skipped) == 1
    assert prepare(job_config(tmp_path, tiny_model_dir, train)).train.stats["examples"] == 4
    config = job_config(tmp_path, tmp_path / "no-such-model", train, f"data.chat_template={tmp_path / 'nope.jinja'}")
    with pytest.raises(InputNotFound, match=r"data\.chat_template file .*nope\.jinja does not exist"):
        prepare(config)  # before the data is read or the model resolved (that would be another exit 66)
