"""Fast-path selection for faked devices and packages (the inputs of the pure decision, not torch itself)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from job.config.load import build_config
from job.config.schema import JobConfig
from job.errors import ConfigError
from job.train import fastpath
from job.train.fastpath import CheckpointBudget, DeviceInfo, FastPathInputs, decide

GiB = 1 << 30
CARD = 97_887 << 20  # the 96 GB card as it reports itself

A100 = DeviceInfo("cuda", "NVIDIA A100-SXM4-80GB", (8, 0), 80 * GiB)
A6000 = DeviceInfo("cuda", "NVIDIA RTX A6000", (8, 6), 48 * GiB)
H100 = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0), 80 * GiB)
B200 = DeviceInfo("cuda", "NVIDIA B200", (10, 0), 180 * GiB)
RTX_PRO_6000 = DeviceInfo("cuda", "NVIDIA RTX PRO 6000 Blackwell Server Edition", (12, 0), CARD)
T4 = DeviceInfo("cuda", "Tesla T4", (7, 5), 16 * GiB)
CPU = DeviceInfo("cpu")
FA2 = {"flash-attn": "2.8.3"}


def choose(device: DeviceInfo, packages: dict[str, str] | None = None, **settings: Any) -> fastpath.FastPath:
    return decide(FastPathInputs(device=device, packages=packages or {}, **settings))


# ---------------------------------------------------------------- attention


@pytest.mark.parametrize(
    ("device", "packages", "expected", "reason_part"),
    [
        (A100, FA2, "flash_attention_2", "supports sm_80"),
        (A6000, FA2, "flash_attention_2", "supports sm_86"),
        (H100, FA2, "flash_attention_2", "supports sm_90"),
        (H100, {**FA2, "flash-attn-3": "3.0.0b1"}, "flash_attention_3", "Hopper"),
        (A100, {"flash-attn-3": "3.0.0b1"}, "sdpa", "not installed"),  # FA3 is Hopper-only
        (RTX_PRO_6000, FA2, "sdpa", "not verified on sm_120"),
        (B200, FA2, "sdpa", "not verified on sm_100"),
        (RTX_PRO_6000, {}, "sdpa", "not installed"),
        (A100, {}, "sdpa", "not installed"),
        (A100, {"flash-attn": "2.3.2"}, "sdpa", "older than 2.3.3"),
        (T4, FA2, "sdpa", "not verified on sm_75"),
        (CPU, FA2, "sdpa", "no CUDA device"),
    ],
)
def test_attention_per_capability_and_packages(
    device: DeviceInfo, packages: dict[str, str], expected: str, reason_part: str
) -> None:
    fast = choose(device, packages)
    assert fast.attn_implementation == expected
    assert reason_part in fast.reasons["attention"]


@pytest.mark.parametrize("hub_kernel", ["kernels-community/flash-attn2", "kernels-community/vllm-flash-attn3"])
def test_hub_kernels_are_refused(hub_kernel: str) -> None:
    with pytest.raises(ConfigError, match=r"Hub kernel.*downloads it at run time"):
        choose(H100, FA2, attn_implementation=hub_kernel)


def test_forced_flash_attention_needs_the_package_not_the_hub_fallback() -> None:
    # Without flash-attn, transformers would fetch kernels-community/flash-attn2 when `kernels` is installed.
    with pytest.raises(ConfigError, match="needs the flash-attn package"):
        choose(H100, {"kernels": "0.9.0"}, attn_implementation="flash_attention_2")
    with pytest.raises(ConfigError, match="needs the flash-attn-3 package"):
        choose(H100, FA2, attn_implementation="flash_attention_3")
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        choose(CPU, FA2, attn_implementation="flash_attention_2")


def test_forced_flash_attention_on_unverified_card_is_kept_and_says_so() -> None:
    fast = choose(RTX_PRO_6000, FA2, attn_implementation="flash_attention_2")
    assert fast.attn_implementation == "flash_attention_2"
    assert "not verified" in fast.reasons["attention"]
    assert choose(H100, FA2, attn_implementation="flash_attention_2").reasons["attention"] == (
        "set by model.attn_implementation"
    )


def test_user_attention_passes_through_and_unknown_names_fail() -> None:
    assert choose(H100, FA2, attn_implementation="eager").attn_implementation == "eager"
    assert choose(CPU, attn_implementation="sdpa").attn_implementation == "sdpa"
    with pytest.raises(ConfigError, match="not one of"):
        choose(H100, attn_implementation="flash_attention_9")


# ---------------------------------------------------------------- TF32, padding-free, compile


@pytest.mark.parametrize(
    ("device", "expected"), [(A100, True), (H100, True), (RTX_PRO_6000, True), (T4, False), (CPU, False)]
)
def test_tf32_on_ampere_and_newer(device: DeviceInfo, expected: bool) -> None:
    assert choose(device).tf32 is expected


def test_tf32_settings() -> None:
    off = choose(H100, tf32=False)
    assert off.tf32 is False and "off by model.tf32" in off.reasons["tf32"]
    with pytest.raises(ConfigError, match="needs an Ampere or newer GPU"):
        choose(T4, tf32=True)
    assert choose(CPU).sft_kwargs()["tf32"] is None  # Trainer refuses tf32 without a GPU
    assert choose(H100, tf32=False).sft_kwargs()["tf32"] is False


def test_padding_free_follows_packing_and_the_kernel() -> None:
    assert choose(H100, FA2).padding_free is False
    varlen = choose(H100, FA2, packing=True)
    assert varlen.padding_free and "varlen" in varlen.reasons["padding_free"]
    masked = choose(RTX_PRO_6000, packing=True)
    assert masked.padding_free and "block-diagonal mask" in masked.reasons["padding_free"]


def test_compile_only_on_request_and_on_a_gpu() -> None:
    assert choose(H100).compile is False
    assert choose(H100, compile=True).compile is True
    on_cpu = choose(CPU, compile=True)
    assert on_cpu.compile is False and "no CUDA device" in on_cpu.reasons["compile"]
    assert choose(H100, compile=True).sft_kwargs()["torch_compile"] is True


# ---------------------------------------------------------------- activation checkpointing


def budget(full_gib: float, none_gib: float, layers: int = 32, gpu: int = CARD) -> CheckpointBudget:
    return CheckpointBudget(
        layers=layers, gpu_bytes=gpu, full_bytes=int(full_gib * GiB), none_bytes=int(none_gib * GiB)
    )


def test_budget_interpolates_between_the_planner_ends() -> None:
    b = budget(60, 100)
    assert b.peak_bytes(1) == b.full_bytes
    assert b.peak_bytes(0) == b.none_bytes
    assert b.peak_bytes(32) == pytest.approx(b.none_bytes, rel=1e-9)  # one recomputed layer: L-1 kept
    assert b.peak_bytes(1) < b.peak_bytes(2) < b.peak_bytes(4) < b.peak_bytes(32)


def test_auto_turns_checkpointing_off_when_everything_fits() -> None:
    fast = choose(RTX_PRO_6000, budget=budget(60, 80))
    assert fast.activation_checkpointing is False
    assert fast.checkpointing_mode == "off" and fast.reasons["activation_checkpointing"].startswith("off: planned")
    assert fast.sft_kwargs()["activation_checkpointing"] is False


def test_auto_recomputes_as_few_layers_as_fit() -> None:
    b = budget(60, 100)
    fast = choose(RTX_PRO_6000, budget=b)
    limit = fastpath.MEMORY_TARGET * CARD
    n = fast.checkpoint_every_n_layers
    assert fast.activation_checkpointing and n > 1
    assert b.peak_bytes(n) <= limit < b.peak_bytes(n + 1)  # the largest n (fewest recomputed layers) that fits
    assert fast.planned_peak_bytes == b.peak_bytes(n)
    assert fast.sft_kwargs()["activation_checkpointing_kwargs"] == {"every_n_layers": n}


def test_auto_falls_back_to_every_layer() -> None:
    too_big = choose(RTX_PRO_6000, budget=budget(95, 150))
    assert too_big.checkpointing_mode == "full" and "does NOT fit" in too_big.reasons["activation_checkpointing"]
    assert too_big.sft_kwargs()["activation_checkpointing_kwargs"] is None
    unknown = choose(RTX_PRO_6000, budget_note="model config unknown to the planner")
    assert unknown.checkpointing_mode == "full" and "unknown" in unknown.reasons["activation_checkpointing"]
    assert choose(CPU).checkpointing_mode == "full"  # the seed's behaviour where there is no GPU to plan for


@pytest.mark.parametrize(
    ("settings", "mode"),
    [
        ({"activation_checkpointing": False}, "off"),
        ({"checkpointing_layers": "all"}, "full"),
        ({"checkpointing_layers": "every_4"}, "every_4"),
        ({"checkpointing_layers": "Every_1"}, "full"),
        ({"activation_checkpointing": False, "checkpointing_layers": "every_4"}, "off"),
    ],
)
def test_explicit_checkpointing_settings_win_over_the_planner(settings: dict[str, Any], mode: str) -> None:
    assert choose(RTX_PRO_6000, budget=budget(60, 80), **settings).checkpointing_mode == mode


@pytest.mark.parametrize("layers", ["every_0", "half", "every_x"])
def test_bad_checkpointing_layers_are_config_errors(layers: str) -> None:
    with pytest.raises(ConfigError, match="activation_checkpointing_layers"):
        choose(H100, checkpointing_layers=layers)


def test_checkpoint_budget_from_the_real_planner() -> None:
    tiny = {
        "model_type": "mistral",
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    b, note = fastpath.checkpoint_budget(tiny, H100, dtype="bfloat16", optimizer="adamw_kahan", batch=2, seq=512)
    assert b is not None and note == ""
    assert b.layers == 4 and b.gpu_bytes == H100.memory_bytes
    assert 0 < b.full_bytes < b.none_bytes
    assert fastpath.checkpoint_budget(tiny, CPU, dtype="bfloat16", optimizer="adamw_kahan", batch=2, seq=8) == (
        None,
        "no GPU to plan for",
    )

    def refusing_planner(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise ValueError("no memory model for optimizer 'sgd'")

    failed, why = fastpath.checkpoint_budget(
        tiny, H100, dtype="bfloat16", optimizer="sgd", batch=2, seq=8, planner=refusing_planner
    )
    assert failed is None and "planner could not size this run (no memory model" in why


# ---------------------------------------------------------------- refusals, gathering, logging


def test_downloaded_or_refused_kernels_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="downloads kernels from the Hugging Face Hub"):
        fastpath.refuse_downloaded_kernels({"use_kernels": True}, {})
    with pytest.raises(ConfigError, match=r"refused by TRL 1\.16"):
        fastpath.refuse_downloaded_kernels({"liger_kernel_config": {"fused_linear_cross_entropy": True}}, {})
    with pytest.raises(ConfigError, match="liger-kernel package"):
        fastpath.refuse_downloaded_kernels({"use_liger_kernel": True}, {})
    fastpath.refuse_downloaded_kernels(
        {"use_liger_kernel": True, "liger_kernel_config": {"fused_linear_cross_entropy": False}},
        {"liger-kernel": "0.6.0"},
    )
    fastpath.refuse_downloaded_kernels({"logging_steps": 1}, {})


def test_installed_packages_reads_metadata() -> None:
    found = fastpath.installed_packages(("torch", "surely-not-installed-xyz"))
    assert set(found) == {"torch"} and found["torch"][0].isdigit()


def job_config(**train: Any) -> JobConfig:
    return build_config({"data": {"train": "x.jsonl"}, "model": {"source": "builtin:tiny-mistral"}, "train": train})


def test_choose_fast_path_for_a_cpu_job_keeps_the_seed_behaviour(monkeypatch: pytest.MonkeyPatch) -> None:
    lines: list[tuple[str, dict[str, Any]]] = []

    class Recorder:
        def info(self, event: str, **fields: Any) -> None:
            lines.append((event, fields))

    import job.logs

    monkeypatch.setattr(job.logs, "get_logger", lambda name: Recorder())
    config = job_config()
    fast = fastpath.choose_fast_path(config, fastpath.detect_device("cpu"))
    assert (fast.attn_implementation, fast.tf32, fast.compile) == ("sdpa", False, False)
    assert fast.sft_kwargs() == {
        "activation_checkpointing": True,
        "activation_checkpointing_kwargs": None,
        "tf32": None,
        "torch_compile": False,
    }
    assert [event for event, _ in lines] == ["fast_path"]
    fields = lines[0][1]
    assert fields["attention"] == "sdpa" and fields["activation_checkpointing"] == "full"
    assert set(fields["reasons"]) == {"attention", "tf32", "padding_free", "activation_checkpointing", "compile"}


def test_choose_fast_path_refuses_liger_fused_cross_entropy() -> None:
    config = job_config(use_liger_kernel=True, liger_kernel_config={"fused_linear_cross_entropy": True})
    with pytest.raises(ConfigError, match=r"refused by TRL 1\.16"):
        fastpath.choose_fast_path(config, fastpath.detect_device("cpu"))


def test_choose_fast_path_plans_checkpointing_with_the_loaded_model(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Any
) -> None:
    # A faked 96 GB card: the planner, fed the directory the source resolved to, turns recomputation off for
    # the tiny model (the Hub id in model.source is never contacted).
    monkeypatch.setattr(fastpath, "log_decision", lambda fast: None)
    config = job_config()
    model = replace(config.model, source="some/hub-model")
    fast = fastpath.choose_fast_path(replace(config, model=model), RTX_PRO_6000, model_location=str(tiny_model_dir))
    assert fast.attn_implementation == "sdpa"
    assert fast.checkpointing_mode == "off" and fast.planned_peak_bytes is not None
    assert fast.tf32 is True
    unknown = fastpath.choose_fast_path(replace(config, model=model), RTX_PRO_6000, model_location="/nonexistent")
    assert unknown.checkpointing_mode == "full" and unknown.planned_peak_bytes is None  # nothing to plan with


def test_apply_activation_checkpointing_sets_layer_flags() -> None:
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig

    config = MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = model.model.layers

    every_2 = choose(H100, checkpointing_layers="every_2")
    fastpath.apply_activation_checkpointing(model, every_2)
    assert [layer.gradient_checkpointing for layer in layers] == [True, False, True, False]
    assert fastpath.recomputed_fraction(every_2, 4) == 0.5
    fastpath.apply_activation_checkpointing(model, choose(H100, checkpointing_layers="all"))
    assert all(layer.gradient_checkpointing for layer in layers)
    off = choose(H100, activation_checkpointing=False)
    fastpath.apply_activation_checkpointing(model, off)
    assert not any(layer.gradient_checkpointing for layer in layers)
    assert fastpath.recomputed_fraction(off, 4) == 0.0


def test_build_sft_config_takes_the_fast_path(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from job.train.trainer import build_sft_config

    monkeypatch.setattr(fastpath, "log_decision", lambda fast: None)
    selective = build_sft_config(job_config(activation_checkpointing_layers="every_2"), tmp_path, "cpu", has_eval=False)
    assert selective.activation_checkpointing is True
    assert selective.activation_checkpointing_kwargs == {"every_n_layers": 2}
    assert selective.tf32 is None and selective.torch_compile is False
    off = build_sft_config(job_config(activation_checkpointing=False), tmp_path, "cpu", has_eval=False)
    assert off.activation_checkpointing is False and off.activation_checkpointing_kwargs is None
    with pytest.raises(ConfigError, match="activation_checkpointing_layers"):
        build_sft_config(job_config(activation_checkpointing_layers="some"), tmp_path, "cpu", has_eval=False)
