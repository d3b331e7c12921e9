"""Does a bf16 run move its weights the way an fp32 run does?  CPU, tiny Mistral, no downloads.

    python bench/fidelity.py                 # the recorded run: hidden 256, 4 layers, 40 steps, lr 5e-6
    python bench/fidelity.py --steps 20 --hidden 128 --layers 2   # quicker

Each recipe trains the same tiny Mistral (built locally from `MistralConfig`, same fp32 initial
weights) on the same synthetic token batches, with the same seed, steps and constant learning rate:

- `seed`: the published recipe as transformers v5 runs it - weights loaded in bf16 (`dtype="auto"`)
  and `optim="adamw_torch_fused"`, i.e. `torch.optim.AdamW(fused=True)` with bf16 m and v.
- `adamw_kahan` (the job's default), `adamw_8bit_sr`, `adamw_fp32_master`: `job.optim.adamw`, bf16 weights.
- `fp32`: fp32 weights and `torch.optim.AdamW` - the reference.

It prints, side by side: the fraction of weights that changed at all, cos(ΔW, ΔW_fp32) over all
parameters, and the final loss. The loop is a plain one over the model's own forward
(`model(input_ids, labels=...)`), with gradient clipping at 1.0 as Trainer does; bf16 matmuls run as
on a GPU (fp32 accumulation, bf16 result; see `Bf16Matmul`); the job trains
through TRL's SFTTrainer, whose chunked LM head computes the same cross-entropy, so the optimizer
sees the same kind of gradients. The dataset is learnable: each sequence follows a fixed random
sparse Markov chain (every token has four likely successors), so the loss can fall below log(vocab).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from job.optim.adamw import build_optimizer

RECIPES = ("seed", "adamw_kahan", "adamw_8bit_sr", "adamw_fp32_master", "fp32")
_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default}


class Bf16Matmul(TorchDispatchMode):
    """bf16 matmuls computed in fp32 and rounded once to bf16 - what GPU tensor cores do (fp32 accumulation).

    Why: on a CPU without native bf16 (AVX2 here) torch's bf16 `mm` is ~10x slower than this.
    Everything else (norms, softmax, the optimizer) runs in the tensors' own dtypes.
    """

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _MATMULS and any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args):
            widened = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
            return func(*widened, **kwargs).to(torch.bfloat16)
        return func(*args, **kwargs)


@dataclass(frozen=True)
class Setup:
    """One benchmark configuration (the defaults are the recorded run)."""

    steps: int = 40
    hidden: int = 256
    layers: int = 4
    vocab: int = 512
    seq_len: int = 128
    batch: int = 8
    lr: float = 5e-6
    seed: int = 0


def tiny_mistral(setup: Setup) -> Any:
    """A randomly initialised Mistral (fp32), the same for every recipe."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=setup.vocab,
        hidden_size=setup.hidden,
        intermediate_size=setup.hidden * 7 // 2,  # Mistral-7B's 14336 / 4096
        num_hidden_layers=setup.layers,
        num_attention_heads=max(1, setup.hidden // 64),
        num_key_value_heads=max(1, setup.hidden // 256),
        max_position_embeddings=setup.seq_len,
        tie_word_embeddings=False,
    )
    torch.manual_seed(setup.seed)
    model = MistralForCausalLM(config)
    model.config.use_cache = False
    return model


def synthetic_batches(setup: Setup) -> list[torch.Tensor]:
    """`steps` batches of token ids from a fixed random sparse Markov chain (learnable, no downloads)."""
    gen = torch.Generator().manual_seed(setup.seed + 1)
    successors = torch.randint(0, setup.vocab, (setup.vocab, 4), generator=gen)
    batches = []
    for _ in range(setup.steps):
        seq = torch.empty(setup.batch, setup.seq_len, dtype=torch.long)
        seq[:, 0] = torch.randint(0, setup.vocab, (setup.batch,), generator=gen)
        for t in range(1, setup.seq_len):
            pick = torch.randint(0, 4, (setup.batch,), generator=gen)
            seq[:, t] = successors[seq[:, t - 1], pick]
        noise = torch.rand(seq.shape, generator=gen) < 0.05  # a little noise keeps it from being trivial
        seq[noise] = torch.randint(0, setup.vocab, (int(noise.sum()),), generator=gen)
        batches.append(seq)
    return batches


def _optimizer(recipe: str, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    if recipe == "seed":  # transformers' adamw_torch_fused: AdamW(fused=True), states in the weights' dtype
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)
    if recipe == "fp32":
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    return build_optimizer(recipe, model, lr=lr, weight_decay=0.0)


def train(recipe: str, setup: Setup, init: dict[str, torch.Tensor], batches: list[torch.Tensor]) -> dict[str, Any]:
    """Train one recipe from `init`; returns its initial and final weights (fp32 copies) and losses."""
    model = tiny_mistral(setup)
    model.load_state_dict(init)
    if recipe != "fp32":
        model.to(torch.bfloat16)
    start = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    optimizer = _optimizer(recipe, model, setup.lr)
    torch.manual_seed(setup.seed)
    losses = []
    for ids in batches:
        with Bf16Matmul() if recipe != "fp32" and ids.device.type == "cpu" else contextlib.nullcontext():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    end = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    return {"start": start, "end": end, "losses": losses}


def compare(runs: dict[str, dict[str, Any]], reference: str = "fp32") -> list[dict[str, Any]]:
    """Per recipe: fraction of weights changed, cos(ΔW, ΔW_reference), final loss."""
    ref = runs[reference]
    ref_delta = torch.cat([(ref["end"][n] - ref["start"][n]).flatten() for n in ref["start"]]).double()
    rows = []
    for recipe, run in runs.items():
        delta = torch.cat([(run["end"][n] - run["start"][n]).flatten() for n in run["start"]]).double()
        cos = float(delta @ ref_delta / (delta.norm() * ref_delta.norm()).clamp(min=1e-30))
        rows.append(
            {
                "recipe": recipe,
                "changed": float((delta != 0).double().mean()),
                "cosine": cos,
                "final_loss": run["losses"][-1],
                "first_loss": run["losses"][0],
            }
        )
    return rows


def fidelity(setup: Setup, recipes: tuple[str, ...] = RECIPES) -> list[dict[str, Any]]:
    """Train each recipe (the fp32 reference always) and compare them with the reference."""
    init = tiny_mistral(setup).state_dict()
    batches = synthetic_batches(setup)
    wanted = tuple(dict.fromkeys((*recipes, "fp32")))
    runs = {recipe: train(recipe, setup, init, batches) for recipe in wanted}
    return compare(runs)


def format_table(rows: list[dict[str, Any]]) -> str:
    """The side-by-side table the benchmark prints."""
    lines = [f"{'recipe':<20} {'weights changed':>15} {'cos(ΔW, ΔW_fp32)':>17} {'final loss':>11}"]
    for r in rows:
        lines.append(f"{r['recipe']:<20} {r['changed']:>15.1%} {r['cosine']:>17.3f} {r['final_loss']:>11.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field, default in Setup().__dict__.items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=default)
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated; fp32 always runs")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = Setup(**{f: getattr(args, f) for f in Setup().__dict__})
    t0 = time.perf_counter()
    rows = fidelity(setup, tuple(args.recipes.split(",")))
    print(
        f"tiny Mistral: hidden {setup.hidden}, {setup.layers} layers, vocab {setup.vocab}; "
        f"{setup.steps} steps x {setup.batch}x{setup.seq_len} tokens, lr {setup.lr:g} constant, seed {setup.seed}; "
        f"initial loss {rows[0]['first_loss']:.4f} (log vocab {math.log(setup.vocab):.4f})"
    )
    print(format_table(rows))
    print(f"({time.perf_counter() - t0:.1f} s, torch {torch.__version__}, {torch.get_num_threads()} threads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
