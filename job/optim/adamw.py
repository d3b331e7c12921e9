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

DEFAULT_OPTIMIZER = "adamw_kahan"
BLOCK = 256  # elements per fp8 scale in adamw_8bit_sr
CHUNK = 1 << 23  # elements updated at once; a multiple of BLOCK
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
FP8_TINY = 2.0**-9  # smallest positive e4m3 subnormal
_LOW16 = torch.bfloat16, torch.float16
_MASK = 0x9E3779B97F4A7C15


def _round_stochastic(x: Tensor, drop: int, gen: torch.Generator) -> Tensor:
    """fp32 `x` with its lowest `drop` mantissa bits rounded away at random, so E[result] = x.

    Adding uniform noise below the kept bits and truncating rounds up with probability equal to the
    dropped fraction; float bits are sign-magnitude, so this works on negative numbers too.
    """
    noise = torch.randint(0, 1 << drop, x.shape, dtype=torch.int32, device=x.device, generator=gen)
    bits = x.contiguous().view(torch.int32) + noise
    return bits.bitwise_and_(-(1 << drop)).view(torch.float32)


class _ChunkedAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update (decoupled weight decay, bias correction) in fp32, chunk by chunk.

    Subclasses say how weights and moments are stored: `_init`, `_load_moments`, `_store_moments`,
    `_load_weight`, `_store_weight`. Values handed to the `_store_*` hooks are fp32 chunks.
    """

    state_keys: tuple[str, ...] = ()

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        seed: int = 0,
        chunk_size: int = CHUNK,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid AdamW hyper-parameters: {lr=} {betas=} {eps=} {weight_decay=}")
        if chunk_size % BLOCK:
            raise ValueError(f"chunk_size must be a multiple of {BLOCK}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "seed": seed}
        super().__init__(params, defaults)
        self.chunk_size = chunk_size
        self._generators: dict[torch.device, torch.Generator] = {}

    def _rng(self, device: torch.device, *key: int) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        h = 0
        for k in key:  # a cheap mix; the seed only needs to differ per (seed, step, param, chunk)
            h = (h * _MASK + k + 1) % (1 << 63)
        gen.manual_seed(h)
        return gen

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = -1
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse or not p.is_contiguous():
                    raise RuntimeError("these optimizers need dense, contiguous parameters and gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    self._init(p, state)
                state["step"] += 1
                t = state["step"]
                step_size = lr / (1 - beta1**t)
                bc2_sqrt = math.sqrt(1 - beta2**t)
                grad = p.grad.reshape(-1)
                for c, lo in enumerate(range(0, p.numel(), self.chunk_size)):
                    hi = min(lo + self.chunk_size, p.numel())
                    gen = self._rng(p.device, group["seed"], t, index, c)
                    g = grad[lo:hi].float()
                    w = self._load_weight(p, state, lo, hi)
                    m, v = self._load_moments(p, state, lo, hi)
                    # Same operations, in the same order, as torch.optim.AdamW's single-tensor path.
                    if wd != 0:
                        w.mul_(1 - lr * wd)
                    m.lerp_(g, 1 - beta1)
                    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    w.addcdiv_(m, (v.sqrt() / bc2_sqrt).add_(eps), value=-step_size)
                    self._store_moments(p, state, lo, hi, m, v, gen)
                    self._store_weight(p, state, lo, hi, w, gen)
        return loss

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

    # Storage hooks -------------------------------------------------------------------------------
    def _keys(self, p: Tensor) -> tuple[str, ...]:
        return self.state_keys

    def _init(self, p: Tensor, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def _load_moments(self, p: Tensor, state: dict[str, Any], lo: int, hi: int) -> tuple[Tensor, Tensor]:
        return state["exp_avg"].view(-1)[lo:hi].float(), state["exp_avg_sq"].view(-1)[lo:hi].float()

    def _store_moments(
        self, p: Tensor, state: dict[str, Any], lo: int, hi: int, m: Tensor, v: Tensor, gen: torch.Generator
    ) -> None:
        for key, value in (("exp_avg", m), ("exp_avg_sq", v)):
            dst = state[key].view(-1)[lo:hi]
            if dst.dtype == torch.bfloat16:
                # beta2's 0.1% decay is below half a bf16 ulp: rounded to nearest, v would never decay.
                value = _round_stochastic(value, 16, gen)
            if dst.data_ptr() != value.data_ptr():
                dst.copy_(value)

    def _load_weight(self, p: Tensor, state: dict[str, Any], lo: int, hi: int) -> Tensor:
        return p.view(-1)[lo:hi].float()

    def _store_weight(
        self, p: Tensor, state: dict[str, Any], lo: int, hi: int, w: Tensor, gen: torch.Generator
    ) -> None:
        dst = p.view(-1)[lo:hi]
        if dst.data_ptr() != w.data_ptr():
            dst.copy_(w)


def _state_dtype(p: Tensor) -> torch.dtype:
    # bf16 for 16-bit weights (fp16's range is too narrow for v); fp32 weights get fp32 states.
    return torch.bfloat16 if p.dtype in _LOW16 else torch.float32


class KahanAdamW(_ChunkedAdamW):
    """`adamw_kahan`: bf16 weights, bf16 m and v (stochastically rounded), and a bf16 Kahan buffer.

    The true weight is kept as weight + compensation (about 16 significant bits), so updates far below
    a bf16 ulp accumulate instead of vanishing. Bytes per parameter with bf16 weights: 2 weights +
    2 gradients + 2 m + 2 v + 2 compensation = 10 (7.25B params: 67.5 GiB). fp32 weights: plain AdamW.
    """

    def _keys(self, p: Tensor) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq", "kahan_comp") if p.dtype in _LOW16 else ("exp_avg", "exp_avg_sq")

    def _init(self, p: Tensor, state: dict[str, Any]) -> None:
        for key in self._keys(p):
            state[key] = torch.zeros_like(p, dtype=_state_dtype(p), memory_format=torch.contiguous_format)

    def _load_weight(self, p: Tensor, state: dict[str, Any], lo: int, hi: int) -> Tensor:
        w = p.view(-1)[lo:hi].float()
        if "kahan_comp" in state:
            w.add_(state["kahan_comp"].view(-1)[lo:hi].float())
        return w

    def _store_weight(
        self, p: Tensor, state: dict[str, Any], lo: int, hi: int, w: Tensor, gen: torch.Generator
    ) -> None:
        dst = p.view(-1)[lo:hi]
        if "kahan_comp" not in state:
            if dst.data_ptr() != w.data_ptr():
                dst.copy_(w)
            return
        dst.copy_(w)  # round to nearest; what it lost goes to the compensation buffer
        state["kahan_comp"].view(-1)[lo:hi].copy_(w.sub_(dst.float()))


class Fp32MasterAdamW(_ChunkedAdamW):
    """`adamw_fp32_master`: fp32 master weights and fp32 m, v; the bf16 model weights are their rounding.

    The reference-quality choice. Bytes per parameter with bf16 weights: 2 weights + 2 gradients +
    4 master + 4 m + 4 v = 16 (7.25B params: 108 GiB, more than a 96 GB card; fits a 141 GB H200).
    """

    def _keys(self, p: Tensor) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq", "master") if p.dtype != torch.float32 else ("exp_avg", "exp_avg_sq")

    def _init(self, p: Tensor, state: dict[str, Any]) -> None:
        state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        if p.dtype != torch.float32:
            state["master"] = p.detach().float().contiguous()

    def _load_weight(self, p: Tensor, state: dict[str, Any], lo: int, hi: int) -> Tensor:
        return state["master"].view(-1)[lo:hi] if "master" in state else p.view(-1)[lo:hi]


class AdamW8bitSR(_ChunkedAdamW):
    """`adamw_8bit_sr`: bf16 weights stochastically rounded; m and √v in fp8 (e4m3) with a fp32 scale per 256.

    For headroom. Storing √v instead of v halves the dynamic range 8 bits must cover, and a positive
    √v never rounds to zero (that would turn m/√v into m/eps). States are stochastically rounded too,
    so beta2's slow decay survives. Bytes per parameter with bf16 weights: 2 weights + 2 gradients +
    1 m + 1 √v + 8/256 scales = 6.03 (7.25B params: 40.7 GiB).
    """

    state_keys = ("exp_avg", "exp_avg_scale", "exp_avg_sq_sqrt", "exp_avg_sq_sqrt_scale")

    def _init(self, p: Tensor, state: dict[str, Any]) -> None:
        blocks = -(-p.numel() // BLOCK)
        for key in ("exp_avg", "exp_avg_sq_sqrt"):
            state[key] = torch.zeros(p.numel(), dtype=FP8, device=p.device)
            state[f"{key}_scale"] = torch.ones(blocks, dtype=torch.float32, device=p.device)

    @staticmethod
    def _dequantize(q: Tensor, scale: Tensor, lo: int, hi: int) -> Tensor:
        s = scale[lo // BLOCK : -(-hi // BLOCK)]
        out = torch.zeros(s.numel() * BLOCK, dtype=torch.float32, device=q.device)
        out[: hi - lo].copy_(q[lo:hi])
        return out.view(-1, BLOCK).mul_(s[:, None]).view(-1)[: hi - lo]

    @staticmethod
    def _quantize(x: Tensor, q: Tensor, scale: Tensor, lo: int, hi: int, gen: torch.Generator, floor: bool) -> None:
        s = scale[lo // BLOCK : -(-hi // BLOCK)]
        padded = x.new_zeros(s.numel() * BLOCK)
        padded[: hi - lo].copy_(x)
        blocks = padded.view(-1, BLOCK)
        amax = blocks.abs().amax(dim=1)
        new_scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        y = (blocks / new_scale[:, None]).clamp_(-FP8_MAX, FP8_MAX)
        y = _round_stochastic(y, 20, gen)  # e4m3 keeps 3 of fp32's 23 mantissa bits
        if floor:  # keep positive values positive
            y = torch.where(blocks > 0, y.clamp(min=FP8_TINY), y)
        q[lo:hi].copy_(y.view(-1)[: hi - lo])
        s.copy_(new_scale)

    def _load_moments(self, p: Tensor, state: dict[str, Any], lo: int, hi: int) -> tuple[Tensor, Tensor]:
        m = self._dequantize(state["exp_avg"], state["exp_avg_scale"], lo, hi)
        r = self._dequantize(state["exp_avg_sq_sqrt"], state["exp_avg_sq_sqrt_scale"], lo, hi)
        return m, r.square_()

    def _store_moments(
        self, p: Tensor, state: dict[str, Any], lo: int, hi: int, m: Tensor, v: Tensor, gen: torch.Generator
    ) -> None:
        self._quantize(m, state["exp_avg"], state["exp_avg_scale"], lo, hi, gen, floor=False)
        self._quantize(v.sqrt(), state["exp_avg_sq_sqrt"], state["exp_avg_sq_sqrt_scale"], lo, hi, gen, floor=True)

    def _store_weight(
        self, p: Tensor, state: dict[str, Any], lo: int, hi: int, w: Tensor, gen: torch.Generator
    ) -> None:
        dst = p.view(-1)[lo:hi]
        if p.dtype in _LOW16:
            w = _round_stochastic(w, 16 if p.dtype == torch.bfloat16 else 13, gen)
        if dst.data_ptr() != w.data_ptr():
            dst.copy_(w)


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
