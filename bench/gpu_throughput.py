"""Training throughput of Mistral-7B-v0.3 on one GPU: the seed recipe against the job's default, with the targets.

One command, on one H100, H200 or RTX PRO 6000 (96 GB), within a few minutes including warm-up:

    python bench/gpu_throughput.py --out docs/gpu_throughput.json

A randomly initialised Mistral-7B-v0.3 (its config values are written below: nothing is downloaded),
memory capped at the 96 GB card's 97,887 MiB on larger cards (`torch.cuda.set_per_process_memory_fraction`),
sequence lengths 2048 and 4096, a few warm-up and timed optimizer steps each for:

- `seed`: the seed recipe - bf16 weights, `torch.optim.AdamW(fused=True)` (bf16 states, as transformers v5
  loads `dtype="auto"`), batch 2 x accumulation 8, every layer recomputed, transformers' default attention
  (sdpa), eager;
- `default`: what the job decides for the default config on this card (`choose_fast_path` on a JobConfig of
  defaults, the planner sizing it for the capped card): `job.optim.adamw.DEFAULT_OPTIMIZER`, the planner's
  micro-batch x accumulation for the same 16 examples per step, the layers that keep their activations,
  attention, TF32, and each decoder layer compiled where the job compiles (`--compile`).

Both clip gradients at 1.0 and use TRL's chunked LM head when `trl` is importable (as the job does; else the
model's own loss with full logits, recorded as `loss_head`). Sequences are full-length random tokens. It prints
the issue's targets as pass/fail lines (MFU >= 50% at 2048 and >= 48% at 4096, >= 1.25x the seed's tokens/s,
peak <= 90 GiB, optimizer step <= 60 ms, timed alone with CUDA events) and then, last, a table of tokens/s,
MFU, HFU (`job.plan.flops` conventions), peak memory and optimizer step per run; the JSON (rewritten after each
run, so a run cut short keeps what it measured) holds every figure. A run that runs out of memory is recorded as
`oom` and the default recipe is retried with every layer recomputed; a compiled run that fails is retried eager.

Separately (issue 9), `--fsdp-check` (on by default) saves a sharded FSDP2 model + optimizer state with
torch.distributed.checkpoint, restores it into a fresh model, and checks the next step is identical:
one rank per visible GPU (NCCL), or two CPU ranks (gloo) in `--dry-run` (bench/fsdp_check.py).

`--dry-run` runs every code path on CPU with a tiny config in seconds (timings meaningless). Needs torch,
transformers, structlog and this project (trl optional). One run's steps and figures: bench/throughput_run.py.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fsdp_check import fsdp2_check
from job_runs import CARD_96GB_MIB, MiB, nvidia_smi
from throughput_run import LR, SEED_OPTIMIZER, add_loss_head, build_model, free, run_one

from job.optim.adamw import DEFAULT_OPTIMIZER
from job.plan import flops
from job.plan.memory import MISTRAL_7B_V03
from job.train.fastpath import (
    MEMORY_TARGET,
    DeviceInfo,
    FastPath,
    FastPathInputs,
    checkpoint_budget,
    decide,
    detect_device,
    installed_packages,
)

TINY: dict[str, Any] = {
    **MISTRAL_7B_V03,
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
}
SEED_BATCH, SEED_ACCUM = 2, 8
TARGET_MFU = {2048: 0.50, 4096: 0.48}
TARGET_SPEEDUP, TARGET_PEAK_GIB, TARGET_OPTIMIZER_MS = 1.25, 90.0, 60.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny config on CPU: every code path, in seconds")
    p.add_argument("--seq", type=int, nargs="+", default=None, help="sequence lengths (default 2048 4096)")
    p.add_argument("--batch", type=int, help="micro-batch of both recipes (default: seed 2, default the planner's)")
    p.add_argument("--accum", type=int, help="micro-batches per optimizer step (default: seed 8, the planner's)")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps per run")
    p.add_argument("--steps", type=int, default=2, help="timed optimizer steps per run")
    p.add_argument("--recipes", nargs="+", default=["seed", "default"], choices=["seed", "default"])
    p.add_argument(
        "--compile",
        nargs="?",
        const="both",
        default="auto",
        choices=["auto", "off", "both"],
        help="the default recipe's layers: compiled where the job compiles them (auto: with CUDA), eager (off),"
        " or both rows (`--compile` alone)",
    )
    p.add_argument("--no-cap", action="store_true", help="do not cap memory at the 96 GB card's 97,887 MiB")
    p.add_argument("--fsdp-check", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", type=Path, default=Path("gpu_throughput.json"), help="where the JSON goes")
    args = p.parse_args(argv)
    if args.seq is None:
        args.seq = [32, 64] if args.dry_run else [2048, 4096]
    if args.dry_run:
        args.steps = min(args.steps, 1)
    return args


# ---------------------------------------------------------------- environment


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "packages": installed_packages(("trl", "flash-attn", "flash-attn-3", "kernels", "liger-kernel")),
        "host": platform.node(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = props.name
        env["capability"] = f"sm_{props.major}{props.minor}"
        env["gpu_memory_mib"] = props.total_memory // MiB
        env["driver"] = _driver_version()
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def _driver_version() -> str | None:
    row = nvidia_smi("driver_version")
    return row[0] if row else None


def cap_memory(device: torch.device, enabled: bool) -> int | None:
    """Cap the caching allocator at the 96 GB card's size on larger cards; the cap in bytes, or None."""
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    cap = CARD_96GB_MIB * MiB
    if not enabled or total <= cap:
        return total
    torch.cuda.set_per_process_memory_fraction(cap / total, device)
    return cap


