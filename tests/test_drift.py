"""Config drift: what defines a run is compared; where and how it runs is not."""

from __future__ import annotations

import yaml

from job.config.drift import config_drift, keep_recorded_split
from job.config.load import load_config, to_yaml

BASE = ["data.train=train.jsonl"]


def resolved(*overrides: str) -> dict:
    return yaml.safe_load(to_yaml(load_config(None, [*BASE, *overrides], environ={})))


def test_hyper_parameters_model_and_data_are_drift() -> None:
    first = resolved()
    changed = resolved("train.learning_rate=1e-5", "model.revision=abc", "data.max_length=512", "train.eval_steps=5")
    assert config_drift(first, changed) == [
        "model.revision: None -> 'abc'",
        "data.max_length: 2048 -> 512",
        "train.eval_steps: None -> 5.0",
        "train.learning_rate: 5e-06 -> 1e-05",
    ]


def test_placement_and_cadence_are_not_drift() -> None:
    first = resolved()
    moved = resolved(
        "run.scratch=/elsewhere",
        "checkpoint.grace_seconds=10",
        "checkpoint.every_minutes=5",
        "storage.max_attempts=3",
        "train.logging_steps=1",
    )
    assert config_drift(first, moved) == []


def test_a_field_new_in_this_version_at_its_default_is_not_drift() -> None:
    first = resolved()
    del first["data"]["train_on"]  # recorded by a version that did not have this field
    del first["model"]["trust_remote_code"]
    assert config_drift(first, resolved()) == []
    assert config_drift(first, resolved("data.train_on=all")) == ["data.train_on: None -> 'all'"]


def test_the_world_size_is_drift_but_the_rendezvous_is_not() -> None:
    """The world size sets the global batch and who reads which examples: a resume must keep it."""
    first = resolved()
    assert config_drift(first, resolved("distributed.nproc_per_node=2")) == ["distributed.nproc_per_node: 1 -> 2"]
    moved = resolved("distributed.rdzv_endpoint=other:29400", "distributed.collective_timeout_seconds=60")
    assert config_drift(first, moved) == []
    recorded_before_distributed_existed = {k: v for k, v in first.items() if k != "distributed"}
    assert config_drift(recorded_before_distributed_existed, first) == []


def test_credentials_in_urls_are_compared_redacted_and_long_values_cut() -> None:
    # A record written before URLs were redacted holds the password; the same run restarted is not drift.
    recorded = resolved("data.train=https://user:old-secret@data.example/train.jsonl")
    recorded["data"]["train"] = "https://user:old-secret@data.example/train.jsonl"
    assert config_drift(recorded, resolved("data.train=https://user:new-secret@data.example/train.jsonl")) == []
    huge = "x" * 1_000_000
    [change] = config_drift(resolved(), resolved(f"data.chat_template={{{{ {huge} }}}}"))
    assert change.startswith("data.chat_template: None -> ") and len(change) < 1000


def test_a_restart_keeps_the_batch_split_the_run_began_with_unless_the_user_set_one() -> None:
    recorded = resolved("train.per_device_train_batch_size=1", "train.gradient_accumulation_steps=16")
    restart = load_config(None, BASE, environ={})
    assert not restart.is_set("train.per_device_train_batch_size")
    assert keep_recorded_split(restart, recorded) == {
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 16,
    }
    assert (restart.train.per_device_train_batch_size, restart.train.gradient_accumulation_steps) == (1, 16)
    assert restart.is_set("train.gradient_accumulation_steps")  # so this start's planner keeps it too
    assert config_drift(recorded, yaml.safe_load(to_yaml(restart))) == []

    # A value the user sets is theirs: nothing adopted, and a change is drift as before.
    explicit = load_config(None, [*BASE, "train.per_device_train_batch_size=4"], environ={})
    assert keep_recorded_split(explicit, recorded) is None
    assert "train.per_device_train_batch_size: 1 -> 4" in config_drift(recorded, yaml.safe_load(to_yaml(explicit)))

    by_env = load_config(None, BASE, environ={"SFT_TRAIN__GRADIENT_ACCUMULATION_STEPS": "8"})
    assert by_env.is_set("train.gradient_accumulation_steps")
    assert keep_recorded_split(by_env, recorded) is None
    for garbage in (None, [], {"train": "x"}, {"train": {"per_device_train_batch_size": 0}},
                    {"train": {"per_device_train_batch_size": True, "gradient_accumulation_steps": 2}}):  # fmt: skip
        fresh = load_config(None, BASE, environ={})
        assert keep_recorded_split(fresh, garbage) is None
        assert fresh.train.per_device_train_batch_size == 2
