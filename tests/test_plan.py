"""The planner: exact parameter count, exact weight/gradient/optimizer bytes, activation estimate, advice."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from job.optim.adamw import OUR_OPTIMIZERS, build_optimizer
from job.plan import memory as planner
from job.plan.memory import MISTRAL_7B_V03

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
    assert 2 * GiB < mem["activations"] + mem["loss_head"] < 6 * GiB
    assert plan["tokens_per_second_estimate"] > 1000 and plan["seconds_estimate"] is None
    assert 0.25 < plan["mfu_estimate"] < 0.35  # 40% hardware utilisation with recomputation
    table = planner.render_plan(plan)
    assert "optimizer states" in table and "40.50" in table and "fits" in table


def test_fp32_master_does_not_fit_and_advice_names_the_default(mistral_plans: dict[str, Any]) -> None:
    plan = mistral_plans["adamw_fp32_master"]
    assert plan["memory_bytes"]["optimizer"] / GiB == pytest.approx(81.0, abs=0.01)
    assert not plan["fits"]
    assert any("train.optim=adamw_kahan" in a for a in plan["advice"])
    assert "does NOT fit" in planner.render_plan(plan)
    assert mistral_plans["adamw_8bit_sr"]["memory_bytes"]["optimizer"] / GiB == pytest.approx(13.71, abs=0.01)


def test_no_checkpointing_advice_and_time_estimate() -> None:
    plan = planner.make_plan(
        MISTRAL_7B_V03, activation_checkpointing=False, dataset_tokens=10_000_000, epochs=3, gpu_name="NVIDIA H100 PCIe"
    )
    assert plan["memory_bytes"]["activations"] > 20 * GiB
    assert plan["gpu"]["peak_bf16_flops"] == pytest.approx(756.5e12)
    assert plan["seconds_estimate"] == pytest.approx(30_000_000 / plan["tokens_per_second_estimate"])
    assert not plan["fits"]  # ~26.5 GiB of activations at batch 2 x 2048 without recomputation
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
    """Per-layer formula vs what autograd really saves (CPU, no recomputation, fp32, no mask)."""
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
    working_set = batch * seq * 4 * (3 * shape.intermediate + 2 * shape.hidden)
    estimate = planner.activation_bytes(shape, batch * seq, 4, checkpointing=False) - working_set
    # The estimate keeps k/v at full width (a mask makes transformers repeat them); here GQA keeps them narrow.
    assert measured <= estimate <= 1.15 * measured
    kept = planner.activation_bytes(shape, batch * seq, 4, checkpointing=True)
    assert kept < planner.activation_bytes(shape, batch * seq, 4, checkpointing=False)


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
