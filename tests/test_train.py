"""job/train: the SFTConfig the job builds for several ranks (FSDP2 defaults, what it refuses)."""

from __future__ import annotations

from pathlib import Path

import pytest

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
