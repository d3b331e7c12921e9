"""job/train: the SFTConfig the job builds for several ranks (FSDP2 defaults, what it refuses)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import tiny_job_trainer
from job.config.load import load_config
from job.errors import ConfigError
from job.train import fastpath
from job.train.trainer import build_sft_config

BASE = ["data.train=train.jsonl", "model.dtype=float32"]


def sft(tmp_path: Path, *overrides: str, device: str = "cpu"):
    return build_sft_config(load_config(None, [*BASE, *overrides], environ={}), tmp_path, device, has_eval=False)


def test_fsdp_true_gets_full_shard_layer_wrapping_fsdp_checkpointing_and_sharded_saves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fastpath, "log_decision", lambda fast: None)
    args = sft(tmp_path, "train.fsdp=true", "train.optim=adamw_torch_fused", "train.activation_checkpointing=true")
    assert args.fsdp is True
    config = args.fsdp_config
    assert config["version"] == 2 and config["reshard_after_forward"] is True
    assert config["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and config["state_dict_type"] == "SHARDED_STATE_DICT"
    # FSDP's own recomputation replaces Trainer's (which would add an all-gather per layer).
    assert config["activation_checkpointing"] is True and args.activation_checkpointing is False
    assert args.ddp_find_unused_parameters is False and args.ddp_timeout == 600
    mine = sft(
        tmp_path,
        "train.fsdp=true",
        "train.optim=adamw_torch_fused",
        "train.fsdp_config={state_dict_type: FULL_STATE_DICT}",
    )
    assert mine.fsdp_config["state_dict_type"] == "FULL_STATE_DICT"  # the user's keys win


def test_fsdp_refuses_our_optimizers_and_computes_in_bf16_over_float32_masters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fastpath, "log_decision", lambda fast: None)
    with pytest.raises(ConfigError, match="not verified on FSDP2") as info:
        sft(tmp_path, "train.fsdp=true")  # the default optimizer is ours
    assert "adamw_torch_fused" in (info.value.hint or "")
    assert sft(tmp_path, "train.fsdp=true", "train.optim=adamw_torch").bf16 is False  # CPU: exact float32


def test_step_records_take_trainers_grad_norm_and_lr_each_step(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Pins the one private Trainer hook the job relies on (docs/design.md): `_get_grad_norm` runs once per
    optimizer step with the pre-clip norm. With a logging line every step, Trainer's own `grad_norm` and
    `learning_rate` must equal the records the job keeps for every step, and the records must hold every step."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, TrainerCallback

    from job.model.load import ModelSource, load_tokenizer
    from job.train.fastpath import choose_fast_path, detect_device
    from job.train.trainer import build_trainer

    config = load_config(
        None,
        [
            *BASE,
            "train.max_steps=4",
            "train.logging_steps=1",
            "train.per_device_train_batch_size=2",
            "train.gradient_accumulation_steps=2",
            "train.max_grad_norm=0.05",  # clipping is active: the record must hold the norm before it
            "train.learning_rate=1e-3",
            "train.warmup_steps=2",
            "train.optim=adamw_torch",
        ],
        environ={},
    )
    torch.manual_seed(0)
    rows = [list(range(5 + i, 5 + i + 12 + i % 5)) for i in range(16)]
    dataset = datasets.Dataset.from_dict({"input_ids": rows, "labels": [[-100, *r[1:]] for r in rows]})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = load_tokenizer(ModelSource(str(tiny_model_dir), "local", None), config.model)
    logged: list[dict] = []

    class Logs(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "grad_norm" in logs:
                logged.append({"step": state.global_step, **logs})

    fast = choose_fast_path(config, detect_device("cpu"))
    trainer, metrics = build_trainer(config, model, tokenizer, dataset, None, tmp_path, fast, extra_callbacks=[Logs()])
    trainer.train()
    records = {r.step: r for r in metrics.steps}
    assert sorted(records) == [1, 2, 3, 4] and len(logged) == 4
    for line in logged:
        record = records[line["step"]]
        assert record.grad_norm == pytest.approx(line["grad_norm"], rel=1e-6)
        assert record.learning_rate == pytest.approx(line["learning_rate"], rel=1e-9)
    assert all(r.grad_norm > 0.05 for r in records.values())  # pre-clip: larger than the clipping threshold
    assert [r.learning_rate for r in metrics.steps][:3] == pytest.approx([0.0, 5e-4, 1e-3])  # warm-up, step by step
    assert all(r.tokens > 0 and r.loss > 0 for r in metrics.steps)


# ---------------------------------------------------------------------------------------- async checkpoints


def tiny_trainer(tmp_path: Path, model_dir: Path, *overrides: str, callbacks: list | None = None):
    """A real JobTrainer on the tiny model (CPU, float32, the default optimizer), saving every 2 steps."""
    config = load_config(
        None,
        [
            *BASE,
            "train.max_steps=4",
            "train.per_device_train_batch_size=2",
            "train.learning_rate=1e-3",
            "checkpoint.every_steps=2",
            *overrides,
        ],
        environ={},
    )
    return tiny_job_trainer(config, model_dir, tmp_path / "trainer", callbacks or [])


def sha256s(directory: Path) -> dict[str, str]:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.parametrize("mode", ["full", "chunked"])
def test_async_checkpoint_is_byte_identical_to_trainers_synchronous_save(
    tmp_path: Path, tiny_model_dir: Path, mode: str
) -> None:
    """At step 2 the writer stages the state (or, chunked, writes it at once); right after, in the same on_save,
    Trainer's own synchronous save writes the same state elsewhere. Every file must be equal byte for byte:
    the weights, optimizer.pt (storage sharing kept), scheduler, RNG states, trainer state, config, tokenizer.
    Only Trainer's pickled training_args.bin is absent (the job drops it from every checkpoint). Chunked, the
    weights come in shards of at most the chunk (Trainer's sharded format): equal tensors, not equal bytes."""
    import torch
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from job.durability.staging import StagingPlan
    from job.train.trainer import JobTrainer

    sync_dir = tmp_path / "sync"
    chunk = 10 * 2**20  # the tiny model's weights are 17 MB in float32 (two 8 MB matrices): three shards

    class TwinSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:  # as Trainer saves: should_save still set (on_save clears it first)
                trainer._get_output_dir, control.should_save = (lambda trial: str(sync_dir)), True
                super(JobTrainer, trainer)._save_checkpoint(trainer.model, None)
                del trainer._get_output_dir
                control.should_save = False

    trainer = tiny_trainer(tmp_path, tiny_model_dir, callbacks=[TwinSave()])
    writer = trainer.checkpoint_writer
    assert writer is not None
    if mode == "chunked":
        writer.plan = StagingPlan("chunked", chunk, chunk, 0.0, "forced by the test")
    trainer.train()
    assert writer.plan.mode == mode
    assert (writer.staged_step == 4) is (mode == "full")
    ours_dir, theirs_dir = tmp_path / "trainer" / "checkpoint-2", sync_dir / "checkpoint-2"
    ours, theirs = sha256s(ours_dir), sha256s(theirs_dir)
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= set(ours)
    if mode == "chunked":
        shards = sorted(ours_dir.glob("model-*.safetensors"))
        assert len(shards) >= 2 and "model.safetensors.index.json" in ours
        assert all(shard.stat().st_size <= chunk + 2**16 for shard in shards)  # + the safetensors header
        weights = {k: v for shard in shards for k, v in load_file(shard).items()}
        reference = load_file(theirs_dir / "model.safetensors")
        assert weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in weights)
        ours = {k: v for k, v in ours.items() if not k.startswith("model")}
        theirs.pop("model.safetensors")
    assert set(theirs) - set(ours) == {"training_args.bin"}
    different = [name for name in ours if ours[name] != theirs[name]]
    assert not different, f"differ from Trainer's synchronous save: {different}"
    assert not list((tmp_path / "trainer").glob("*.partial-*"))


