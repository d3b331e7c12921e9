"""The planner: exact parameter count, exact weight/gradient/optimizer bytes, activation estimate calibrated
against measured peaks, the layers kept and the batch split, checkpoint staging, advice."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from job.errors import ConfigError
from job.optim.adamw import OUR_OPTIMIZERS, build_optimizer
from job.plan import memory as planner
from job.plan.memory import MISTRAL_7B_V03
from job.plan.render import render_plan
from job.plan.speed import MEMORY_TARGET, every_n_kept, last_layers

GiB = 1 << 30

TINY = {
    "model_type": "mistral",
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 224,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def mistral_plans() -> dict[str, dict[str, Any]]:
    return {name: planner.make_plan(MISTRAL_7B_V03, optimizer=name) for name in OUR_OPTIMIZERS}


def test_mistral_7b_parameter_count(mistral_plans: dict[str, Any]) -> None:
    assert mistral_plans["adamw_kahan"]["parameters"] == 7_248_023_552
    shape = planner.model_shape(planner.load_model_config(MISTRAL_7B_V03))
    assert shape.parameters == 7_248_023_552 and len(shape.sizes) == 291
    assert shape.input_embedding == 32768 * 4096  # untied: the lookup table does no matmul


def test_mistral_7b_default_fits_the_96gb_card(mistral_plans: dict[str, Any]) -> None:
    plan = mistral_plans["adamw_kahan"]
    mem = plan["memory_bytes"]
    assert plan["gpu_memory_bytes"] == 97_887 * (1 << 20)
    assert mem["weights"] == mem["gradients"] == 2 * 7_248_023_552
    assert mem["weights"] / GiB == pytest.approx(13.50, abs=0.01)
    assert mem["optimizer"] / GiB == pytest.approx(40.50, abs=0.01)
    assert mem["total"] == sum(v for k, v in mem.items() if k != "total")
    assert plan["fits"] and plan["advice"] == [] and plan["headroom_bytes"] > 15 * GiB
    assert 2 * GiB < mem["activations"] + mem["backward"] < 6 * GiB
    assert plan["layers"]["kept"] == 0 and plan["activation_checkpointing"]  # make_plan's default: every layer
    assert plan["tokens_per_second_estimate"] > 1000 and plan["seconds_estimate"] is None
    assert 0.35 < plan["mfu_estimate"] < 0.42  # HFU 52% at 4,096 tokens per micro-batch, 1/3 recomputed
    table = render_plan(plan)
    assert "optimizer states" in table and "40.50" in table and "fits" in table


def test_fp32_master_does_not_fit_and_advice_names_the_default(mistral_plans: dict[str, Any]) -> None:
    plan = mistral_plans["adamw_fp32_master"]
    assert plan["memory_bytes"]["optimizer"] / GiB == pytest.approx(81.0, abs=0.01)
    assert not plan["fits"]
    assert any("train.optim=adamw_kahan" in a for a in plan["advice"])
    assert "does NOT fit" in render_plan(plan)
    assert mistral_plans["adamw_8bit_sr"]["memory_bytes"]["optimizer"] / GiB == pytest.approx(13.71, abs=0.01)


def test_no_checkpointing_advice_and_time_estimate() -> None:
    plan = planner.make_plan(
        MISTRAL_7B_V03, activation_checkpointing=False, dataset_tokens=10_000_000, epochs=3, gpu_name="NVIDIA H100 PCIe"
    )
    assert plan["memory_bytes"]["activations"] > 20 * GiB
    assert plan["gpu"]["peak_bf16_flops"] == pytest.approx(756.5e12)
    assert plan["seconds_estimate"] == pytest.approx(30_000_000 / plan["tokens_per_second_estimate"])
    assert not plan["fits"]  # ~26 GiB of activations at batch 2 x 2048 without recomputation
    assert plan["layers"]["kept"] == 32 and not plan["activation_checkpointing"]
    assert any("activation_checkpointing=true" in a for a in plan["advice"])
    assert any("GPU memory not given" in w for w in plan["warnings"])


def test_seed_recipe_warns_about_bf16_rounding() -> None:
    plan = planner.make_plan(MISTRAL_7B_V03, optimizer="adamw_torch_fused", gpu_memory_bytes=143_771 << 20)
    assert plan["fits"] and plan["memory_bytes"]["optimizer"] == 4 * 7_248_023_552 + 4 * 291
    assert any("adamw_kahan" in w for w in plan["warnings"])


def test_other_transformers_optimizer_is_estimated_with_a_warning() -> None:
    plan = planner.make_plan(TINY, optimizer="adafactor", per_device_batch_size=1, seq_length=32)
    assert plan["optimizer"] == "adafactor" and plan["memory_bytes"]["optimizer"] > 0
    assert any("no memory model" in w for w in plan["warnings"])


def test_config_from_file_and_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    by_file = planner.make_plan(tmp_path / "config.json", per_device_batch_size=1, seq_length=32)
    by_dir = planner.make_plan(str(tmp_path), per_device_batch_size=1, seq_length=32)
    assert by_file["parameters"] == by_dir["parameters"] > 0


def _tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _real_optimizer(name: str, model: torch.nn.Module, tmp_path: Path) -> torch.optim.Optimizer:
    if name in OUR_OPTIMIZERS:
        return build_optimizer(name, model, lr=1e-4, weight_decay=0.01)
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), optim=name, use_cpu=True, report_to=[])
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    return cls(model.parameters(), **kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", [*OUR_OPTIMIZERS, "adamw_torch", "adamw_torch_fused"])
def test_plan_bytes_equal_real_tensors_after_one_step(name: str, dtype: torch.dtype, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    config = planner.load_model_config(TINY)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    optimizer = _real_optimizer(name, model, tmp_path)
    ids = torch.randint(0, TINY["vocab_size"], (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()

    plan = planner.make_plan(TINY, dtype=dtype, optimizer=name, per_device_batch_size=2, seq_length=16)
    mem = plan["memory_bytes"]
    assert mem["weights"] == _tensor_bytes(model.parameters())
    assert mem["gradients"] == _tensor_bytes(p.grad for p in model.parameters())
    assert mem["optimizer"] == _tensor_bytes(v for s in optimizer.state.values() for v in s.values())


def test_activation_estimate_matches_saved_tensors() -> None:
    """Per-layer formula vs what autograd really saves (CPU, no recomputation, fp32, no mask: GQA k/v narrow)."""
    from transformers import AutoModelForCausalLM

    config = planner.load_model_config(TINY)
    model = AutoModelForCausalLM.from_config(config)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    batch, seq = 2, 64
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=torch.randint(0, TINY["vocab_size"], (batch, seq)))
    measured = sum(saved.values())
    shape = planner.model_shape(config)
    every = frozenset(range(shape.layers))
    estimate = planner.saved_activation_bytes(shape, batch * seq, 4, every, masked=False)
    assert measured <= estimate <= 1.03 * measured
    # A mask makes transformers repeat k/v for SDPA: the default (masked) estimate is the wider one.
    assert planner.saved_activation_bytes(shape, batch * seq, 4, every) > estimate
    assert planner.saved_activation_bytes(shape, batch * seq, 4, frozenset()) < estimate


def _kept_for(mode: str, layers: int) -> frozenset[int]:
    if mode == "full":
        return frozenset()
    if mode == "off":
        return frozenset(range(layers))
    kind, n = mode.split("_")
    return every_n_kept(int(n), layers) if kind == "every" else last_layers(int(n), layers)


MEASURED = sorted(Path(__file__).resolve().parents[1].joinpath("docs").glob("gpu_throughput-h200*.json"))


@pytest.mark.parametrize("path", MEASURED, ids=lambda p: p.name)
def test_planner_replays_the_measured_h200_peaks_within_2_percent(path: Path) -> None:
    """Every run docs/performance.md records (Mistral-7B shape, H200 capped at 97,887 MiB, TRL's chunked head):
    the planned allocator peak against `max_memory_allocated`. The benchmark's rows are full length without a
    mask (k/v narrow); the default estimate assumes a mask and may only be above the measured peak."""
    result = json.loads(path.read_text())
    shape = planner.model_shape(planner.load_model_config(result["model"]))
    runs = [r for r in result["runs"] if r["status"] == "ok" and r["loss_head"] == "trl_fused"]
    assert len(runs) >= 4
    for run in runs:
        kept = _kept_for(run["checkpointing"], shape.layers)
        measured = run["peak_allocated_gib"] * GiB
        args = (shape, torch.bfloat16, run["optimizer"], run["batch"], run["seq"], kept)
        exact = planner.memory_parts(*args, masked=False)["total"]
        default = planner.memory_parts(*args)["total"]
        where = f"{run['recipe']} {run['seq']} {run['checkpointing']}"
        assert abs(exact - measured) <= 0.01 * measured, (where, exact / GiB, measured / GiB)
        assert measured - 0.001 * measured <= default <= 1.02 * measured, (where, default / GiB, measured / GiB)


def test_kept_layers_cost_what_they_save_and_the_last_ones_are_kept() -> None:
    shape = planner.model_shape(planner.load_model_config(MISTRAL_7B_V03))
    budget = planner.checkpoint_budget_for(shape, torch.bfloat16, "adamw_kahan", 2, 4096, 97_887 << 20)
    assert len(budget.peaks) == 33 and list(budget.peaks) == sorted(budget.peaks)
    per_layer = budget.peaks[20] - budget.peaks[19]
    assert per_layer / GiB == pytest.approx(1.56, abs=0.01)  # one layer's activations at 2 x 4096, minus its input
    # Kept at the bottom, the top layer recomputes beside them at the peak: never cheaper than the last K.
    for k in (1, 8, 16, 31):
        assert budget.peak_bytes(frozenset(range(k))) >= budget.peak_bytes(last_layers(k, 32))
    assert budget.peak_bytes(frozenset(range(8))) > budget.peak_bytes(8)
    assert budget.most_kept() == 10
    assert budget.peaks[10] <= MEMORY_TARGET * (97_887 << 20) < budget.peaks[11]


def test_mistral_7b_on_the_96gb_card_keeps_layers_and_splits_the_batch() -> None:
    plans = {
        seq: planner.make_plan(MISTRAL_7B_V03, seq_length=seq, checkpointing_layers="auto", split_batch=True)
        for seq in (2048, 4096)
    }
    for plan in plans.values():
        split = plan["batch_split"]
        assert split["chosen_by"] == "planner" and len(split["candidates"]) == 5
        assert plan["per_device_batch_size"] * plan["gradient_accumulation_steps"] == 16
        fitting = [c for c in split["candidates"] if c["kept"] is not None]
        best = max(fitting, key=lambda c: c["expected_mfu"])
        assert (best["batch"], best["kept"]) == (plan["per_device_batch_size"], plan["layers"]["kept"])
        assert all(c["peak_bytes"] <= plan["memory_target_bytes"] for c in fitting)
        assert plan["memory_bytes"]["total"] <= plan["memory_target_bytes"] and plan["fits"]
        assert plan["layers"]["kept_layers"] == list(range(32 - plan["layers"]["kept"], 32))
        assert "keeps" in render_plan(plan) and "<- chosen" in render_plan(plan)
    # 1 x 16 fits 2048 with no recomputation; at 4096 it keeps more layers than 2 x 8 could.
    assert plans[2048]["batch_split"]["candidates"][0]["kept"] == 32
    assert (plans[4096]["per_device_batch_size"], plans[4096]["layers"]["kept"]) == (1, 23)
    kept_at_2x8 = planner.make_plan(MISTRAL_7B_V03, seq_length=4096, checkpointing_layers="auto")
    assert (kept_at_2x8["per_device_batch_size"], kept_at_2x8["layers"]["kept"]) == (2, 10)
    assert kept_at_2x8["batch_split"] is None


def test_layers_settings_in_the_plan() -> None:
    every_2 = planner.make_plan(MISTRAL_7B_V03, checkpointing_layers="every_2")
    assert every_2["layers"]["kept"] == 16 and every_2["layers"]["kept_layers"][:2] == [1, 3]
    keep = planner.make_plan(MISTRAL_7B_V03, checkpointing_layers="keep_5")
    assert keep["layers"]["kept_layers"] == [27, 28, 29, 30, 31]
    with pytest.raises(ConfigError, match=r"keep_33 .*\(32\)"):
        planner.make_plan(MISTRAL_7B_V03, checkpointing_layers="keep_33")
    with pytest.raises(ConfigError, match="auto, all, every_N or keep_N"):
        planner.make_plan(MISTRAL_7B_V03, checkpointing_layers="half")


def test_plan_shows_the_checkpoint_and_its_host_ram_staging() -> None:
    from job.durability.staging import plan_staging

    plan = planner.make_plan(MISTRAL_7B_V03, host_memory_bytes=32 * GiB)
    ckpt = plan["checkpoint"]
    state = plan["memory_bytes"]["weights"] + plan["memory_bytes"]["optimizer"]
    assert ckpt["state_bytes"] == state and state / 1e9 == pytest.approx(57.98, abs=0.01)  # the 57.98 GB
    assert (ckpt["host_limit_bytes"], ckpt["host_limit_source"]) == (32 * GiB, "given")
    assert ckpt["staging"] == dataclasses.asdict(plan_staging(state, 32 * GiB, "cuda"))
    text = render_plan(plan)
    assert "checkpoint 57.98 GB" in text and f"staging {ckpt['staging']['mode']}" in text
    detected = planner.make_plan(TINY, per_device_batch_size=1, seq_length=32)["checkpoint"]
    assert detected["host_limit_source"] in ("detected", "unknown")


def test_plan_job_splits_only_when_the_user_set_neither(tmp_path: Path) -> None:
    from job.config.load import load_config

    (tmp_path / "config.json").write_text(json.dumps(MISTRAL_7B_V03))
    base = [f"model.source={tmp_path}", "data.train=x.jsonl", "data.max_length=4096"]
    free = planner.plan_job(load_config(None, base, environ={}), host_memory_bytes=64 * GiB)
    assert free["batch_split"]["chosen_by"] == "planner" and free["per_device_batch_size"] == 1
    for given in ("train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=8"):
        kept = planner.plan_job(load_config(None, [*base, given], environ={}), host_memory_bytes=64 * GiB)
        assert kept["batch_split"] is None and kept["per_device_batch_size"] == 2 and kept["layers"]["kept"] == 10


def test_plan_command_prints_layers_split_and_staging(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from job.cli import cli

    (tmp_path / "config.json").write_text(json.dumps(MISTRAL_7B_V03))
    args = ["plan", "--set", f"model.source={tmp_path}", "--set", "data.train=x.jsonl", "--host-memory-gib", "80"]
    text = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert text.exit_code == 0, text.output
    assert "23 of 32 keep their activations" in text.output and "<- chosen" in text.output
    assert "host RAM 80.0 GiB (given)" in text.output
    as_json = json.loads(CliRunner().invoke(cli, [*args, "--json"], catch_exceptions=False).output)
    assert as_json["layers"]["kept"] == 23 and as_json["checkpoint"]["host_limit_bytes"] == 80 * GiB


def test_fsdp_divides_the_states_among_ranks_and_ddp_replicates_them() -> None:
    one = planner.make_plan(MISTRAL_7B_V03, dtype="float32", optimizer="adamw_torch_fused")
    ddp = planner.make_plan(MISTRAL_7B_V03, dtype="float32", optimizer="adamw_torch_fused", world_size=8)
    fsdp = planner.make_plan(MISTRAL_7B_V03, dtype="float32", optimizer="adamw_torch_fused", world_size=8, sharded=True)
    m1, m8 = one["memory_bytes"], fsdp["memory_bytes"]
    assert ddp["memory_bytes"] == m1 and not one["fits"]  # float32 AdamW: ~112 GB, on every rank under DDP
    assert m8["optimizer"] == m1["optimizer"] // 8 and m8["gradients"] == m1["gradients"] // 8
    gathered = 2 * 2 * fsdp["parameters"] // 32  # two decoder layers' weights in bf16
    assert m8["weights"] == m1["weights"] // 8 + gathered
    assert fsdp["fits"] and m8["total"] < 24 * GiB
    assert fsdp["tokens_per_second_estimate"] == pytest.approx(8 * one["tokens_per_second_estimate"])
    assert fsdp["mfu_estimate"] == pytest.approx(one["mfu_estimate"])


def test_loss_head_tiles_are_the_installed_trls() -> None:
    """Pins the private TRL constant the planner reads (docs/design.md): the fused LM head's vocabulary tile.
    If TRL renames it, the planner would fall back to 1.16's values without a word; this fails instead."""
    from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    assert (planner.HEAD_TOKEN_TILE, planner.HEAD_VOCAB_TILE) == (TOKEN_CHUNK_SIZE, _CHUNKED_LOGPROB_CHUNK_SIZE)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"num_hidden_layers": 10**7}, "num_hidden_layers=10000000"),  # would build 10^7 meta layers for hours
        ({"hidden_size": -5}, "hidden_size=-5"),
        ({"vocab_size": 2.5}, "vocab_size"),
        ({"num_attention_heads": True}, "num_attention_heads"),
        ({"model_type": None}, "model_type"),
        (None, "not valid JSON"),
    ],
)
def test_a_hostile_or_broken_config_json_is_a_config_error_at_once(
    tmp_path: Path, tiny_model_dir: Path, change: dict | None, needle: str
) -> None:
    import time

    from job.config.load import load_config
    from job.errors import ConfigError

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    if change is None:
        (model_dir / "config.json").write_text(json.dumps(config)[:-20])
    else:
        (model_dir / "config.json").write_text(json.dumps({**config, **change}))
    job_config = load_config(None, [f"model.source={model_dir}", "data.train=x.jsonl"], environ={})
    started = time.monotonic()
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        planner.plan_job(job_config)
    assert time.monotonic() - started < 30
