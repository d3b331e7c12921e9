"""The fused optimizer step: one pure-tensor update per optimizer, run eagerly or through torch.compile.

Each `*_update` function is the whole AdamW step for one flat chunk (load weights and states, update
in fp32, store each narrower tensor Kahan-compensated, stochastically rounded or fp8 block-quantized)
written once. Eager it is the reference; compiled (inductor, `emulate_precision_casts`) it is one
kernel per chunk and bitwise the same. Rounding noise is a hash of (seed, step, parameter, element),
so no noise tensors and no generator: an element gets the same noise in any chunk, compiled or not.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from job.logs import get_logger

BLOCK = 256  # elements per fp8 scale in adamw_8bit_sr
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
FP8_TINY = 2.0**-9  # smallest positive e4m3 subnormal
CPU_COMPILE_MIN = 1 << 20
"""On CPU a tensor smaller than this runs eagerly: compiling (~30 s once) would cost more than it saves."""

_M32 = (1 << 32) - 1
_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: consecutive elements land far apart before mixing
_SALTS = (0x243F6A88, 0x85A308D3, 0x13198A2E)  # one independent noise stream per rounded tensor

log = get_logger(__name__)


def _i32(x: int) -> int:
    """`x` mod 2^32 as a signed 32-bit value (what an int32 tensor holds)."""
    x &= _M32
    return x - (1 << 32) if x >= 1 << 31 else x


def _fmix32(h: Tensor) -> Tensor:
    """murmur3's 32-bit finalizer on int32 with wraparound; masks make the right shifts logical."""
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _i32(0x85EBCA6B)
    h = h ^ ((h >> 13) & 0x7FFFF)
    h = h * _i32(0xC2B2AE35)
    return h ^ ((h >> 16) & 0xFFFF)


def _mix_py(h: int) -> int:
    """`_fmix32` on a Python int (unsigned 32-bit)."""
    h &= _M32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def noise_base(seed: int, step: int, index: int, start: int) -> int:
    """The int32 counter offset for the chunk whose first element is `start` of parameter `index`.

    Element e of the parameter hashes `e * GOLDEN + key(seed, step, index, e >> 32)` (mod 2^32); a chunk
    adds its own arange, so chunks must not straddle a multiple of 2^32 (power-of-two chunk sizes don't).
    """
    key = 0
    for part in (seed, step, index, start >> 32):  # each part mixed in whole, 32 bits at a time
        for word in (part & _M32, (part >> 32) & _M32):
            key = _mix_py(key ^ word) + _GOLDEN
    return _i32((start & _M32) * _GOLDEN + key)


def _uniform(counter: Tensor, salt: int) -> Tensor:
    """A uniform fp32 in [0, 1) per element, 24 bits: the hash of the element's counter in stream `salt`."""
    return (_fmix32(counter ^ _i32(salt)) & 0xFFFFFF).float() * 2.0**-24


def _uniform_pair(counter: Tensor, salt: int) -> tuple[Tensor, Tensor]:
    """Two uniform fp32s in [0, 1) per element, 16 bits each (all a bf16 rounding uses), from one hash."""
    h = _fmix32(counter ^ _i32(salt))
    return (h & 0xFFFF).float() * 2.0**-16, ((h >> 16) & 0xFFFF).float() * 2.0**-16


_FORMATS = {torch.bfloat16: (7, 0.0), torch.float16: (10, 2.0**-24), FP8: (3, 2.0**-9)}
"""Stored formats: (mantissa bits, spacing of its subnormals where that is above fp32's)."""


