"""FLOP accounting for decoder-only training: peak bf16 FLOP/s per GPU, FLOPs per token, MFU and HFU.

Kept free of the trainer so that the planner (`job.plan.memory`) and the step metrics can both import it.
The counting convention is PaLM's (appendix B), as torchtitan and most MFU reports use: docs/planner.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TERA = 1e12

# Dense bf16 tensor-core peaks (datasheet "with sparsity" figures halved).
PEAK_BF16_FLOPS: dict[str, float] = {
    "RTX PRO 6000 Blackwell": 503.8 * TERA,
    "H100 SXM": 989.4 * TERA,
    "H100 PCIe": 756.5 * TERA,
    "H100 NVL": 835.5 * TERA,
    "H200": 989.4 * TERA,
    "H200 NVL": 835.5 * TERA,
    "A100": 312.0 * TERA,
    "L40S": 362.05 * TERA,
}

# (substrings that must all appear in the CUDA device name, table key); the most specific pattern first,
# because "NVIDIA H100 PCIe" and "NVIDIA H100 80GB HBM3" share the "H100" stem.
_NAME_PATTERNS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("RTX PRO 6000", "BLACKWELL"), "RTX PRO 6000 Blackwell"),
    (("H100", "PCIE"), "H100 PCIe"),
    (("H100", "NVL"), "H100 NVL"),
    (("H100",), "H100 SXM"),
    (("H200", "NVL"), "H200 NVL"),
    (("H200",), "H200"),
    (("A100",), "A100"),
    (("L40S",), "L40S"),
)


@dataclass(frozen=True)
class GpuInfo:
    """What the planner and the metrics need to know about the GPU in use."""

    name: str
    """The device name as CUDA reports it, e.g. "NVIDIA RTX PRO 6000 Blackwell Server Edition"."""
    memory_bytes: int
    """Device memory this process may use (`usable_memory_bytes`)."""
    peak_flops: float | None
    """Dense bf16 peak FLOP/s from `PEAK_BF16_FLOPS`; None when the model is not in the table."""


@dataclass(frozen=True)
class FlopShape:
    """The shape of a decoder that the FLOP count needs."""

    num_layers: int
    """Decoder layers (L)."""
    attention_width: int
    """Query heads × head dim (d): the width of the score and value matmuls."""


def table_key(gpu_name: str) -> str | None:
    """The `PEAK_BF16_FLOPS` key for a CUDA device name (case-insensitive substring match), or None."""
    upper = gpu_name.upper()
    for needles, key in _NAME_PATTERNS:
        if all(n in upper for n in needles):
            return key
    return None


def peak_bf16_flops(gpu_name: str) -> float | None:
    """Dense bf16 peak FLOP/s for a device name, or None when the GPU is not in the table."""
    key = table_key(gpu_name)
    return None if key is None else PEAK_BF16_FLOPS[key]


def detect_gpu(device: int = 0) -> GpuInfo | None:
    """The visible CUDA device's name, memory and peak, or None when there is no GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(device)
    return GpuInfo(name=props.name, memory_bytes=usable_memory_bytes(device), peak_flops=peak_bf16_flops(props.name))


def usable_memory_bytes(device: int = 0) -> int:
    """The card's memory, or the share this process may use when it was capped
    (`torch.cuda.set_per_process_memory_fraction`: e.g. an H200 imitating a 96 GB card)."""
    import torch

    total = int(torch.cuda.get_device_properties(device).total_memory)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    return int(total * min(fraction(device), 1.0)) if fraction is not None else total


def flop_shape(config: Any) -> FlopShape:
    """Layers and attention width from a transformers `PretrainedConfig` (or anything with those attributes)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(text.num_attention_heads)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return FlopShape(num_layers=int(text.num_hidden_layers), attention_width=heads * int(head_dim))


def flops_per_token(
    shape: FlopShape,
    num_params: int,
    seq_length: int,
    *,
    embedding_params: int = 0,
    recompute: bool = False,
) -> float:
    """Training FLOPs per token (forward + backward).

    `embedding_params` is the size of the input embedding table when it is *not* tied to the LM head
    (its lookup does no matmul). With `recompute=False` this is the model FLOP count that MFU uses;
    with `recompute=True` it adds the second forward that full activation recomputation runs (HFU).
    """
    if num_params <= 0 or seq_length <= 0:
        raise ValueError("num_params and seq_length must be positive")
    matmul_params = num_params - embedding_params
    attention = shape.num_layers * shape.attention_width * seq_length
    if recompute:
        return 8.0 * matmul_params + 16.0 * attention
    return 6.0 * matmul_params + 12.0 * attention


def mfu(tokens_per_second: float, model_flops_per_token: float, peak_flops: float) -> float:
    """Model FLOP utilisation: useful FLOPs per second over the GPU's peak (recomputation not counted)."""
    return tokens_per_second * model_flops_per_token / peak_flops


def hfu(tokens_per_second: float, hardware_flops_per_token: float, peak_flops: float) -> float:
    """Hardware FLOP utilisation: executed FLOPs per second (recomputation counted) over the GPU's peak."""
    return tokens_per_second * hardware_flops_per_token / peak_flops
