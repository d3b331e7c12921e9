"""Memory and time plan for a full-parameter SFT run on one GPU, from the model's config.json alone.

`make_plan` counts parameters on the meta device (no weights), estimates each part of the allocator's peak
(weights, gradients, optimizer states, saved activations, backward working set), chooses the layers that keep
their activations and the batch split as the fast path will (`job.plan.speed`), and adds the time and the
checkpoint's host-RAM staging; `plan_job` asks it for a job config, and `train` refuses (exit 64) what cannot
fit. The formulas, their calibration against measured peaks: docs/planner.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Any

import torch

from job.config.schema import JobConfig, scratch_dir
from job.errors import ConfigError
from job.logs import get_logger
from job.optim.adamw import CHUNK, DEFAULT_OPTIMIZER, KNOWN_STATE_MODELS, OUR_OPTIMIZERS, optimizer_state_bytes
from job.plan import flops
from job.plan.render import render_plan  # noqa: F401 - re-exported
from job.plan.shape import (  # noqa: F401 - re-exported: callers import them from here
    DIMENSION_LIMITS,
    MISTRAL_7B_V03,
    ModelShape,
    _parse_config_json,
    check_dimensions,
    load_model_config,
    model_shape,
)
from job.plan.speed import (
    MEMORY_TARGET,
    CheckpointBudget,
    Layout,
    decide_layout,
    hfu,
    last_layers,
    recompute_factor,
    splits,
)

log = get_logger(__name__)

GiB = 1 << 30
MiB = 1 << 20
DEFAULT_GPU = "NVIDIA RTX PRO 6000 Blackwell"
DEFAULT_GPU_MEMORY = 97_887 * MiB  # what nvidia-smi reports for the 96 GB card
DEVICE_RESERVE = 2 * GiB
"""Device memory outside the allocator's peak: the CUDA context and libraries (~0.5-1 GiB) and what the caching
allocator reserves beyond its peak allocation (0.57-1.10 GiB measured on the H200, docs/performance.md)."""
_QUALITY_ORDER = ("adamw_fp32_master", "adamw_kahan", "adamw_8bit_sr")

try:  # the tile sizes of the installed TRL's chunked LM head
    from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE as HEAD_TOKEN_TILE
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as HEAD_VOCAB_TILE
except ImportError:  # pragma: no cover - TRL 1.16's values
    HEAD_TOKEN_TILE, HEAD_VOCAB_TILE = 4096, 32768


def _layer_bytes(shape: ModelShape, act: int, masked: bool) -> tuple[int, int]:
    """(one layer's saved activations, its RMSNorm's) per token; see docs/planner.md."""
    h, i = shape.hidden, shape.intermediate
    norm = 4 * h + 2 * act * h
    # k and v at full width where a padding or packing mask makes transformers repeat them for SDPA
    # (`use_gqa_in_sdpa`); without a mask GQA keeps them at the key/value heads' width.
    kv = 2 * act * (h if masked else (shape.kv_width or h))
    return 2 * norm + 2 * act * h + kv + 4 * shape.heads + 4 * act * i, norm


def saved_activation_bytes(shape: ModelShape, tokens: int, act: int, kept: Collection[int], masked: bool = True) -> int:
    """What the forward leaves for backward: the `kept` layers' activations, each recomputed layer's input,
    the final norm's."""
    layer, norm = _layer_bytes(shape, act, masked)
    count = len(kept)
    return tokens * (count * layer + (shape.layers - count) * act * shape.hidden + norm)


def backward_working_bytes(
    shape: ModelShape, tokens: int, act: int, kept: Collection[int], masked: bool = True
) -> tuple[int, str]:
    """What backward adds on top of the saved activations at its peak, and where that peak is.

    Two moments: the loss head's backward (every saved activation still held), and the top decoder layer's
    backward (the final norm's activations freed; a recomputed top layer rebuilds its own first). Later
    layers hold less: each layer's activations are freed as its backward ends."""
    layer, norm = _layer_bytes(shape, act, masked)
    head = loss_head_bytes(shape, tokens, act)
    top = tokens * (act * (3 * shape.intermediate + 2 * shape.hidden) - norm)
    if shape.layers - 1 not in kept:
        top += tokens * layer
    return (head, "loss head") if head >= top else (top, "top layer")


