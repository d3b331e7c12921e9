"""The planner's peaks for the fast path: the model's config wherever the job resolved it, its layer count, and
`CheckpointBudget`s (the planned peak for every number of layers kept) per micro-batch."""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import torch

from job.errors import ConfigError
from job.optim.adamw import KNOWN_STATE_MODELS
from job.plan.speed import CheckpointBudget


def checkpoint_budgets(
    model_config: Any,
    *,
    dtype: str,
    optimizer: str,
    batches: Collection[int],
    seq: int,
    gpu_memory_bytes: int,
    trust_remote_code: bool = False,
) -> dict[int, CheckpointBudget]:
    """`checkpoint_budget_for` each micro-batch in `batches`, from a model config (what the fast path asks)."""
    from job.plan.memory import checkpoint_budget_for, load_model_config, model_shape

    shape = model_shape(load_model_config(model_config, trust_remote_code=trust_remote_code))
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    modelled = optimizer if optimizer in KNOWN_STATE_MODELS else "adamw_torch_fused"
    return {b: checkpoint_budget_for(shape, torch_dtype, modelled, b, seq, gpu_memory_bytes) for b in sorted(batches)}


def gpu_budgets(
    model_config: Any,
    gpu_bytes: int | None,
    *,
    dtype: str,
    optimizer: str,
    batches: Collection[int],
    seq: int,
    planner: Callable[..., dict[int, CheckpointBudget]] | None = None,
) -> tuple[dict[int, CheckpointBudget], str]:
    """`checkpoint_budgets` on a GPU of `gpu_bytes` (None: no GPU), or ({}, why there is none)."""
    if not gpu_bytes:
        return {}, "no GPU to plan for"
    if model_config is None:
        return {}, "model config unknown to the planner"
    try:
        return (planner or checkpoint_budgets)(
            model_config, dtype=dtype, optimizer=optimizer, batches=batches, seq=seq, gpu_memory_bytes=gpu_bytes
        ), ""
    except (ValueError, KeyError, TypeError, OSError, ConfigError) as exc:
        return {}, f"the planner could not size this run ({exc})"


def model_config_at(location: str | None, revision: str | None, trust_remote_code: bool = False) -> Any:
    """The model's config (a directory, a Hub id, the builtin tiny model), or None when it cannot be read here."""
    if not location:
        return None
    if location.startswith("builtin:"):
        from job.model.tiny import TINY_CONFIG  # job.model.tiny logs: imported only here

        return {"model_type": "mistral", "vocab_size": 32768, **TINY_CONFIG}
    path = Path(location)
    try:
        from transformers import AutoConfig

        if path.is_dir() and (path / "config.json").is_file():
            return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        from job.model.load import HUB_ID

        if HUB_ID.match(location) and not path.exists():
            token = os.environ.get("HF_TOKEN") or None
            return AutoConfig.from_pretrained(
                location, revision=revision, token=token, trust_remote_code=trust_remote_code
            )
    except (OSError, ValueError):
        return None
    return None


def layer_count(model_config: Any) -> int | None:
    if isinstance(model_config, Mapping):
        value = model_config.get("num_hidden_layers")
    else:
        text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
        value = getattr(text, "num_hidden_layers", None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