def test_training_goes_on_while_the_write_runs_and_writes_the_steps_weights(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """The writer is held before writing checkpoint 2 while step 3 trains; the folder appears only whole, with
    step 2's weights (not step 3's); the save due at step 4 waits for that write (counted as blocked time)."""
    import threading

    import torch
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    release = threading.Event()
    seen: dict[str, object] = {}
    trainer_dir = tmp_path / "trainer"

    class Watch(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                seen["step 2"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if state.global_step == 4:
                seen["waited"] = trainer.checkpoint_writer.waited_seconds

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 3:  # step 3 trained while checkpoint 2 is still unwritten
                seen["at step 3"] = sorted(p.name for p in trainer_dir.iterdir() if p.name.startswith("checkpoint"))
                seen["step 3"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if state.global_step == 4:  # a save is due now; the write of 2 goes on for a second more
                threading.Timer(1.0, release.set).start()

    trainer = tiny_trainer(tmp_path, tiny_model_dir, callbacks=[Watch()])
    trainer.checkpoint_writer.before_write = lambda step: step != 2 or release.wait(60)
    trainer.train()
    assert seen["at step 3"] == [f"checkpoint-2.partial-{os.getpid()}"]  # never a half-written checkpoint-2
    assert seen["waited"] >= 0.5  # the save at step 4 waited for checkpoint 2's write
    written = load_file(trainer_dir / "checkpoint-2" / "model.safetensors")
    step2, step3 = seen["step 2"], seen["step 3"]
    assert all(torch.equal(written[k], step2[k]) for k in written)
    assert not all(torch.equal(written[k], step3[k]) for k in written)  # later steps did change the weights


def test_a_failed_background_write_surfaces_with_its_class_and_leaves_no_folder(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from job.durability.preemption import Measurements, PreemptionHandler
    from job.errors import ScratchFull
    from job.train.callbacks import CheckpointCallback

    def full_disk(step: int) -> None:
        raise ScratchFull(f"scratch disk full writing checkpoint {step}")

    preemption = PreemptionHandler(25.0, Measurements())
    checkpoints = CheckpointCallback(60.0, True, None, preemption, lambda: False)
    trainer = tiny_trainer(tmp_path, tiny_model_dir, callbacks=[checkpoints])
    assert checkpoints.writer is trainer.checkpoint_writer
    trainer.checkpoint_writer.before_write = full_disk
    with pytest.raises(ScratchFull, match="background write of checkpoint step 2 failed: scratch disk full") as info:
        trainer.train()
    assert info.value.exit_code == 74
    assert trainer.state.global_step < 4  # surfaced at a step's end, before training finished
    assert not [p.name for p in (tmp_path / "trainer").iterdir() if p.name.startswith("checkpoint")]
    assert preemption.measured.save_seconds is None  # a failed write measures nothing


@pytest.mark.parametrize("text_mode", ["blocks", "documents"])
def test_text_blocks_train_padding_free_even_without_packing(tmp_path, tiny_model_dir, text_mode) -> None:
    """Blocks carry `seq_lengths`: run padded, their documents would attend to each other."""
    import torch
    from test_tokenize_cache import job_config
    from transformers import AutoModelForCausalLM

    from conftest import write_jsonl
    from job.data.prepare import prepare
    from job.train.fastpath import choose_fast_path, detect_device
    from job.train.trainer import build_trainer

    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": " ".join(["word"] * (10 + 9 * i))} for i in range(8)])
    config = job_config(tmp_path, tiny_model_dir, docs, f"data.text_mode={text_mode}", "data.packing=false")
    prepared = prepare(config)
    assert prepared.train.packed == (text_mode == "blocks")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    fast = choose_fast_path(config, detect_device("cpu"), packed=prepared.train.packed)
    trainer, _ = build_trainer(config, model, prepared.tokenizer, prepared.train.dataset, None, tmp_path, fast)
    assert trainer.args.padding_free == (text_mode == "blocks")
    if text_mode == "blocks":
        row = prepared.train.dataset.with_format(None)[0]
        batch = trainer.data_collator([row])
        restarts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
        assert len(restarts) == len(row["seq_lengths"]) > 1  # positions restart at each document piece
