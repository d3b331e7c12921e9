"""One optimizer step of each of ours, compiled and eager, against torch.optim.AdamW(fused=True).

    python bench/optim_step.py                      # CPU: one Mistral-7B layer at half width (54.5M bf16)
    python bench/optim_step.py --device cuda        # Mistral-7B's 291 tensors (7.25B); --scale 0.25 for 8 layers

Every optimizer updates the same bf16 weights with the same bf16 gradients (weights change from run to
run; the time does not depend on their values). Each is built fresh, takes `--warmup` untimed steps
(the first one compiles: its extra time is reported as compile seconds), then `--steps` timed ones
(median reported; the eager runs, slow by design, one of each).
`bitwise_equal_to_reference`: from identical weights and states, 3 steps of the compiled update against
the same update run eagerly (the reference), on one layer's tensors, compared bit for bit.
The bandwidth bound is the bytes a fused step must move (bf16 weights: AdamW 14 B/param, adamw_kahan
18, adamw_8bit_sr 10.06, adamw_fp32_master 28) over the card's memory bandwidth, where it is known.
The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from job.optim.adamw import BLOCK, OUR_OPTIMIZERS

BYTES_MOVED = {
    "adamw_torch_fused": 14.0,
    "adamw_kahan": 18.0,
    "adamw_8bit_sr": 10.0 + 16 / BLOCK,
    "adamw_fp32_master": 28.0,
}
"""Bytes read and written per parameter by a fused step on bf16 weights (gradients read once)."""
BANDWIDTH = {"H200": 4.8e12, "RTX PRO 6000": 1.792e12}
"""Memory bandwidth (bytes/s) of the cards we plan for, by a substring of the device name."""


def mistral_shapes(hidden: int, inter: int, kv: int, vocab: int, layers: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a Mistral model, in model order (embedding, layers, final norm, LM head)."""
    layer = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden)]
    layer += [(inter, hidden), (inter, hidden), (hidden, inter), (hidden,), (hidden,)]
    return [(vocab, hidden), *layer * layers, (hidden,), (vocab, hidden)]


def shapes_for(device: torch.device, scale: float | None) -> list[tuple[int, ...]]:
    if device.type == "cuda":  # Mistral-7B: 291 tensors, 7.25B parameters at scale 1
        return mistral_shapes(4096, 14336, 1024, 32768, max(1, round(32 * (scale or 1.0))))
    # CPU: one decoder layer at half width (no embeddings), ~54.5M elements; --scale multiplies the layers.
    return mistral_shapes(2048, 7168, 512, 0, max(1, round(scale or 1)))[1:-1]


def make_params(shapes: list[tuple[int, ...]], device: torch.device, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter((torch.randn(shape, generator=gen, device=device) * 0.02).to(torch.bfloat16))
        p.grad = (torch.randn(shape, generator=gen, device=device) * 1e-3).to(torch.bfloat16)
        params.append(p)
    return params


def build(name: str, params: list[torch.nn.Parameter], compiled: bool | None) -> torch.optim.Optimizer:
    if name == "adamw_torch_fused":
        return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, fused=True)
    return OUR_OPTIMIZERS[name].cls(params, lr=1e-5, weight_decay=0.01, compiled=compiled)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(opt: torch.optim.Optimizer, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    opt.step()
    sync(device)
    return time.perf_counter() - start


def time_steps(
    opt: torch.optim.Optimizer, device: torch.device, warmup: int, steps: int, fused: torch.optim.Optimizer | None
) -> dict[str, float]:
    """Median step ms, compile s (the first step's excess) and, with `fused`, the median of paired ratios.

    On a shared CPU the load drifts from minute to minute: each timed step is paired with a fused
    AdamW step taken right after it, and the ratio is the median of the pairs' ratios.
    """
    first = timed(opt, device)
    for _ in range(warmup - 1):
        opt.step()
    times, ratios = [], []
    for _ in range(steps):
        times.append(timed(opt, device))
        if fused is not None:
            ratios.append(times[-1] / timed(fused, device))
    ms = statistics.median(times) * 1000
    result = {"ms": ms, "compile_s": max(0.0, first - ms / 1000)}
    if ratios:
        result["ratio"] = statistics.median(ratios)
    return result


def bitwise_check(name: str, shapes: list[tuple[int, ...]], device: torch.device) -> bool:
    """3 steps compiled vs eager from identical weights and states: every weight and state bit equal."""
    runs = []
    for compiled in (True, False):
        params = make_params(shapes, device, seed=1)
        opt = OUR_OPTIMIZERS[name].cls(params, lr=1e-3, weight_decay=0.01, compiled=compiled)
        for _ in range(3):
            opt.step()
        runs.append((params, [opt.state[p] for p in params]))
    (pa, sa), (pb, sb) = runs
    same = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(pa, pb, strict=True))
    for a, b in zip(sa, sb, strict=True):
        for key, value in a.items():
            if torch.is_tensor(value):
                same &= torch.equal(value.view(torch.uint8), b[key].view(torch.uint8))
    return bool(same)


def bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in BANDWIDTH.items() if key in name), None)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shapes = shapes_for(device, args.scale)
    numel = sum(torch.Size(s).numel() for s in shapes)
    params = make_params(shapes, device)
    names = args.optimizers.split(",")
    fused = build("adamw_torch_fused", params, None)
    rows = {"adamw_torch_fused": time_steps(fused, device, args.warmup, args.steps, None)}
    partner = fused if device.type == "cpu" else None  # a GPU keeps its pace; 7B states would not all fit
    if partner is None:
        del fused
    for name in names:
        for suffix, compiled in [("", True), ("_eager", False)][: 1 if args.no_eager else 2]:
            opt = build(name, params, compiled)
            # The eager reference is for bitwise checks, not speed: one warm-up and one timed step.
            warmup, steps = (1, 1) if compiled is False else (args.warmup, args.steps)
            rows[name + suffix] = time_steps(opt, device, warmup, steps, partner)
            del opt
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"  {name + suffix:<24} {rows[name + suffix]['ms']:>10.1f} ms", file=sys.stderr, flush=True)
    del params, partner
    layer = [*[s for s in shapes_for(device, None) if s[0] != 32768][:9], (300,), (37, 29)]
    bitwise = {name: bitwise_check(name, layer, device) for name in names}
    bw = bandwidth(device)
    fused_ms = rows["adamw_torch_fused"]["ms"]
    cpu = f"cpu ({torch.get_num_threads()} threads)"
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "torch": torch.__version__,
        "tensors": len(shapes),
        "elements": numel,
        "ms_per_step": {k: round(v["ms"], 2) for k, v in rows.items()},
        "compile_s": {k: round(v["compile_s"], 1) for k, v in rows.items() if k in names},
        "ratio_vs_fused_adamw": {
            k: round(v.get("ratio", v["ms"] / fused_ms), 2) for k, v in rows.items() if k != "adamw_torch_fused"
        },
        "bitwise_equal_to_reference": bitwise,
        "bytes_per_param": {k: round(v, 2) for k, v in BYTES_MOVED.items() if k in rows},
        "bandwidth_bound_ms": {k: round(v * numel / bw * 1000, 1) for k, v in BYTES_MOVED.items() if k in rows}
        if bw
        else None,
    }


def table(result: dict[str, Any]) -> str:
    size = f"{result['tensors']} tensors, {result['elements'] / 1e6:.1f}M bf16 elements"
    lines = [
        f"{result['device']}, torch {result['torch']}: {size}",
        f"{'optimizer':<26}{'ms/step':>10}{'x fused':>9}{'compile s':>11}{'bound ms':>10}{'bitwise':>9}",
    ]
    bound = result["bandwidth_bound_ms"] or {}
    for name, ms in result["ms_per_step"].items():
        base = name.removesuffix("_eager")
        ratio = result["ratio_vs_fused_adamw"].get(name, 1.0)
        compile_s = result["compile_s"].get(name)
        bitwise = result["bitwise_equal_to_reference"].get(name)
        cells = ["" if compile_s is None else f"{compile_s:.1f}", "" if name != base else bound.get(base, "")]
        cells.append("" if bitwise is None else str(bitwise))
        lines.append(f"{name:<26}{ms:>10.1f}{ratio:>9.2f}{cells[0]:>11}{cells[1]:>10}{cells[2]:>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--scale", type=float, default=None, help="CUDA: fraction of 7B's 32 layers; CPU: layers")
    parser.add_argument("--optimizers", default=",".join(OUR_OPTIMIZERS))
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (the first compiles)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--no-eager", action="store_true", help="skip the eager runs (slow at 7B)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    print(table(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