# ---------------------------------------------------------------- model and recipes


def seed_fast_path(device: DeviceInfo) -> FastPath:
    """The seed recipe expressed as a FastPath: sdpa, every layer recomputed, no TF32 switch (run eager)."""
    return decide(FastPathInputs(device=device, attn_implementation="sdpa", tf32=False, checkpointing_layers="all"))


def full_recompute(fast: FastPath) -> FastPath:
    """`fast` with every layer recomputed (the retry after an out-of-memory)."""
    inputs = FastPathInputs(
        device=fast.device, attn_implementation=fast.attn_implementation, tf32=fast.tf32, checkpointing_layers="all"
    )
    return decide(inputs)


def default_fast_path(
    device: DeviceInfo, model_dir: Path, seq: int, args: argparse.Namespace, pretend_bytes: int | None
) -> FastPath:
    """What the job decides for its default config at `seq` on this card (the planner sizing the layers kept
    and the batch split); `--batch`/`--accum` are the user's settings, which the job keeps."""
    from job.config.load import load_config
    from job.train.fastpath import choose_fast_path

    planning_device = device if pretend_bytes is None else replace(device, kind="cuda", memory_bytes=pretend_bytes)
    overrides = [f"model.source={model_dir}", f"data.max_length={seq}", "data.train=unused.jsonl"]
    if args.batch:
        overrides.append(f"train.per_device_train_batch_size={args.batch}")
    if args.accum:
        overrides.append(f"train.gradient_accumulation_steps={args.accum}")
    config = load_config(None, overrides, environ={})
    return choose_fast_path(config, planning_device, model_location=str(model_dir))


def batch_split(fast: FastPath, args: argparse.Namespace) -> tuple[int, int]:
    """Micro-batch x accumulation the job would train with under `fast` (the planner's split, or the user's)."""
    batch = getattr(fast, "batch_size", None) or args.batch or SEED_BATCH
    accum = getattr(fast, "grad_accum", None) or args.accum or SEED_ACCUM
    return int(batch), int(accum)


# ---------------------------------------------------------------- targets and report


