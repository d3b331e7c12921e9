"""Precision-safe AdamW variants for training bf16 weights, and what each costs in memory.

Why: with bf16 weights an update smaller than about |w|·2⁻⁹ rounds away, so at lr 5e-6 plain
`adamw_torch_fused` (bf16 weights and, under transformers v5's `dtype="auto"`, bf16 states) leaves
most weights unchanged. Every optimizer here runs torch.optim.AdamW's update in fp32 and then stores
each narrower tensor either compensated (Kahan) or stochastically rounded, so nothing is lost on
average. With fp32 weights all three reduce to AdamW (bitwise equal to torch.optim.AdamW for
`adamw_kahan` and `adamw_fp32_master`).
How each is handed to Trainer and how its state saves and resumes: docs/optimizers.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from job.optim import fused
from job.optim.fused import BLOCK, CPU_COMPILE_MIN, FP8, can_compile, noise_base

DEFAULT_OPTIMIZER = "adamw_kahan"
CHUNK = 1 << 23
"""Elements updated at once by the eager step (its fp32 temporaries: ~12 x 4 bytes each); a power of two."""
COMPILED_CHUNK = 1 << 26
"""Elements per compiled call of adamw_kahan and adamw_fp32_master, whose kernels keep no temporaries:
fewer, larger calls keep Python's ~60 us per call behind the GPU (7B: ~300 calls, not 961).
adamw_8bit_sr's kernels keep up to 16 bytes per element between passes: it stays at CHUNK."""
_LOW16 = torch.bfloat16, torch.float16


