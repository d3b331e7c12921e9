"""Memory and time plan for a full-parameter SFT run on one GPU, from the model's config.json alone.

`make_plan` counts parameters on the meta device (no weights) and estimates each part of the peak
(weights, gradients, optimizer states, activations, loss head, overhead) and the time at an assumed
utilisation; `plan_job` asks it for a job config, and `train` refuses (exit 64) what cannot fit.
The formulas, and how they compare with measured peaks: docs/planner.md.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from job.config.schema import JobConfig, scratch_dir
from job.errors import ConfigError
from job.logs import get_logger, shorten
from job.optim.adamw import CHUNK, DEFAULT_OPTIMIZER, KNOWN_STATE_MODELS, OUR_OPTIMIZERS, optimizer_state_bytes
from job.plan import flops

log = get_logger(__name__)

GiB = 1 << 30
MiB = 1 << 20
DEFAULT_GPU = "NVIDIA RTX PRO 6000 Blackwell"
DEFAULT_GPU_MEMORY = 97_887 * MiB  # what nvidia-smi reports for the 96 GB card
DEFAULT_UTILISATION = 0.40
FIXED_OVERHEAD = 1 * GiB
FRAGMENTATION = 0.05
_QUALITY_ORDER = ("adamw_fp32_master", "adamw_kahan", "adamw_8bit_sr")

# The default base model's config.json (the values that shape it): plans and benchmarks need no download.
MISTRAL_7B_V03: dict[str, Any] = {
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "vocab_size": 32768,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1_000_000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

try:  # the tile sizes of the installed TRL's chunked LM head
    from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE as HEAD_TOKEN_TILE
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as HEAD_VOCAB_TILE
except ImportError:  # pragma: no cover - TRL 1.16's values
    HEAD_TOKEN_TILE, HEAD_VOCAB_TILE = 4096, 32768


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about the model."""

    architecture: str
    sizes: tuple[int, ...]  # element count of each (unique) parameter tensor
    input_embedding: int  # 0 when tied to the LM head
    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    attention_width: int

    @property
    def parameters(self) -> int:
        return sum(self.sizes)


def load_model_config(source: Any, *, trust_remote_code: bool = False) -> Any:
    """A transformers config from a dict, a `PretrainedConfig`, config.json, a model directory or a hub id.

    `trust_remote_code` is passed on explicitly: left unset, transformers would ask on stdin."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source
    if isinstance(source, (str, Path)) and Path(source).is_file():
        source = _parse_config_json(Path(source).read_bytes(), str(source))
    if isinstance(source, Mapping):
        values = dict(source)
        return AutoConfig.for_model(values.pop("model_type"), **values)
    return AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code)


def _parse_config_json(data: bytes, where: str) -> dict[str, Any]:
    try:
        values = json.loads(data)
    except ValueError as exc:
        raise ConfigError(f"the model's config.json at {where} is not valid JSON: {shorten(str(exc))}") from None
    if not isinstance(values, dict) or not isinstance(values.get("model_type"), str):
        raise ConfigError(f"the model's config.json at {where} is not an object with a model_type")
    return values


def model_shape(config: Any) -> ModelShape:
    """Count the parameters of `config`'s causal LM on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    check_dimensions(config)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (RuntimeError, ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(
            f"the model's config.json describes no buildable model: {shorten(str(exc))}",
            hint="check the model directory's config.json (or model.source)",
        ) from None
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding
    text = config.get_text_config()
    shape = flops.flop_shape(config)
    return ModelShape(
        architecture=type(model).__name__,
        sizes=tuple(p.numel() for p in model.parameters()),
        input_embedding=0 if tied else embedding.numel(),
        layers=shape.num_layers,
        hidden=int(text.hidden_size),
        intermediate=int(getattr(text, "intermediate_size", 4 * text.hidden_size)),
        heads=int(text.num_attention_heads),
        vocab=int(text.vocab_size),
        attention_width=shape.attention_width,
    )