def _round(x: Tensor, u: Tensor, dtype: torch.dtype) -> Tensor:
    """fp32 `x` rounded at random to one of its two neighbours in `dtype` (E[result] = x), as fp32.

    The nearer neighbour `near` is a plain cast; the other one is the cast of `near` moved 0.625 of a
    spacing toward `x` (|near| * 0.625 * 2^-mantissa lands between 0.5 and 1.5 spacings on either side,
    also at a power of two); `x` takes the other one with probability |x - near| / spacing. Only float
    arithmetic and casts, all exact or correctly rounded: no bit reinterpretation, which inductor's
    CPU code does one element at a time (2.6x slower than the whole update without it).
    """
    mantissa, subnormal = _FORMATS[dtype]
    near = x.to(dtype).float()
    rest = x - near  # exact
    step = near.abs() * (0.625 * 2.0**-mantissa)
    if subnormal:
        step = step.clamp(min=0.625 * subnormal)
    other = (near + torch.copysign(step, rest)).to(dtype).float()
    return torch.where(u * (other - near).abs() < rest.abs(), other, near)


def _counter(n: int, base: int, device: torch.device) -> Tensor:
    return torch.arange(n, dtype=torch.int32, device=device) * _i32(_GOLDEN) + base


def _sqrt(x: Tensor) -> Tensor:
    """Correctly rounded fp32 sqrt, eager or compiled.

    CPU eager `torch.sqrt` is off by an ulp on ~0.7% of fp32 inputs (inductor's is exact). Through
    float64 it is exact: a float's square root is never within 2^-51 (relative) of a midpoint between
    two floats, and the float64 root errs by at most an ulp (2^-52).
    """
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        return x.double().sqrt().float()
    return x.sqrt()


