"""The model's shape for the planner, from its config.json alone: parameters counted on the meta device.

`load_model_config` reads a config dict, config.json, a model directory or a Hub id; `model_shape` builds the
causal LM on the meta device (no memory, no weights) and records what the memory and FLOP estimates need;
`check_dimensions` refuses a hostile or broken config.json before anything is built.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from job.errors import ConfigError
from job.logs import shorten
from job.plan import flops

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
    kv_width: int = 0
    """Key/value heads x head dim (grouped-query attention); 0: as wide as the hidden size."""

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
        kv_width=int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
        * (shape.attention_width // int(text.num_attention_heads)),
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