def targets(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets for each default-recipe run that finished, beside the seed at the same length."""
    found = []
    for run in runs:
        if not run["recipe"].startswith("default") or run["status"] != "ok":
            continue
        seed = next((r for r in runs if r["recipe"] == "seed" and r["seq"] == run["seq"] and r["status"] == "ok"), None)
        speedup = None
        if seed and seed["tokens_per_second"] and run["tokens_per_second"]:
            speedup = round(run["tokens_per_second"] / seed["tokens_per_second"], 3)
        checks = {
            "mfu": (run["mfu"], TARGET_MFU.get(run["seq"]), ">="),
            "speedup_vs_seed": (speedup, TARGET_SPEEDUP, ">="),
            "peak_gib": (run["peak_allocated_gib"], TARGET_PEAK_GIB, "<="),
            "optimizer_ms": (run["optimizer_ms"], TARGET_OPTIMIZER_MS, "<="),
        }
        result = {"recipe": run["recipe"], "seq": run["seq"]}
        for name, (value, target, op) in checks.items():
            ok = None if value is None or target is None else (value >= target if op == ">=" else value <= target)
            result[name] = {"value": value, "target": target, "op": op, "pass": ok}
        found.append(result)
    return found


def _fmt(value: Any, pattern: str) -> str:
    return "n/a" if value is None else format(value, pattern)


def target_lines(found: list[dict[str, Any]], dry_run: bool) -> list[str]:
    patterns = {"mfu": ("MFU", ".1%"), "speedup_vs_seed": ("x seed", ".2f"), "peak_gib": ("peak GiB", ".1f"),
                "optimizer_ms": ("optimizer ms", ".1f")}  # fmt: skip
    note = " (dry run: CPU figures, meaningless)" if dry_run else ""
    lines = [f"targets, default recipe beside the seed{note}:"]
    for t in found:
        cells = []
        for key, (label, pattern) in patterns.items():
            c = t[key]
            verdict = {True: "pass", False: "FAIL", None: "n/a"}[c["pass"]]
            target = _fmt(c["target"], pattern)
            cells.append(f"{label} {_fmt(c['value'], pattern)} {c['op']} {target} {verdict}")
        lines.append(f"  {t['recipe']} {t['seq']}: " + "; ".join(cells))
    return lines


def table(runs: list[dict[str, Any]]) -> str:
    head = (
        f"{'recipe':<16}{'seq':>6}  {'batch':<6}{'ckpt':<9}{'optimizer':<19}"
        f"{'tokens/s':>10}{'MFU':>7}{'HFU':>7}{'peak GiB':>10}{'opt ms':>8}  status"
    )
    lines = [head, "-" * len(head)]
    for r in runs:
        split = f"{r['batch']}x{r['accum']}"
        lines.append(
            f"{r['recipe']:<16}{r['seq']:>6}  {split:<6}{r['checkpointing']:<9}{r['optimizer']:<19}"
            f"{_fmt(r['tokens_per_second'], ',.0f'):>10}{_fmt(r['mfu'], '.1%'):>7}{_fmt(r['hfu'], '.1%'):>7}"
            f"{_fmt(r['peak_allocated_gib'], '.1f'):>10}{_fmt(r['optimizer_ms'], '.1f'):>8}  {r['status'][:40]}"
        )
    return "\n".join(lines)


def pretend_card(values: dict[str, Any], info: DeviceInfo, seq: int) -> int:
    """Dry run: a card just large enough that the planner keeps some layers' activations at the seed's batch."""
    budget, _ = checkpoint_budget(
        values, replace(info, kind="cuda", memory_bytes=1 << 40), dtype="bfloat16", optimizer=DEFAULT_OPTIMIZER,
        batch=SEED_BATCH, seq=seq,
    )  # fmt: skip
    assert budget is not None
    return int((budget.full_bytes + 0.75 * (budget.none_bytes - budget.full_bytes)) / MEMORY_TARGET)


def run_fsdp_check(device: torch.device, enabled: bool) -> dict[str, Any]:
    """The FSDP2 sharded save/restore check on the dry run's tiny model (or `skipped`), its line printed."""
    fsdp = fsdp2_check(device, TINY) if enabled else {"status": "skipped", "world_size": None, "backend": None}
    print(f"fsdp2 sharded save/restore: {fsdp['status']} (world {fsdp['world_size']}, {fsdp['backend']})")
    return fsdp


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.dry_run:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", 0)
    else:
        print("no CUDA device: run on a GPU, or use --dry-run", file=sys.stderr)
        return 2
    from job.logs import setup_logging

    setup_logging(json_mode=True, level="WARNING")  # the fast path's decision goes to the JSON, not the console
    torch.manual_seed(0)
    values = TINY if args.dry_run else MISTRAL_7B_V03
    cap = cap_memory(device, not args.no_cap)
    info = detect_device(device.type)
    if info.kind == "cuda":
        info = replace(info, memory_bytes=cap)  # the planner sizes the default recipe for the capped card
    peak_flops = flops.peak_bf16_flops(info.name) if info.name else None
    env = environment(device)
    print(f"bench: {env.get('gpu', 'CPU (dry run)')}, torch {env['torch']}, transformers {env['transformers']}")
    if device.type == "cpu":  # forked before this process starts torch's thread pools (a fork after them hangs)
        fsdp = run_fsdp_check(device, args.fsdp_check)
    else:
        fsdp = {"status": "pending", "world_size": None, "backend": None}

    model = build_model(values, device)
    model_dir = Path(tempfile.mkdtemp(prefix="gpu-throughput-config-"))
    model.config.save_pretrained(model_dir)  # what the job's planner reads: config.json
    head = add_loss_head(model)
    fused = head == "trl_fused"
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, loss head {head}")
    runs: list[dict[str, Any]] = []
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "dry_run": args.dry_run,
        "environment": env,
        "memory_cap_mib": cap // MiB if cap else None,
        "peak_bf16_flops": peak_flops,
        "model": dict(values),
        "settings": {"warmup_steps": args.warmup, "timed_steps": args.steps, "lr": LR, "compile": args.compile},
        "runs": runs,
    }

    def save() -> None:
        result.update(targets=targets(runs), fsdp2_check=fsdp, wall_seconds=round(time.perf_counter() - started, 1))
        result["settings"]["loss_head"] = head
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")

    for seq in args.seq:
        pretend = pretend_card(values, info, seq) if args.dry_run else None
        plans: list[tuple[str, str, FastPath, bool, tuple[int, int]]] = []
        if "seed" in args.recipes:
            plans.append(("seed", SEED_OPTIMIZER, seed_fast_path(info), False, (args.batch or 2, args.accum or 8)))
        if "default" in args.recipes:
            fast = default_fast_path(info, model_dir, seq, args, pretend)
            split = batch_split(fast, args)
            compiles = {"auto": [fast.compile and device.type == "cuda"], "off": [False], "both": [False, True]}
            for compiled in compiles[args.compile]:
                plans.append(("default", DEFAULT_OPTIMIZER, fast, bool(compiled), split))
        for recipe, optimizer_name, fast, compiled, (batch, accum) in plans:
            common = {"seq": seq, "batch": batch, "accum": accum, "args": args, "device": device,
                      "peak_flops": peak_flops, "fused_head": fused}  # fmt: skip
            record = run_one(
                model, recipe=recipe, optimizer_name=optimizer_name, fast=fast, compiled=compiled, **common
            )
            if record["status"].startswith("error") and compiled:  # the compiler failed here: eager, said so
                runs.append(record)
                record = run_one(model, recipe=recipe, optimizer_name=optimizer_name, fast=fast, **common)
            if record["status"].startswith("error") and fused:  # TRL's head failed here: fall back, say so
                print(f"  TRL's fused LM head failed ({record['status']}); using the model's own loss")
                del model.forward  # add_fused_lm_head set it on the instance
                fused, head = False, f"model (trl_fused failed: {record['status'][:200]})"
                common["fused_head"] = False
                record = run_one(model, recipe=recipe, optimizer_name=optimizer_name, fast=fast, **common)
            runs.append(record)
            print(
                f"  {record['recipe']} seq {seq}: {record['status']}, {_fmt(record['tokens_per_second'], ',.0f')} tok/s"
            )
            if record["status"] == "oom" and record["recomputed_layers"] < record["layers"]:
                full = full_recompute(fast)
                runs.append(
                    run_one(model, recipe=recipe + "(full)", optimizer_name=optimizer_name, fast=full, **common)
                )
            save()

    del model
    free(device)
    if device.type == "cuda":  # after the throughput runs (they matter most), with the 7B model freed
        fsdp = run_fsdp_check(device, args.fsdp_check)
    save()
    print(f"wrote {args.out} ({result['wall_seconds']} s)")
    print("\n".join(target_lines(result["targets"], args.dry_run)))
    print(table(runs))
    ok = all(r["status"] in ("ok", "oom") or r["compile"] for r in runs) and fsdp["status"] in ("ok", "skipped")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
