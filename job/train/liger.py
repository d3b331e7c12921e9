"""Liger's Triton kernels for RMSNorm, SwiGLU and RoPE on the loaded model (`model.liger_kernels`, compile off).

The kernels come from the installed `liger-kernel` package (the `liger` extra; the image has it): nothing is
fetched at run time. Liger's loss kernels stay off: TRL's own chunked LM head already computes the loss
without the full logits, and Liger's fused cross-entropy would replace that forward (TRL 1.16 refuses it).
The fast path (`job.train.fastpath`) decides whether this runs: a CUDA GPU, the package, compile off.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from job.errors import ConfigError
from job.logs import get_logger

log = get_logger(__name__)

KERNELS: dict[str, bool] = {
    "rope": True,
    "rms_norm": True,
    "swiglu": True,
    "cross_entropy": False,
    "fused_linear_cross_entropy": False,
}
"""Liger's switches as this job sets them (the names of its `apply_liger_kernel_to_<model>` arguments)."""
LAYER_KERNELS = ("rope", "rms_norm", "swiglu")


def liger_appliers() -> Mapping[str, Callable[..., None]]:
    """Liger's model type -> `apply_liger_kernel_to_<model>` table (imports liger_kernel, which needs Triton)."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as exc:
        raise ConfigError(
            f"model.liger_kernels is true but liger-kernel cannot be imported: {exc}",
            hint="install the `liger` extra (pip install 'sft-job[liger]'; the image has it), "
            "or set model.liger_kernels: false",
        ) from None
    return MODEL_TYPE_TO_APPLY_LIGER_FN


def apply_liger_kernels(model: Any, appliers: Mapping[str, Callable[..., None]] | None = None) -> dict[str, bool]:
    """Patch `model` (the instance, its decoder layers included) with Liger's layer kernels; return the
    switches passed. ConfigError when Liger has no kernels for this architecture."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    table = liger_appliers() if appliers is None else appliers
    apply = table.get(model_type) if model_type else None
    if apply is None:
        raise ConfigError(
            f"model.liger_kernels is true but Liger has no kernels for model type {model_type!r}",
            hint=f"Liger supports {', '.join(sorted(table)[:12])}...; set model.liger_kernels: false",
        )
    accepted = inspect.signature(apply).parameters
    switches = {name: on for name, on in KERNELS.items() if name in accepted}
    apply(model=model, **switches)
    applied = [name for name in LAYER_KERNELS if switches.get(name)]
    log.info(
        "liger_kernels",
        model_type=model_type,
        applied=applied,
        not_available=[name for name in LAYER_KERNELS if name not in accepted],
        loss_kernels="off (TRL's chunked LM head computes the loss)",
    )
    return switches