DIMENSION_LIMITS = {
    "num_hidden_layers": 1024,
    "hidden_size": 65_536,
    "intermediate_size": 1_048_576,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "vocab_size": 4_194_304,
}
"""Far above any released model's; a config.json beyond them is hostile or broken, and building even its
meta-device skeleton would take hours (10^7 layers) before any real check could run."""


def check_dimensions(config: Any) -> None:
    """ConfigError (64) naming the field when a dimension is not a positive integer within DIMENSION_LIMITS."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name, limit in DIMENSION_LIMITS.items():
        value = getattr(text, name, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
            raise ConfigError(
                f"the model's config.json has {name}={shorten(repr(value), 60)}: not a positive integer up to {limit}",
                hint="check the model directory's config.json (or model.source)",
            )


def activation_bytes(shape: ModelShape, tokens: int, act: int, checkpointing: bool) -> int:
    """Saved activations plus the backward working set for `tokens` tokens (see the module docstring)."""
    h, i = shape.hidden, shape.intermediate
    norm = 4 * h + 2 * act * h
    layer = 2 * norm + 4 * act * h + 4 * shape.heads + 4 * act * i
    kept = shape.layers * act * h + layer if checkpointing else shape.layers * layer
    return tokens * (kept + norm + act * (3 * i + 2 * h))


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


def _memory(
    shape: ModelShape, dtype: torch.dtype, optimizer: str, batch: int, seq: int, ckpt: bool, shards: int = 1
) -> dict[str, int]:
    width = torch.empty((), dtype=dtype).element_size()
    # FSDP computes in bf16 whatever the (float32) master shards are.
    act = 2 if shards > 1 else min(width, 4)
    tokens = batch * seq
    parts = {
        "weights": shape.parameters * width // shards,
        "gradients": shape.parameters * width // shards,
        "optimizer": optimizer_state_bytes(optimizer, shape.sizes, dtype) // shards,
        "activations": activation_bytes(shape, tokens, act, ckpt),
        "loss_head": loss_head_bytes(shape, tokens, act),
    }
    if shards > 1:  # the layer being computed and the next one (prefetch) are gathered whole, in bf16
        parts["weights"] += 2 * 2 * shape.parameters // max(shape.layers, 1)
    dynamic = parts["activations"] + parts["loss_head"]
    transient = _step_transient(optimizer, shape, width) // shards
    parts["overhead"] = FIXED_OVERHEAD + int(FRAGMENTATION * dynamic) + max(0, transient - dynamic)
    parts["total"] = sum(parts.values())
    return parts


def _advice(
    shape: ModelShape, dtype: torch.dtype, optimizer: str, batch: int, seq: int, ckpt: bool, shards: int, gpu: int
) -> list:
    def fits(**change: Any) -> dict[str, int] | None:
        args = {"optimizer": optimizer, "batch": batch, "seq": seq, "ckpt": ckpt, "shards": shards, **change}
        mem = _memory(shape, dtype, **args)
        return mem if mem["total"] <= gpu else None

    advice = []
    if not ckpt and (mem := fits(ckpt=True)):
        advice.append(
            f"set train.activation_checkpointing=true (total {mem['total'] / GiB:.1f} GiB; ~1/3 more compute)"
        )
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
    shorter = next((s for s in (seq * 3 // 4, seq // 2, seq // 4) if s >= 128 and fits(batch=1, seq=s)), None)
    if shorter and not smaller:
        advice.append(f"set data.max_length={shorter} with per_device_train_batch_size=1")
    if not advice:
        least = _memory(shape, dtype, "adamw_8bit_sr", 1, seq, True, shards)["total"]
        advice.append(
            f"even batch 1 with activation checkpointing and adamw_8bit_sr needs {least / GiB:.1f} GiB: use a GPU with"
            " more memory, or shard across GPUs with FSDP2 (accelerate)"
        )
    return advice


def make_plan(
    model_config: Any,
    *,
    dtype: str | torch.dtype = "bfloat16",
    optimizer: str = DEFAULT_OPTIMIZER,
    per_device_batch_size: int = 2,
    seq_length: int = 2048,
    activation_checkpointing: bool = True,
    gpu_memory_bytes: int | None = None,
    gpu_name: str | None = None,
    peak_flops: float | None = None,
    utilisation: float = DEFAULT_UTILISATION,
    dataset_tokens: int | None = None,
    epochs: float = 1.0,
    world_size: int = 1,
    sharded: bool = False,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Plan memory and time; see the module docstring for what each figure counts.

    `world_size` ranks train in parallel (the time divides); `sharded` (FSDP) also divides the weights,
    gradients and optimizer states among them, plus two gathered layers; DDP replicates them."""
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
    args = (shape, torch_dtype, modelled, per_device_batch_size, seq_length, activation_checkpointing, shards)
    memory = _memory(*args)
    fits = memory["total"] <= gpu_memory
    if optimizer not in OUR_OPTIMIZERS and torch_dtype in (torch.bfloat16, torch.float16) and shards == 1:
        warnings.append(
            f"{optimizer} with {torch_dtype} weights rounds away updates smaller than ~|w|/256: at lr 5e-6 most weights"
            " stop moving (docs/fidelity.md); use train.optim=adamw_kahan"
        )
    if fits and gpu_memory - memory["total"] < 0.05 * gpu_memory:
        warnings.append("less than 5% headroom: the activation estimate is approximate, measure peak memory first")
    fshape = flops.FlopShape(shape.layers, shape.attention_width)
    model_flops = flops.flops_per_token(fshape, shape.parameters, seq_length, embedding_params=shape.input_embedding)
    hardware_flops = flops.flops_per_token(
        fshape, shape.parameters, seq_length, embedding_params=shape.input_embedding, recompute=activation_checkpointing
    )
    tps = world_size * utilisation * peak / hardware_flops if peak else None  # all ranks together
    if gpu_name and not gpu_memory_bytes and not detected:
        warnings.append(f"GPU memory not given: assuming the 96 GB card's {DEFAULT_GPU_MEMORY >> 20:,} MiB")
    if peak is None:
        warnings.append(f"no peak FLOP/s known for {name!r}: pass peak_flops for a time estimate")
    return {
        "model": {"architecture": shape.architecture, "layers": shape.layers, "hidden": shape.hidden},
        "parameters": shape.parameters,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "optimizer": optimizer,
        "per_device_batch_size": per_device_batch_size,
        "seq_length": seq_length,
        "activation_checkpointing": activation_checkpointing,
        "memory_bytes": memory,
        "gpu": {"name": name, "source": source, "peak_bf16_flops": peak},
        "gpu_memory_bytes": gpu_memory,
        "headroom_bytes": gpu_memory - memory["total"],
        "fits": fits,
        "advice": [] if fits else _advice(*args, gpu_memory),
        "warnings": warnings,
        "flops_per_token": {"model": model_flops, "hardware": hardware_flops},
        "assumed_utilisation": utilisation,
        "tokens_per_second_estimate": tps,
        "mfu_estimate": tps * model_flops / (peak * world_size) if tps else None,
        "world_size": world_size,
        "sharded": sharded,
        "dataset_tokens": dataset_tokens,
        "epochs": epochs,
        "seconds_estimate": dataset_tokens * epochs / tps if dataset_tokens and tps else None,
    }


