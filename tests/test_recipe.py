"""The recipe in one process (after litgpt's tests/test_full.py): train, checkpoint, preempt, resume, compare.

`job.run.train` three times on the tiny model, no subprocess: an uninterrupted run; the same config under
another name, preempted by SIGTERM at the end of step 3 (`SFT_FAULTS=sigterm@3`); and its restart, which
must resume from step 3 and end with the uninterrupted run's weights, bit for bit; a fourth, preempted
at the final step, must publish the same weights without training a step past the end.
The subprocess versions (real signals from outside, SIGKILLs, S3, two ranks) are in test_resume.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import DEMO_EVAL, DEMO_TRAIN, REPO
from job.config.load import load_config
from job.durability import faults
from job.durability.checkpoints import stored_checkpoints
from job.errors import InputNotFound, Preempted
from job.publish.export import FINAL_PREFIX
from job.run import run_store, train

STEPS = 5
SIGTERM_AT = 3  # not a periodic checkpoint step: the checkpoint there is the save made on SIGTERM


def recipe_config(tmp_path: Path, model_dir: Path, name: str):
    return load_config(
        str(REPO / "examples" / "cpu-demo.yaml"),
        [
            f"run.name={name}",
            f"run.output={tmp_path / 'outputs'}",
            f"run.scratch={tmp_path / 'scratch'}",
            f"model.source={model_dir}",
            "model.dtype=float32",
            f"data.train={DEMO_TRAIN}",
            f"data.eval={DEMO_EVAL}",
            "data.max_length=64",
            f"train.max_steps={STEPS}",
            "train.logging_steps=1",
            "checkpoint.every_steps=2",
            # Each upload finishes (and is measured) before the next step: the SIGTERM decision
            # "finish the step and save" does not depend on how fast this machine copies files.
            "checkpoint.background_upload=false",
        ],
        environ={},
    )


@pytest.fixture
def set_faults(monkeypatch: pytest.MonkeyPatch):
    """SFT_FAULTS is read once per process: clear that cache on every change, and after the test."""

    def set_to(spec: str | None) -> None:
        if spec is None:
            monkeypatch.delenv("SFT_FAULTS", raising=False)
        else:
            monkeypatch.setenv("SFT_FAULTS", spec)
        faults._planned.cache_clear()

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    set_to(None)
    yield set_to
    monkeypatch.undo()
    faults._planned.cache_clear()


def test_train_checkpoint_preempt_and_resume_in_process_equal_an_uninterrupted_run(
    tmp_path: Path, tiny_model_dir: Path, set_faults
) -> None:
    # (a) Uninterrupted.
    straight = train(recipe_config(tmp_path, tiny_model_dir, "straight"))
    assert straight["final_step"] == STEPS and straight["steps"] == STEPS
    assert straight["resumed_from_step"] is None

    # (b) The same training under another name, SIGTERM at the end of step 3: the step's save fits, exit 75.
    config = recipe_config(tmp_path, tiny_model_dir, "preempted")
    store = run_store(config)
    set_faults(f"sigterm@{SIGTERM_AT}")
    with pytest.raises(Preempted) as info:
        train(config)
    assert info.value.exit_code == 75
    assert f"newest durable checkpoint: step {SIGTERM_AT}" in str(info.value)
    committed, _ = stored_checkpoints(store)
    assert committed == [SIGTERM_AT, 2]  # the periodic one and the one made on SIGTERM, both committed
    assert not store.is_committed(FINAL_PREFIX)

    # (c) The restart, without the fault: resumes from step 3 and finishes.
    set_faults(None)
    resumed = train(config)
    assert resumed["resumed_from_step"] == SIGTERM_AT
    assert resumed["final_step"] == STEPS and resumed["steps"] == STEPS - SIGTERM_AT  # only this start's steps
    assert store.is_committed(FINAL_PREFIX) and stored_checkpoints(store) == ([], {})

    straight_dir = tmp_path / "outputs" / "straight" / "final"
    resumed_dir = tmp_path / "outputs" / "preempted" / "final"
    ours, reference = load_file(resumed_dir / "model.safetensors"), load_file(straight_dir / "model.safetensors")
    base = load_file(tiny_model_dir / "model.safetensors")
    assert ours.keys() == reference.keys()
    different = [k for k in ours if not torch.equal(ours[k], reference[k])]
    assert not different, f"resumed weights differ from the uninterrupted run's: {different[:5]}"
    assert not all(torch.equal(reference[k], base[k]) for k in reference)  # it did train
    metrics = json.loads((resumed_dir / "metrics.json").read_text())
    reference_metrics = json.loads((straight_dir / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == SIGTERM_AT
    assert [s for s, _ in metrics["loss_per_step"]] == list(range(1, STEPS + 1))  # every step exactly once
    assert metrics["loss_per_step"] == reference_metrics["loss_per_step"] == straight["loss_per_step"]
    assert metrics["eval_loss"] == reference_metrics["eval_loss"]

    # (d) Preempted at the final step (its checkpoint committed, final/ not yet): the restart trains no step
    # past the end; it publishes exactly the uninterrupted run's weights.
    config = recipe_config(tmp_path, tiny_model_dir, "preempted-at-end")
    set_faults(f"sigterm@{STEPS}")
    with pytest.raises(Preempted, match=f"newest durable checkpoint: step {STEPS}"):
        train(config)
    set_faults(None)
    at_end = train(config)
    assert at_end["resumed_from_step"] == STEPS and at_end["steps"] == 0
    assert at_end["final_step"] == STEPS and at_end["loss_per_step"] == straight["loss_per_step"]
    last = load_file(tmp_path / "outputs" / "preempted-at-end" / "final" / "model.safetensors")
    assert not [k for k in last if not torch.equal(last[k], reference[k])], "one step too many after the last"


def test_a_start_that_failed_before_training_binds_no_config(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Exit 66 on a wrong data path records nothing; the corrected start trains instead of being refused (64)."""
    wrong = recipe_config(tmp_path, tiny_model_dir, "fixed")
    wrong.data.train = str(tmp_path / "no-such-file.jsonl")
    store = run_store(wrong)
    with pytest.raises(InputNotFound):
        train(wrong)
    assert store.stat("config.resolved.yaml") is None and store.list("logs/starts") == []
    fixed = train(recipe_config(tmp_path, tiny_model_dir, "fixed"))
    assert fixed["final_step"] == STEPS
    recorded = store.read_bytes("config.resolved.yaml").decode()
    assert str(DEMO_TRAIN) in recorded and "no-such-file" not in recorded
    assert len(store.list("logs/starts")) == 1  # the failed start survived no preemption