def _adamw(w: Tensor, g: Tensor, m: Tensor, v: Tensor, hp: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """torch.optim.AdamW's update in fp32, as separate roundings (no fused op whose eager kernel uses FMA)."""
    decay, one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, eps, neg_step_size = hp.unbind()
    w = w * decay
    m = m + (g - m) * one_minus_beta1
    v = v * beta2 + g * g * one_minus_beta2
    w = w + m / (_sqrt(v) / bc2_sqrt + eps) * neg_step_size
    return w, m, v


def kahan_update(w: Tensor, comp: Tensor, g: Tensor, m: Tensor, v: Tensor, base: int, hp: Tensor) -> None:
    """`adamw_kahan` on one chunk of 16-bit weights: bf16 m and v stochastically rounded, Kahan weights."""
    counter = _counter(w.numel(), base, w.device)
    w32 = w.float() + comp.float()
    w32, m32, v32 = _adamw(w32, g.float(), m.float(), v.float(), hp)
    # beta2's 0.1% decay is below half a bf16 ulp: rounded to nearest, v would never decay.
    u_m, u_v = _uniform_pair(counter, _SALTS[0])
    m.copy_(_round(m32, u_m, m.dtype))
    v.copy_(_round(v32, u_v, v.dtype))
    low = w32.to(w.dtype)  # round to nearest; what it lost goes to the compensation buffer
    w.copy_(low)
    comp.copy_(w32 - low.float())  # the round trip inductor drops without emulate_precision_casts


def master_update(w: Tensor, master: Tensor, g: Tensor, m: Tensor, v: Tensor, base: int, hp: Tensor) -> None:
    """`adamw_fp32_master` on one chunk: fp32 master, m and v; the weights are the master rounded to nearest."""
    w32, m32, v32 = _adamw(master, g.float(), m, v, hp)
    master.copy_(w32)
    m.copy_(m32)
    v.copy_(v32)
    w.copy_(w32.to(w.dtype))


def _quantize(x: Tensor, u: Tensor, floor: bool) -> tuple[Tensor, Tensor]:
    """fp32 blocks -> (e4m3 values stochastically rounded, fp32 scale per block); `floor` keeps positives > 0."""
    amax = x.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    y = _round((x / scale).clamp(-FP8_MAX, FP8_MAX), u, FP8)
    if floor:
        y = torch.where(x > 0, y.clamp(min=FP8_TINY), y)
    return y.to(FP8), scale.view(-1)


def sr8_update(w: Tensor, g: Tensor, mq: Tensor, ms: Tensor, rq: Tensor, rs: Tensor, base: int, hp: Tensor) -> None:
    """`adamw_8bit_sr` on one chunk: m and √v as e4m3 with a scale per BLOCK, weights stochastically rounded.

    `ms` and `rs` are the chunk's scales; a chunk starts on a block boundary. A partial last block
    (eager only) is padded with zeros, as the scale of a block only counts its real elements.
    """
    n, nb = w.numel(), ms.numel()
    if n < nb * BLOCK:
        padded = [torch.zeros(nb * BLOCK, dtype=t.dtype, device=t.device) for t in (w, g, mq, rq)]
        for dst, src in zip(padded, (w, g, mq, rq), strict=True):
            dst[:n] = src
        sr8_update(padded[0], padded[1], padded[2], ms, padded[3], rs, base, hp)
        for dst, src in zip((w, mq, rq), (padded[0], padded[2], padded[3]), strict=True):
            dst.copy_(src[:n])
        return
    # Everything as (block, element): the scale's reduction and the update share one loop over blocks.
    counter = _counter(n, base, w.device).view(nb, BLOCK)
    m32 = mq.view(nb, BLOCK).float() * ms[:, None]
    r32 = rq.view(nb, BLOCK).float() * rs[:, None]
    w32, m32, v32 = _adamw(w.view(nb, BLOCK).float(), g.view(nb, BLOCK).float(), m32, r32 * r32, hp)
    qm, sm = _quantize(m32, _uniform(counter, _SALTS[0]), floor=False)
    qr, sr = _quantize(_sqrt(v32), _uniform(counter, _SALTS[1]), floor=True)
    mq.copy_(qm.view(-1))
    ms.copy_(sm)
    rq.copy_(qr.view(-1))
    rs.copy_(sr)
    if w.dtype in _FORMATS:
        w32 = _round(w32, _uniform(counter, _SALTS[2]), w.dtype)
    w.copy_(w32.view(-1))


# Compilation --------------------------------------------------------------------------------------
_compiled: dict[Callable[..., None], Callable[..., None]] = {}
_broken: set[Callable[..., None]] = set()


def can_compile(device: torch.device) -> bool:
    """Whether inductor can build kernels here: CUDA (Triton ships with torch), or CPU with a C++ compiler."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    try:
        from torch._inductor import cpp_builder

        return shutil.which(cpp_builder.get_cpp_compiler()) is not None
    except Exception:  # a torch without the builder, or a compiler it cannot name
        return False


_OPTIONS = {
    "emulate_precision_casts": True,
    "eager_numerics.division_rounding": True,
    "eager_numerics.disable_ftz": True,
    "cpp.dynamic_threads": True,
}
"""emulate_precision_casts: without it inductor folds `x.to(bf16).float()` into x (the Kahan compensation
and every stochastic rounding would vanish) and Triton fuses multiply-adds. division_rounding and
disable_ftz: Triton's `/` is approximate and flushes denormals unless told; eager CUDA does neither.
cpp.dynamic_threads: CPU kernels compiled for a small first chunk would otherwise run on one thread."""


def _compile(fn: Callable[..., None]) -> Callable[..., None]:
    if fn not in _compiled:  # dynamic: one graph for every chunk size, not one per tensor shape
        _compiled[fn] = torch.compile(fn, dynamic=True, fullgraph=True, options=_OPTIONS)
    return _compiled[fn]


def run(fn: Callable[..., None], compiled: bool, *args: Any) -> bool:
    """`fn(*args)`, compiled when asked and still working; returns whether it ran compiled.

    Any compile failure falls back to the eager function (bitwise the same) with one warning line.
    """
    if compiled and fn not in _broken:
        try:
            _compile(fn)(*args)
            return True
        except torch.OutOfMemoryError:  # not a compile failure: eager would need more
            raise
        except Exception as exc:  # a compile failure must never stop a run
            _broken.add(fn)
            log.warning("optimizer_compile_failed", function=fn.__name__, error=f"{type(exc).__name__}: {exc}"[:500])
    fn(*args)
    return False