_SOURCES = {"given": "given", "detected": "detected", "default": "assumed: no GPU here"}


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def render_plan(plan: dict[str, Any]) -> str:
    """A human-readable GiB table of `plan`, with the time estimate and any advice."""
    mem, gpu = plan["memory_bytes"], plan["gpu_memory_bytes"] / GiB
    ckpt = "on" if plan["activation_checkpointing"] else "off"
    lines = [
        f"model      {plan['model']['architecture']}: {plan['parameters']:,} parameters, {plan['dtype']}",
        f"training   optimizer {plan['optimizer']}, batch {plan['per_device_batch_size']} x {plan['seq_length']}"
        f" tokens per device, activation checkpointing {ckpt}",
        f"gpu        {plan['gpu']['name']} ({_SOURCES[plan['gpu']['source']]}): {gpu:.2f} GiB",
    ]
    if plan.get("world_size", 1) > 1:
        how = "FSDP: weights, gradients, optimizer states sharded" if plan["sharded"] else "DDP: each holds it all"
        lines.append(f"ranks      {plan['world_size']} ({how}); memory below is per GPU, time for all")
    lines += [
        "",
        f"  {'component':<18}{'GiB':>8}",
    ]
    labels = {
        "weights": "weights",
        "gradients": "gradients",
        "optimizer": "optimizer states",
        "activations": "activations",
        "loss_head": "loss head (TRL)",
        "overhead": "overhead",
    }
    lines += [f"  {label:<18}{mem[key] / GiB:>8.2f}" for key, label in labels.items()]
    verdict = "fits" if plan["fits"] else "does NOT fit"
    spare = "spare" if plan["fits"] else "short"
    lines += [
        f"  {'-' * 26}",
        f"  {'total':<18}{mem['total'] / GiB:>8.2f}   of {gpu:.2f} GiB: {verdict},"
        f" {abs(plan['headroom_bytes']) / GiB:.2f} GiB {spare}",
        "",
    ]
    tps = plan["tokens_per_second_estimate"]
    if tps:
        kind = "with recomputation" if plan["activation_checkpointing"] else "no recomputation"
        lines.append(
            f"speed      ~{tps:,.0f} tokens/s: {plan['assumed_utilisation']:.0%} of"
            f" {plan['gpu']['peak_bf16_flops'] / 1e12:.1f} TFLOP/s at"
            f" {plan['flops_per_token']['hardware'] / 1e9:.1f} GFLOP/token ({kind}); MFU {plan['mfu_estimate']:.2f}"
        )
    if plan["seconds_estimate"]:
        total = plan["dataset_tokens"] * plan["epochs"]
        lines.append(
            f"time       {plan['dataset_tokens']:,} tokens x {plan['epochs']:g} epochs = {total:,.0f} tokens:"
            f" ~{_duration(plan['seconds_estimate'])}"
        )
    if plan["advice"]:
        lines.append("advice     any one of these fits:")
        lines += [f"  - {a}" for a in plan["advice"]]
    lines += [f"warning    {w}" for w in plan["warnings"]]
    return "\n".join(lines)


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
) -> dict[str, Any]:
    from job.plan.memory import make_plan

    train = config.train
    epochs = train.num_train_epochs
    if train.max_steps > 0 and dataset_tokens:
        epochs = 0.0  # stated in steps: the time follows from steps, not from the dataset
    from job.model.load import ModelSource, hub_errors

    source = model_config if model_config is not None else model_config_source(config)
    with hub_errors(ModelSource(str(source), "hub", config.model.revision)):
        return make_plan(
            source,
            dtype=config.model.dtype,
            optimizer=train.optim,
            per_device_batch_size=train.per_device_train_batch_size,
            seq_length=config.data.max_length,
            activation_checkpointing=bool(train.activation_checkpointing),
            gpu_memory_bytes=gpu_memory_bytes,
            dataset_tokens=dataset_tokens,
            epochs=epochs or 1.0,
            world_size=world_size(config),
            sharded=train.fsdp,
            trust_remote_code=config.model.trust_remote_code,
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
        f"the planner estimates {plan['memory_bytes']['total'] / gib:.1f} GiB for this run on "
        f"{plan['gpu']['name']} ({plan['gpu_memory_bytes'] / gib:.1f} GiB)"
    )
    if force:
        log.warning("plan_does_not_fit_forced", estimate=message, advice=plan["advice"])
        return
    raise ConfigError(message, hint="; ".join(plan["advice"]) + " (or pass --force)")