class _ChunkedAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update (decoupled weight decay, bias correction) in fp32, chunk by chunk.

    Each subclass names its fused update (`_update`, from `job.optim.fused`) and the tensors it takes
    for one chunk (`_chunk`). Weights that need no rounding (`_exact`) take torch.optim.AdamW's own
    operations instead, so they stay bitwise equal to it. `compiled`: None picks (CUDA; CPU tensors of
    at least CPU_COMPILE_MIN elements where a C++ compiler exists), True or False forces it.
    """

    state_keys: tuple[str, ...] = ()
    _update: Callable[..., None]
    _align = 1  # a compiled call takes a multiple of this many elements
    _compiled_chunk = COMPILED_CHUNK

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        seed: int = 0,
        chunk_size: int | None = None,
        compiled: bool | None = None,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid AdamW hyper-parameters: {lr=} {betas=} {eps=} {weight_decay=}")
        if chunk_size is not None and (chunk_size < BLOCK or chunk_size & (chunk_size - 1)):
            # fp8 blocks must not straddle chunks, nor noise counters a multiple of 2^32.
            raise ValueError(f"chunk_size must be a power of two >= {BLOCK}, got {chunk_size}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "seed": seed}
        super().__init__(params, defaults)
        self.chunk_size = chunk_size
        self.compiled = compiled

    def _use_compiled(self, p: Tensor) -> bool:
        if self.compiled is not None:
            return self.compiled
        # On CPU compiling (~30 s once a process) pays off only for big tensors; tiny models stay eager.
        return can_compile(p.device) and (p.device.type != "cpu" or p.numel() >= CPU_COMPILE_MIN)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = -1
        for group in self.param_groups:
            scalars: dict[tuple[torch.device, int], Tensor] = {}
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse or not p.is_contiguous() or not p.grad.is_contiguous():
                    raise RuntimeError("these optimizers need dense, contiguous parameters and gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    self._init(p, state)
                state["step"] += 1
                t = state["step"]
                if self._exact(p):
                    self._exact_step(p, state, group, t)
                    continue
                hp = scalars.get((p.device, t))
                if hp is None:
                    hp = scalars[p.device, t] = _scalars(group, t, p.device)
                self._fused_step(p, state, hp, (group["seed"], t, index))
        return loss

    def _fused_step(self, p: Tensor, state: dict[str, Any], hp: Tensor, key: tuple[int, int, int]) -> None:
        """The fused update over `p`, chunk by chunk; `key` (seed, step, parameter index) seeds the noise."""
        compiled = self._use_compiled(p)
        chunk = self.chunk_size or (self._compiled_chunk if compiled else CHUNK)
        for lo in range(0, p.numel(), chunk):
            hi = min(lo + chunk, p.numel())
            # A ragged end (fp8: a partial block) runs eagerly: one compiled graph, not two.
            cut = lo + (hi - lo) // self._align * self._align if compiled else hi
            for a, b, how in ((lo, cut, compiled), (cut, hi, False)):
                if a < b:
                    fused.run(self._update, how, *self._chunk(p, state, a, b), noise_base(*key, a), hp)

    def _exact_step(self, p: Tensor, state: dict[str, Any], group: dict[str, Any], t: int) -> None:
        """Weights kept in full: the same operations, in the same order, as torch.optim.AdamW's single-tensor path."""
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        step_size = lr / (1 - beta1**t)
        bc2_sqrt = math.sqrt(1 - beta2**t)
        chunk = self.chunk_size or CHUNK
        for lo in range(0, p.numel(), chunk):
            hi = min(lo + chunk, p.numel())
            g = p.grad.view(-1)[lo:hi].float()
            w = p.view(-1)[lo:hi]
            m, v = state["exp_avg"].view(-1)[lo:hi], state["exp_avg_sq"].view(-1)[lo:hi]
            if wd != 0:
                w.mul_(1 - lr * wd)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            w.addcdiv_(m, (v.sqrt() / bc2_sqrt).add_(eps), value=-step_size)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a `state_dict()`, keeping the saved dtypes (torch would cast them to the parameter's)."""
        saved = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        by_id = dict(zip(saved_ids, params, strict=True))
        for key, entry in saved.items():
            p = by_id[key]
            expected = {"step", *self._keys(p)}
            if set(entry) != expected:
                raise ValueError(
                    f"{type(self).__name__}: saved optimizer state has {sorted(entry)}, expected {sorted(expected)}"
                    " (was the checkpoint written by another optimizer?)"
                )
            self.state[p] = {k: v.to(p.device) if isinstance(v, Tensor) else v for k, v in entry.items()}

    # Per-optimizer hooks -------------------------------------------------------------------------
    def _keys(self, p: Tensor) -> tuple[str, ...]:
        return self.state_keys

    def _init(self, p: Tensor, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def _exact(self, p: Tensor) -> bool:
        return False

    def _chunk(self, p: Tensor, state: dict[str, Any], lo: int, hi: int) -> tuple[Tensor, ...]:
        raise NotImplementedError


def _scalars(group: dict[str, Any], t: int, device: torch.device) -> Tensor:
    """The step's scalars as one fp32 tensor: no recompiles as lr changes, one transfer per group and step."""
    beta1, beta2 = group["betas"]
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    values = (1 - lr * wd, 1 - beta1, beta2, 1 - beta2, math.sqrt(1 - beta2**t), eps, -lr / (1 - beta1**t))
    return torch.tensor(values, dtype=torch.float32, device=device)


def _flat(lo: int, hi: int, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Elements lo:hi of each tensor, as flat views."""
    return tuple(t.view(-1)[lo:hi] for t in tensors)


def _state_dtype(p: Tensor) -> torch.dtype:
    # bf16 for 16-bit weights (fp16's range is too narrow for v); fp32 weights get fp32 states.
    return torch.bfloat16 if p.dtype in _LOW16 else torch.float32


class KahanAdamW(_ChunkedAdamW):
    """`adamw_kahan`: bf16 weights, bf16 m and v (stochastically rounded), and a bf16 Kahan buffer.

    The true weight is kept as weight + compensation (about 16 significant bits), so updates far below
    a bf16 ulp accumulate instead of vanishing. Bytes per parameter with bf16 weights: 2 weights +
    2 gradients + 2 m + 2 v + 2 compensation = 10 (7.25B params: 67.5 GiB). fp32 weights: plain AdamW.
    """

    _update = staticmethod(fused.kahan_update)

    def _keys(self, p: Tensor) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq", "kahan_comp") if p.dtype in _LOW16 else ("exp_avg", "exp_avg_sq")

    def _init(self, p: Tensor, state: dict[str, Any]) -> None:
        for key in self._keys(p):
            state[key] = torch.zeros_like(p, dtype=_state_dtype(p), memory_format=torch.contiguous_format)

    def _exact(self, p: Tensor) -> bool:
        return p.dtype == torch.float32

    def _chunk(self, p: Tensor, state: dict[str, Any], lo: int, hi: int) -> tuple[Tensor, ...]:
        return _flat(lo, hi, p, state["kahan_comp"], p.grad, state["exp_avg"], state["exp_avg_sq"])


class Fp32MasterAdamW(_ChunkedAdamW):
    """`adamw_fp32_master`: fp32 master weights and fp32 m, v; the bf16 model weights are their rounding.

    The reference-quality choice. Bytes per parameter with bf16 weights: 2 weights + 2 gradients +
    4 master + 4 m + 4 v = 16 (7.25B params: 108 GiB, more than a 96 GB card; fits a 141 GB H200).
    """

    _update = staticmethod(fused.master_update)

    def _keys(self, p: Tensor) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq", "master") if p.dtype != torch.float32 else ("exp_avg", "exp_avg_sq")

    def _init(self, p: Tensor, state: dict[str, Any]) -> None:
        state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        if p.dtype != torch.float32:
            state["master"] = p.detach().float().contiguous()

    def _exact(self, p: Tensor) -> bool:
        return p.dtype == torch.float32

    def _chunk(self, p: Tensor, state: dict[str, Any], lo: int, hi: int) -> tuple[Tensor, ...]:
        return _flat(lo, hi, p, state["master"], p.grad, state["exp_avg"], state["exp_avg_sq"])


class AdamW8bitSR(_ChunkedAdamW):
    """`adamw_8bit_sr`: bf16 weights stochastically rounded; m and √v in fp8 (e4m3) with a fp32 scale per 256.

    For headroom. Storing √v instead of v halves the dynamic range 8 bits must cover, and a positive
    √v never rounds to zero (that would turn m/√v into m/eps). States are stochastically rounded too,
    so beta2's slow decay survives. Bytes per parameter with bf16 weights: 2 weights + 2 gradients +
    1 m + 1 √v + 8/256 scales = 6.03 (7.25B params: 40.7 GiB).
    """

    state_keys = ("exp_avg", "exp_avg_scale", "exp_avg_sq_sqrt", "exp_avg_sq_sqrt_scale")
    _update = staticmethod(fused.sr8_update)
    _align = BLOCK
    _compiled_chunk = CHUNK

    def _init(self, p: Tensor, state: dict[str, Any]) -> None:
        blocks = -(-p.numel() // BLOCK)
        for key in ("exp_avg", "exp_avg_sq_sqrt"):
            state[key] = torch.zeros(p.numel(), dtype=FP8, device=p.device)
            state[f"{key}_scale"] = torch.ones(blocks, dtype=torch.float32, device=p.device)

    def _chunk(self, p: Tensor, state: dict[str, Any], lo: int, hi: int) -> tuple[Tensor, ...]:
        blocks = slice(lo // BLOCK, -(-hi // BLOCK))
        w, g, m, r = _flat(lo, hi, p, p.grad, state["exp_avg"], state["exp_avg_sq_sqrt"])
        return w, g, m, state["exp_avg_scale"][blocks], r, state["exp_avg_sq_sqrt_scale"][blocks]

    @staticmethod
    def _dequantize(q: Tensor, scale: Tensor, lo: int, hi: int) -> Tensor:
        """fp32 values of elements lo:hi of an fp8 state (for inspection; the step dequantizes in its kernel)."""
        s = scale[lo // BLOCK : -(-hi // BLOCK)].repeat_interleave(BLOCK)
        return q[lo:hi].float() * s[: hi - lo]


@dataclass(frozen=True)
class OptimizerSpec:
    """One of our optimizer choices."""

    name: str
    cls: type[_ChunkedAdamW]
    bytes_per_param: float
    """Weights + gradients + states + buffers per parameter, with bf16 weights."""
    doc: str


OUR_OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw_kahan": OptimizerSpec(
        "adamw_kahan",
        KahanAdamW,
        10.0,
        "Default. bf16 weights, bf16 m/v, bf16 Kahan compensation: 2+2+2+2+2 = 10 B/param (7B: 67.5 GiB); "
        "trains like fp32 and leaves ~25 GiB of a 96 GB card for activations.",
    ),
    "adamw_8bit_sr": OptimizerSpec(
        "adamw_8bit_sr",
        AdamW8bitSR,
        6.0 + 8 / BLOCK,
        "Headroom. bf16 weights with stochastic rounding, fp8 m and sqrt(v) with fp32 block scales: "
        "2+2+1+1+0.03 = 6.03 B/param (7B: 40.7 GiB); for longer sequences or bigger batches.",
    ),
    "adamw_fp32_master": OptimizerSpec(
        "adamw_fp32_master",
        Fp32MasterAdamW,
        16.0,
        "Reference. fp32 master weights and fp32 m/v beside bf16 weights: 2+2+4+4+4 = 16 B/param "
        "(7B: 108 GiB) - does not fit a 96 GB card with a 7B model; use it where memory allows.",
    ),
}


def is_ours(name: str) -> bool:
    """Whether `name` is one of ours (build it) rather than a transformers `optim` name (pass it through)."""
    return name in OUR_OPTIMIZERS


def _spec(name: str) -> OptimizerSpec:
    if name not in OUR_OPTIMIZERS:
        raise ValueError(f"{name!r} is not one of our optimizers ({', '.join(OUR_OPTIMIZERS)})")
    return OUR_OPTIMIZERS[name]


def trainer_optimizer(
    name: str,
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    seed: int = 0,
) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """`(cls, kwargs)` for `SFTTrainer(optimizer_cls_and_kwargs=...)`; Trainer sets per-group weight decay."""
    kwargs = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "seed": seed}
    return _spec(name).cls, kwargs


def build_optimizer(
    name: str,
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    seed: int = 0,
) -> torch.optim.Optimizer:
    """Our optimizer over `model`, grouped as Trainer does (no decay on biases and norm weights)."""
    from transformers.trainer_pt_utils import get_parameter_names

    cls, kwargs = trainer_optimizer(name, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, seed=seed)
    # The same patterns as transformers' Trainer.get_decay_parameter_names.
    patterns = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    decay = set(get_parameter_names(model, [nn.LayerNorm], patterns))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    return cls([g for g in groups if g["params"]], **kwargs)


def optimizer_state_bytes(name: str, num_params: int | Sequence[int], weight_dtype: torch.dtype | str) -> int:
    """Bytes of optimizer state (everything in `optimizer.state`) for `num_params` parameters.

    `num_params` is a total (treated as one tensor) or the element count of each parameter tensor;
    per-tensor sizes make the figure exact (fp8 block scales round up per tensor, and torch's AdamW
    keeps a 4-byte `step` tensor per parameter). Covers our names and transformers' `adamw_torch`,
    `adamw_torch_fused` (states in the weight dtype).
    """
    dtype = getattr(torch, weight_dtype) if isinstance(weight_dtype, str) else weight_dtype
    sizes = [num_params] if isinstance(num_params, int) else list(num_params)
    n, width = sum(sizes), torch.empty((), dtype=dtype).element_size()
    low = dtype in _LOW16
    if name == "adamw_kahan":
        return n * (6 if low else 8)
    if name == "adamw_fp32_master":
        return n * (12 if low else 8)
    if name == "adamw_8bit_sr":
        return 2 * n + 2 * 4 * sum(-(-s // BLOCK) for s in sizes)
    if name in ("adamw_torch", "adamw_torch_fused"):
        return 2 * width * n + 4 * len(sizes)
    raise ValueError(f"no memory model for optimizer {name!r}; known: {', '.join(KNOWN_STATE_MODELS)}")


KNOWN_STATE_MODELS = (*OUR_OPTIMIZERS, "adamw_torch", "adamw_torch_fused")
