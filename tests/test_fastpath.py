"""Fast-path selection for faked devices and packages (the inputs of the pure decision, not torch itself)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from job.config.load import build_config, load_config
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


def test_compile_regional_by_default_on_a_gpu_and_only_on_request_on_cpu() -> None:
    auto = choose(H100)
    assert auto.compile is True and "each decoder layer" in auto.reasons["compile"]
    assert choose(H100, compile=False).compile is False
    on_cpu = choose(CPU)
    assert on_cpu.compile is False and "no CUDA device" in on_cpu.reasons["compile"]
    assert choose(CPU, compile=True).compile is True  # compiles on CPU too (tests)
    assert "torch_compile" not in choose(H100).sft_kwargs()  # not Trainer's whole-model compile


def test_liger_kernels_only_with_compile_off_on_a_gpu_with_the_package() -> None:
    liger = {"liger-kernel": "0.6.2"}
    fast = choose(H100, liger, compile=False, liger_kernels=True)
    assert fast.liger_kernels and "0.6.2" in fast.reasons["liger_kernels"]
    assert "use_liger_kernel" not in fast.sft_kwargs()  # applied to the loaded model, not by Trainer
    with pytest.raises(ConfigError, match=r"liger kernels only with model\.compile false"):
        choose(H100, liger, liger_kernels=True)  # compile auto is on with CUDA
    with pytest.raises(ConfigError, match=r"liger kernels only with model\.compile false"):
        choose(H100, liger, compile=True, liger_kernels=True)
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        choose(CPU, liger, compile=False, liger_kernels=True)
    with pytest.raises(ConfigError, match="liger-kernel package"):
        choose(H100, compile=False, liger_kernels=True)
    assert choose(H100).liger_kernels is False


# ---------------------------------------------------------------- layers kept, batch split


def budget(full_gib: float, none_gib: float, layers: int = 32, gpu: int = CARD, batch: int = 2) -> CheckpointBudget:
    """Peaks rising evenly from every layer recomputed to none."""
    step = (none_gib - full_gib) / layers
    peaks = tuple(int((full_gib + k * step) * GiB) for k in range(layers + 1))
    return CheckpointBudget(layers=layers, gpu_bytes=gpu, peaks=peaks, batch=batch)


def test_budget_peaks_per_kept_count_and_set() -> None:
    b = budget(60, 92)
    assert b.full_bytes == b.peak_bytes(0) == b.peaks[0] and b.none_bytes == b.peak_bytes(32)
    assert b.peak_bytes(frozenset({30, 31})) == b.peaks[2]
    limit = fastpath.MEMORY_TARGET * CARD
    k = b.most_kept()
    assert k is not None and b.peaks[k] <= limit < b.peaks[k + 1]
    assert budget(95, 150).most_kept() is None


def test_auto_turns_checkpointing_off_when_everything_fits() -> None:
    fast = choose(RTX_PRO_6000, budget=budget(60, 80))
    assert fast.activation_checkpointing is False and fast.layers_kept == 32
    assert fast.checkpointing_mode == "off" and fast.reasons["activation_checkpointing"].startswith("off: planned")
    assert fast.sft_kwargs()["activation_checkpointing"] is False


def test_auto_keeps_the_most_layers_that_fit_the_last_ones() -> None:
    b = budget(60, 100)
    fast = choose(RTX_PRO_6000, budget=b)
    k = b.most_kept()
    assert k is not None and 0 < k < 32
    assert fast.activation_checkpointing and fast.kept_layers == frozenset(range(32 - k, 32))
    assert fast.checkpointing_mode == f"keep_{k}" and fast.planned_peak_bytes == b.peaks[k]
    assert f"the last {k} of 32" in fast.reasons["activation_checkpointing"]
    # Not an every_n pattern: Trainer enables every layer, the callback sets the exact ones.
    assert fast.sft_kwargs()["activation_checkpointing_kwargs"] is None
    assert fastpath.recomputed_fraction(fast, 32) == (32 - k) / 32
    assert fast.log_fields()["layers_kept"] == f"{k}/32"


def test_auto_falls_back_to_every_layer() -> None:
    too_big = choose(RTX_PRO_6000, budget=budget(95, 150))
    assert too_big.checkpointing_mode == "full" and "does NOT fit" in too_big.reasons["activation_checkpointing"]
    assert too_big.sft_kwargs()["activation_checkpointing_kwargs"] is None
    unknown = choose(RTX_PRO_6000, budget_note="model config unknown to the planner")
    assert unknown.checkpointing_mode == "full" and "unknown" in unknown.reasons["activation_checkpointing"]
    assert choose(CPU).checkpointing_mode == "full"  # the seed's behaviour where there is no GPU to plan for


@pytest.mark.parametrize(
    ("settings", "mode", "kept"),
    [
        ({"activation_checkpointing": False}, "off", set(range(8))),
        ({"checkpointing_layers": "all"}, "full", set()),
        ({"checkpointing_layers": "every_4"}, "keep_6", {1, 2, 3, 5, 6, 7}),
        ({"checkpointing_layers": "Every_1"}, "full", set()),
        ({"checkpointing_layers": "keep_3"}, "keep_3", {5, 6, 7}),
        ({"checkpointing_layers": "keep_0"}, "full", set()),
        ({"checkpointing_layers": "keep_8"}, "off", set(range(8))),
        ({"activation_checkpointing": False, "checkpointing_layers": "every_4"}, "off", set(range(8))),
    ],
)
def test_explicit_checkpointing_settings_win_over_the_planner(settings: dict[str, Any], mode: str, kept: set) -> None:
    fast = choose(RTX_PRO_6000, budget=budget(60, 80, layers=8), layers=8, **settings)
    assert fast.checkpointing_mode == mode and fast.kept_layers == kept


def test_every_n_is_transformers_set_and_passed_to_trainer() -> None:
    fast = choose(H100, checkpointing_layers="every_2", layers=6)
    assert fast.kept_layers == {1, 3, 5}  # layers 0, 2, 4 recompute: index % 2 == 0, as transformers counts
    assert fast.sft_kwargs()["activation_checkpointing_kwargs"] == {"every_n_layers": 2}


@pytest.mark.parametrize("layers", ["every_0", "half", "every_x", "keep_-1"])
def test_bad_checkpointing_layers_are_config_errors(layers: str) -> None:
    with pytest.raises(ConfigError, match="activation_checkpointing_layers"):
        choose(H100, checkpointing_layers=layers)


def test_keep_n_is_checked_against_the_layer_count() -> None:
    with pytest.raises(ConfigError, match=r"keep_33 asks for more layers than the model has \(32\)"):
        choose(H100, checkpointing_layers="keep_33", layers=32)
    with pytest.raises(ConfigError, match="needs the model's layer count"):
        choose(H100, checkpointing_layers="keep_3")  # nothing says how many layers there are


def mistral_budgets(seq: int, batches: tuple[int, ...] = (1, 2, 4, 8, 16)) -> dict[int, CheckpointBudget]:
    from job.plan.budget import checkpoint_budgets
    from job.plan.memory import MISTRAL_7B_V03

    return checkpoint_budgets(
        MISTRAL_7B_V03, dtype="bfloat16", optimizer="adamw_kahan", batches=batches, seq=seq, gpu_memory_bytes=CARD
    )


def test_batch_split_when_the_user_set_neither() -> None:
    budgets = mistral_budgets(4096)
    fast = choose(RTX_PRO_6000, seq_length=4096, split_batch=True, split_budgets=budgets, budget=budgets[2])
    assert (fast.batch_size, fast.grad_accum, fast.layers_kept) == (1, 16, 23)
    assert fast.sft_kwargs()["per_device_train_batch_size"] == 1
    assert fast.sft_kwargs()["gradient_accumulation_steps"] == 16
    reason = fast.reasons["batch_split"]
    assert all(f"{b}x{16 // b}" in reason for b in (1, 2, 4, 8, 16)) and "does not fit" in reason
    fields = fast.log_fields()
    assert (fields["batch"], fields["grad_accum"]) == (1, 16)
    # The user's settings win: 2 x 8 kept, only the layers chosen.
    given = choose(RTX_PRO_6000, seq_length=4096, budget=budgets[2])
    assert (given.batch_size, given.grad_accum, given.layers_kept) == (2, 8, 10)
    assert "as configured" in given.reasons["batch_split"]
    # A fixed layers setting is kept through the split: only micro-batches where it fits compete.
    fixed = choose(
        RTX_PRO_6000,
        checkpointing_layers="all",
        seq_length=4096,
        split_batch=True,
        split_budgets=budgets,
        budget=budgets[2],
    )
    assert fixed.checkpointing_mode == "full" and fixed.batch_size * fixed.grad_accum == 16


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
    assert b.layers == 4 and b.gpu_bytes == H100.memory_bytes and len(b.peaks) == 5
    assert 0 < b.full_bytes < b.none_bytes
    assert fastpath.checkpoint_budget(tiny, CPU, dtype="bfloat16", optimizer="adamw_kahan", batch=2, seq=8) == (
        None,
        "no GPU to plan for",
    )

    def refusing_planner(*args: Any, **kwargs: Any) -> dict[int, CheckpointBudget]:
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
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 8,
        "activation_checkpointing": True,
        "activation_checkpointing_kwargs": None,
        "tf32": None,
    }
    assert [event for event, _ in lines] == ["fast_path"]
    fields = lines[0][1]
    assert fields["attention"] == "sdpa" and fields["activation_checkpointing"] == "full"
    assert set(fields["reasons"]) == {
        "attention",
        "tf32",
        "padding_free",
        "activation_checkpointing",
        "batch_split",
        "compile",
        "liger_kernels",
    }


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
    assert fast.tf32 is True and fast.layers == 2
    # Everything fits any split: the largest micro-batch runs fastest; set values are kept.
    assert (fast.batch_size, fast.grad_accum) == (16, 1)
    settings = [f"model.source={tiny_model_dir}", "data.train=x.jsonl", "train.gradient_accumulation_steps=8"]
    kept = fastpath.choose_fast_path(load_config(None, settings, environ={}), RTX_PRO_6000)
    assert (kept.batch_size, kept.grad_accum) == (2, 8)
    unknown = fastpath.choose_fast_path(replace(config, model=model), RTX_PRO_6000, model_location="/nonexistent")
    assert unknown.checkpointing_mode == "full" and unknown.planned_peak_bytes is None  # nothing to plan with


def _count_layer_forwards(model: Any) -> list[int]:
    """Forward runs per decoder layer, recomputation included: the hook sits on each layer's MLP, which the
    layer's own forward calls (checkpointing replays `forward`, bypassing the layer's own hooks)."""
    counts = [0] * len(model.model.layers)
    for index, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_pre_hook(lambda module, args, i=index: counts.__setitem__(i, counts[i] + 1))
    return counts


def _tiny_model(layers: int = 4) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return AutoModelForCausalLM.from_config(config)


def test_apply_activation_checkpointing_recomputes_exactly_the_chosen_layers() -> None:
    import torch

    model = _tiny_model()
    counts = _count_layer_forwards(model)
    ids = torch.randint(0, 64, (2, 8))

    def step(fast: fastpath.FastPath) -> list[int]:
        fastpath.apply_activation_checkpointing(model, fast)
        model.train()
        counts[:] = [0] * 4
        model(input_ids=ids, labels=ids).loss.backward()
        return list(counts)

    keep_1 = choose(H100, checkpointing_layers="keep_1", layers=4)
    assert step(keep_1) == [2, 2, 2, 1]  # the last layer keeps its activations, three recompute
    assert fastpath.recomputed_fraction(keep_1, 4) == 0.75
    assert step(choose(H100, checkpointing_layers="every_2", layers=4)) == [2, 1, 2, 1]
    assert step(choose(H100, checkpointing_layers="all")) == [2, 2, 2, 2]
    off = choose(H100, activation_checkpointing=False)
    assert step(off) == [1, 1, 1, 1] and fastpath.recomputed_fraction(off, 4) == 0.0


@pytest.mark.parametrize(
    ("setting", "callback", "expected"),
    [
        ("keep_2", True, [2, 2, 1, 1]),
        ("keep_2", False, [2, 2, 2, 2]),  # without the callback Trainer recomputes every layer: slower, never larger
        ("keep_3", False, [2, 1, 1, 1]),  # {1, 2, 3} is every_n_layers=4: Trainer alone is exact
        ("every_2", False, [2, 1, 2, 1]),
    ],
)
def test_the_trainer_recomputes_exactly_the_chosen_layers(
    tmp_path: Any, setting: str, callback: bool, expected: list[int]
) -> None:
    """A real Trainer step with the SFTConfig fields of `sft_kwargs` and the callback: forward runs per layer."""
    import torch
    from transformers import Trainer, TrainingArguments

    model = _tiny_model()
    counts = _count_layer_forwards(model)
    fast = choose(CPU, checkpointing_layers=setting, layers=4, batch_size=1, grad_accum=2)
    kwargs = {k: v for k, v in fast.sft_kwargs().items() if v is not None}
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, use_cpu=True, report_to=[], save_strategy="no", **kwargs
    )
    ids = torch.randint(0, 64, (8,))
    data = [{"input_ids": ids, "labels": ids} for _ in range(2)]
    callbacks = [fastpath.checkpointing_callback(fast)] if callback else []
    Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks).train()
    assert counts == [2 * n for n in expected]  # two micro-batches (1 x 2 accumulation)


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