def loss_head_bytes(shape: ModelShape, tokens: int, act: int) -> int:
    """Peak of TRL 1.16's chunked LM head (its backward), no full logits."""
    h, v = shape.hidden, shape.vocab
    tile = act * min(tokens, HEAD_TOKEN_TILE) * min(v, HEAD_VOCAB_TILE)
    return (2 * act + 4) * tokens * h + (4 + act) * v * h + tile + 16 * tokens


def _step_transient(optimizer: str, shape: ModelShape, width: int) -> int:
    # What the optimizer step allocates; activations are freed by then.
    if optimizer in OUR_OPTIMIZERS:
        return 12 * 4 * min(CHUNK, max(shape.sizes))
    if optimizer == "adamw_torch":  # foreach: one temporary per state tensor, all at once
        return shape.parameters * width
    return 0


def memory_parts(
    shape: ModelShape,
    dtype: torch.dtype,
    optimizer: str,
    batch: int,
    seq: int,
    kept: Collection[int],
    shards: int = 1,
    masked: bool = True,
) -> dict[str, int]:
    """The planned peak of the allocator (`torch.cuda.max_memory_allocated`), per part; `kept` are the decoder
    layers that keep their activations (the others recompute). `masked`: attention runs with a mask
    (padding, packing), which widens the saved k/v of grouped-query attention; the GPU benchmark has none."""
    width = torch.empty((), dtype=dtype).element_size()
    # FSDP computes in bf16 whatever the (float32) master shards are.
    act = 2 if shards > 1 else min(width, 4)
    tokens = batch * seq
    working, _ = backward_working_bytes(shape, tokens, act, kept, masked)
    parts = {
        "weights": shape.parameters * width // shards,
        "gradients": shape.parameters * width // shards,
        "optimizer": optimizer_state_bytes(optimizer, shape.sizes, dtype) // shards,
        "activations": saved_activation_bytes(shape, tokens, act, kept, masked),
        "backward": working,
    }
    if shards > 1:  # the layer being computed and the next one (prefetch) are gathered whole, in bf16
        parts["weights"] += 2 * 2 * shape.parameters // max(shape.layers, 1)
    dynamic = parts["activations"] + parts["backward"]
    parts["overhead"] = max(0, _step_transient(optimizer, shape, width) // shards - dynamic)
    parts["total"] = sum(parts.values())
    return parts


def checkpoint_budget_for(
    shape: ModelShape, dtype: torch.dtype, optimizer: str, batch: int, seq: int, gpu_bytes: int, shards: int = 1
) -> CheckpointBudget:
    """The planned peak at micro-batch `batch` for every number of layers kept (the last ones, and with the top
    layer recomputed instead)."""
    layers = shape.layers

    def total(kept: frozenset[int]) -> int:
        return memory_parts(shape, dtype, optimizer, batch, seq, kept, shards)["total"]

    peaks = tuple(total(last_layers(k, layers)) for k in range(layers + 1))
    top = tuple(total(frozenset(range(k))) for k in range(layers))
    return CheckpointBudget(layers, gpu_bytes, peaks, top, batch)


def _advice(
    shape: ModelShape,
    dtype: torch.dtype,
    optimizer: str,
    batch: int,
    seq: int,
    kept: frozenset[int],
    shards: int,
    gpu: int,
) -> list[str]:
    def fits(**change: Any) -> dict[str, int] | None:
        args = {"optimizer": optimizer, "batch": batch, "seq": seq, "kept": kept, "shards": shards, **change}
        mem = memory_parts(shape, dtype, **args)
        return mem if mem["total"] + DEVICE_RESERVE <= gpu else None

    advice = []
    if kept and (mem := fits(kept=frozenset())):
        setting = "activation_checkpointing_layers=all" if len(kept) < shape.layers else "activation_checkpointing=true"
        advice.append(f"set train.{setting} (total {mem['total'] / GiB:.1f} GiB; up to 1/3 more compute)")
    current = optimizer_state_bytes(optimizer, shape.sizes, dtype)
    for name in _QUALITY_ORDER if shards == 1 else ():  # ours are not offered under FSDP (unverified there)
        if (
            name != optimizer
            and optimizer_state_bytes(name, shape.sizes, dtype) < current
            and (mem := fits(optimizer=name))
        ):
            advice.append(f"set train.optim={name} (total {mem['total'] / GiB:.1f} GiB)")
            break
    smaller = next((b for b in range(batch - 1, 0, -1) if fits(batch=b)), None)
    if smaller:
        advice.append(
            f"set train.per_device_train_batch_size={smaller} and multiply gradient_accumulation_steps by"
            f" {batch / smaller:g} to keep the effective batch"
        )
    shorter = next(
        (s for s in (seq * 3 // 4, seq // 2, seq // 4) if s >= 128 and fits(batch=1, seq=s, kept=frozenset())), None
    )
    if shorter and not smaller:
        advice.append(f"set data.max_length={shorter} with per_device_train_batch_size=1")
    if not advice:
        least = memory_parts(shape, dtype, "adamw_8bit_sr", 1, seq, frozenset(), shards)["total"] + DEVICE_RESERVE
        advice.append(
            f"even batch 1 with activation checkpointing and adamw_8bit_sr needs {least / GiB:.1f} GiB: use a GPU with"
            " more memory, or shard across GPUs with FSDP2 (accelerate)"
        )
    return advice


def choose_layout(
    shape: ModelShape,
    dtype: torch.dtype,
    optimizer: str,
    *,
    batch: int,
    accum: int,
    seq: int,
    checkpointing: bool,
    layers_setting: str,
    split: bool,
    gpu_bytes: int,
    shards: int = 1,
) -> Layout:
    """What the fast path decides on a GPU with `gpu_bytes` (`job.plan.speed.decide_layout`): the layers kept
    and, when `split` (the user set neither batch nor accumulation), the fastest micro-batch x accumulation."""
    if shards > 1:  # FSDP recomputes every layer itself (or none); the split is not offered there
        kept = frozenset() if checkpointing else frozenset(range(shape.layers))
        why = "FSDP's own activation checkpointing: every layer" if checkpointing else "off"
        return Layout(checkpointing, kept, None, shape.layers, batch, accum, why, f"{batch} x {accum} as configured")
    wanted = {batch, *(b for b, _ in splits(batch * accum))} if split else {batch}
    budgets = {b: checkpoint_budget_for(shape, dtype, optimizer, b, seq, gpu_bytes) for b in sorted(wanted)}
    return decide_layout(
        setting=layers_setting,
        checkpointing=checkpointing,
        layers=shape.layers,
        batch=batch,
        accum=accum,
        seq=seq,
        split=split,
        budget=budgets[batch],
        split_budgets=budgets if split else {},
        note="",
        on_gpu=True,
    )


def _split_record(layout: Layout, split: bool) -> dict[str, Any] | None:
    if not split:
        return None
    if layout.split is None:
        return {"chosen_by": "config", "reason": layout.split_reason, "candidates": []}
    candidates = [
        {"batch": c.batch, "accum": c.accum, "kept": c.kept, "peak_bytes": c.peak_bytes, "expected_mfu": c.speed}
        for c in layout.split.candidates
    ]
    return {"chosen_by": "planner", "reason": layout.split_reason, "candidates": candidates}


def make_plan(
    model_config: Any,
    *,
    dtype: str | torch.dtype = "bfloat16",
    optimizer: str = DEFAULT_OPTIMIZER,
    per_device_batch_size: int = 2,
    gradient_accumulation_steps: int = 8,
    seq_length: int = 2048,
    activation_checkpointing: bool = True,
    checkpointing_layers: str = "all",
    split_batch: bool = False,
    gpu_memory_bytes: int | None = None,
    gpu_name: str | None = None,
    peak_flops: float | None = None,
    utilisation: float | None = None,
    dataset_tokens: int | None = None,
    epochs: float = 1.0,
    world_size: int = 1,
    sharded: bool = False,
    trust_remote_code: bool = False,
    host_memory_bytes: int | None = None,
) -> dict[str, Any]:
    """Plan memory, layers kept, batch split, time and checkpoint staging; docs/planner.md.

    `checkpointing_layers` as train.activation_checkpointing_layers (`auto` keeps the most layers that fit);
    `split_batch`: the planner may choose micro-batch x accumulation (the user set neither). `utilisation`: an
    assumed hardware FLOP utilisation instead of the model in `job.plan.speed`. `world_size` ranks train in
    parallel (the time divides); `sharded` (FSDP) also divides the weights, gradients and optimizer states among
    them, plus two gathered layers; DDP replicates them. `host_memory_bytes`: the pod's RAM (else detected)."""
    config = load_model_config(model_config, trust_remote_code=trust_remote_code)
    shape = model_shape(config)
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    detected = flops.detect_gpu() if gpu_memory_bytes is None or gpu_name is None else None
    name = gpu_name or (detected.name if detected else DEFAULT_GPU)
    source = "given" if gpu_name else ("detected" if detected else "default")
    gpu_memory = gpu_memory_bytes or (detected.memory_bytes if detected else DEFAULT_GPU_MEMORY)
    peak = peak_flops or flops.peak_bf16_flops(name)
    warnings = []
    modelled = optimizer
    if optimizer not in KNOWN_STATE_MODELS:  # another transformers name: assume AdamW-sized states
        modelled = "adamw_torch_fused"
        warnings.append(f"no memory model for {optimizer!r}: counted as two states in the weights' dtype")
    shards = world_size if sharded else 1
    layout = choose_layout(
        shape,
        torch_dtype,
        modelled,
        batch=per_device_batch_size,
        accum=gradient_accumulation_steps,
        seq=seq_length,
        checkpointing=activation_checkpointing,
        layers_setting=checkpointing_layers,
        split=split_batch,
        gpu_bytes=gpu_memory,
        shards=shards,
    )
    batch, kept = layout.batch, layout.kept if layout.checkpointing else frozenset(range(shape.layers))
    memory = memory_parts(shape, torch_dtype, modelled, batch, seq_length, kept, shards)
    act = 2 if shards > 1 else min(torch.empty((), dtype=torch_dtype).element_size(), 4)
    _, peak_at = backward_working_bytes(shape, batch * seq_length, act, kept)
    headroom = gpu_memory - DEVICE_RESERVE - memory["total"]
    fits = headroom >= 0
    if optimizer not in OUR_OPTIMIZERS and torch_dtype in (torch.bfloat16, torch.float16) and shards == 1:
        warnings.append(
            f"{optimizer} with {torch_dtype} weights rounds away updates smaller than ~|w|/256: at lr 5e-6 most weights"
            " stop moving (docs/fidelity.md); use train.optim=adamw_kahan"
        )
    if fits and headroom < 0.03 * gpu_memory:
        warnings.append("less than 3% headroom: the estimate is within ~2% of measured peaks, measure it first")
    fshape = flops.FlopShape(shape.layers, shape.attention_width)
    model_flops = flops.flops_per_token(fshape, shape.parameters, seq_length, embedding_params=shape.input_embedding)
    factor = recompute_factor(len(kept), shape.layers)
    hfu_assumed = utilisation if utilisation is not None else hfu(batch * seq_length)
    tps = world_size * hfu_assumed * peak / (model_flops * factor) if peak else None  # all ranks together
    if gpu_name and not gpu_memory_bytes and not detected:
        warnings.append(f"GPU memory not given: assuming the 96 GB card's {DEFAULT_GPU_MEMORY >> 20:,} MiB")
    if peak is None:
        warnings.append(f"no peak FLOP/s known for {name!r}: pass peak_flops for a time estimate")
    return {
        "model": {"architecture": shape.architecture, "layers": shape.layers, "hidden": shape.hidden},
        "parameters": shape.parameters,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "optimizer": optimizer,
        "per_device_batch_size": batch,
        "gradient_accumulation_steps": layout.accum,
        "seq_length": seq_length,
        "activation_checkpointing": len(kept) < shape.layers,
        "layers": {
            "total": shape.layers,
            "kept": len(kept),
            "kept_layers": sorted(kept),
            "setting": checkpointing_layers if activation_checkpointing else "off",
            "reason": layout.layers_reason,
            "split_reason": layout.split_reason,
        },
        "batch_split": _split_record(layout, split_batch and shards == 1),
        "memory_bytes": memory,
        "peak_at": peak_at,
        "gpu": {"name": name, "source": source, "peak_bf16_flops": peak},
        "gpu_memory_bytes": gpu_memory,
        "device_reserve_bytes": DEVICE_RESERVE,
        "memory_target_bytes": int(MEMORY_TARGET * gpu_memory),
        "headroom_bytes": headroom,
        "fits": fits,
        "advice": [] if fits else _advice(shape, torch_dtype, modelled, batch, seq_length, kept, shards, gpu_memory),
        "warnings": warnings,
        "flops_per_token": {"model": model_flops, "hardware": model_flops * factor},
        "assumed_utilisation": hfu_assumed,
        "tokens_per_second_estimate": tps,
        "mfu_estimate": tps * model_flops / (peak * world_size) if tps else None,
        "world_size": world_size,
        "sharded": sharded,
        "dataset_tokens": dataset_tokens,
        "epochs": epochs,
        "seconds_estimate": dataset_tokens * epochs / tps if dataset_tokens and tps else None,
        "checkpoint": checkpoint_staging(memory["weights"] + memory["optimizer"], host_memory_bytes),
    }


def checkpoint_staging(state_bytes: int, host_memory_bytes: int | None = None) -> dict[str, Any]:
    """The checkpoint's size and how it is staged in host RAM on the GPU (`job.durability.staging`)."""
    from job.durability.staging import host_memory_limit_bytes, plan_staging

    limit, source = host_memory_bytes, "given"
    if limit is None:
        limit = host_memory_limit_bytes()
        source = "detected" if limit else "unknown"
    staging = plan_staging(state_bytes, limit, "cuda")
    return {
        "state_bytes": state_bytes,
        "host_limit_bytes": limit,
        "host_limit_source": source,
        "staging": dataclasses.asdict(staging),
    }


# ---------------------------------------------------------------- the plan for a job config


def model_config_source(config: JobConfig) -> Any:
    """A config dict, a directory or a Hub id for `make_plan`, fetching only config.json."""
    from job.model.load import resolve_source
    from job.storage import is_remote, open_store

    source = config.model.source
    if is_remote(source):
        return _parse_config_json(open_store(source.rstrip("/"), config.storage).read_bytes("config.json"), source)
    # builtin: built once; local: checked; Hub id: AutoConfig downloads config.json alone
    return resolve_source(config.model, scratch_dir(config), config.storage).location


def plan_job(
    config: JobConfig,
    *,
    model_config: Any = None,
    gpu_memory_bytes: int | None = None,
    dataset_tokens: int | None = None,
    host_memory_bytes: int | None = None,
    gpu_name: str | None = None,
) -> dict[str, Any]:
    """`make_plan` for a job config: its layers setting, and the batch split when the user set neither value."""
    train = config.train
    epochs = train.num_train_epochs
    if train.max_steps > 0 and dataset_tokens:
        epochs = 0.0  # stated in steps: the time follows from steps, not from the dataset
    from job.model.load import ModelSource, hub_errors

    is_set = getattr(config, "is_set", lambda key: False)
    split = not any(is_set(f"train.{key}") for key in ("per_device_train_batch_size", "gradient_accumulation_steps"))
    source = model_config if model_config is not None else model_config_source(config)
    with hub_errors(ModelSource(str(source), "hub", config.model.revision)):
        return make_plan(
            source,
            dtype=config.model.dtype,
            optimizer=train.optim,
            per_device_batch_size=train.per_device_train_batch_size,
            gradient_accumulation_steps=train.gradient_accumulation_steps,
            seq_length=config.data.max_length,
            activation_checkpointing=bool(train.activation_checkpointing),
            checkpointing_layers=str(train.activation_checkpointing_layers),
            split_batch=split and not train.fsdp,
            gpu_memory_bytes=gpu_memory_bytes,
            gpu_name=gpu_name,
            dataset_tokens=dataset_tokens,
            epochs=epochs or 1.0,
            world_size=world_size(config),
            sharded=train.fsdp,
            trust_remote_code=config.model.trust_remote_code,
            host_memory_bytes=host_memory_bytes,
        )


def world_size(config: JobConfig) -> int:
    """The ranks this run trains on: the launcher's (when this is one of its ranks) or the config's."""
    from job.dist.group import ranks_from_env

    ranks = ranks_from_env()
    return ranks.world_size if ranks.distributed else config.distributed.world_size


def refuse_if_it_cannot_fit(plan: dict[str, Any], force: bool) -> None:
    if plan["fits"]:
        return
    gib = 2**30
    message = (
        f"the planner estimates {plan['memory_bytes']['total'] / gib:.1f} GiB (+ {DEVICE_RESERVE / gib:.0f} GiB for the"
        f" CUDA context and allocator) for this run on {plan['gpu']['name']} ({plan['gpu_memory_bytes'] / gib:.1f} GiB)"
    )
    if force:
        log.warning("plan_does_not_fit_forced", estimate=message, advice=plan["advice"])
        return
    raise ConfigError(message, hint="; ".join(plan["advice"]) + " (or pass --force)")
