"""The embedded default: a tiny Mistral-architecture model with the real Mistral v3 tokenizer.

`model.source: builtin:tiny-mistral` makes (or reuses) it in scratch, so the
CPU demo and the tests run the same pipeline as a 7B run, offline. The
tokenizer is the real 32,768-token Mistral v3 vocabulary (with the [INST]
control tokens), shipped gzipped in `job/assets`; the weights are random.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from importlib import resources
from pathlib import Path

from job.logs import get_logger

log = get_logger(__name__)

BUILTIN_PREFIX = "builtin:"
TINY_MISTRAL = "tiny-mistral"

# Small enough for seconds per step on 2 CPU cores; the embedding dominates (vocab 32,768).
TINY_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0,
}

TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "add_bos_token": True,
    "add_eos_token": False,
    "clean_up_tokenization_spaces": False,
    "model_max_length": 32768,
}


def write_tokenizer(directory: Path) -> None:
    """The Mistral v3 tokenizer files (no chat template, like the base model's)."""
    directory.mkdir(parents=True, exist_ok=True)
    packed = resources.files("job.assets").joinpath("mistral-v3-tokenizer.json.gz").read_bytes()
    (directory / "tokenizer.json").write_bytes(gzip.decompress(packed))
    (directory / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))


def ensure_tiny_model(directory: Path, seed: int = 0) -> Path:
    """Build the tiny model directory once; later calls reuse it."""
    if (directory / "config.json").is_file() and (directory / "model.safetensors").is_file():
        return directory
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig

    staging = directory.with_name(f".{directory.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    write_tokenizer(staging)
    config = MistralConfig(vocab_size=32768, bos_token_id=1, eos_token_id=2, **TINY_CONFIG)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = 1, 2
    model.save_pretrained(staging, safe_serialization=True)
    directory.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(staging, directory)
    log.info("tiny_model_built", path=str(directory), parameters=sum(p.numel() for p in model.parameters()))
    return directory
