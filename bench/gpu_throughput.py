"""Training throughput of Mistral-7B-v0.3 on one GPU: the seed recipe against the job's default fast path.

One command, on one H100, H200 or RTX PRO 6000 (96 GB), within ~8 minutes including warm-up:

    python bench/gpu_throughput.py --out docs/gpu_throughput.json

A randomly initialised Mistral-7B-v0.3 (its config values are written below: nothing is downloaded),
memory capped at the 96 GB card's 97,887 MiB on larger cards (`torch.cuda.set_per_process_memory_fraction`),
sequence lengths 2048 and 4096, a few warm-up and timed optimizer steps each for:

- `seed`: the seed recipe - bf16 weights, `torch.optim.AdamW(fused=True)` (bf16 states, as transformers v5
  loads `dtype="auto"`), every layer recomputed, transformers' default attention (sdpa);
- `default`: the job's default - `job.optim.adamw.DEFAULT_OPTIMIZER` plus the fast-path choices `job.train.fastpath`
  makes for this card (attention, TF32, how many layers recompute as the planner sizes them).

Both use batch 2 x gradient accumulation 8 (the seed recipe's), gradient clipping at 1.0, and TRL's
chunked LM head when `trl` is importable (as the job does; else the model's own loss with full logits,
recorded as `loss_head`). Sequences are full-length random tokens, so padding-free packing changes
nothing here and is not measured. It prints tokens/s, MFU, HFU (`job.plan.flops` conventions) and peak
memory per run as a short table last, and writes every figure as JSON. A run that runs out of memory
is recorded as `oom`; the default recipe then retries with every layer recomputed.

Separately (issue 9), `--fsdp-check` (on by default) saves a sharded FSDP2 model + optimizer state with
torch.distributed.checkpoint, restores it into a fresh model, and checks the next step is identical:
one rank per visible GPU (NCCL), or two CPU ranks (gloo) in `--dry-run`.

`--dry-run` runs every code path on CPU with a tiny config in seconds (timings meaningless). Depends only
on torch, transformers and this project.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from job.optim.adamw import DEFAULT_OPTIMIZER, build_optimizer
from job.plan import flops
from job.plan.memory import MISTRAL_7B_V03
from job.train.fastpath import (
    MEMORY_TARGET,
    DeviceInfo,
    FastPath,
    FastPathInputs,
    apply_activation_checkpointing,
    checkpoint_budget,
    decide,
    detect_device,
    enable_tf32,
    installed_packages,
    recomputed_fraction,
)

MiB, GiB = 1 << 20, 1 << 30
CARD_96GB_MIB = 97_887
"""What an RTX PRO 6000 (96 GB) reports; larger cards are capped to it."""

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
LR = 5e-6
SEED_OPTIMIZER = "adamw_torch_fused"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny config on CPU: every code path, in seconds")
    p.add_argument("--seq", type=int, nargs="+", default=None, help="sequence lengths (default 2048 4096)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--accum", type=int, default=8, help="micro-batches per optimizer step")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps per run")
    p.add_argument("--steps", type=int, default=2, help="timed optimizer steps per run")
    p.add_argument("--recipes", nargs="+", default=["seed", "default"], choices=["seed", "default"])
    p.add_argument("--compile", action="store_true", help="also run the default recipe with torch.compile")
    p.add_argument("--no-cap", action="store_true", help="do not cap memory at the 96 GB card's 97,887 MiB")
    p.add_argument("--fsdp-check", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", type=Path, default=Path("gpu_throughput.json"), help="where the JSON goes")
    args = p.parse_args(argv)
    if args.seq is None:
        args.seq = [32, 64] if args.dry_run else [2048, 4096]
    if args.dry_run:
        args.accum = min(args.accum, 2)
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
    with contextlib.suppress(Exception):
        import subprocess

        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    return None


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


def build_model(values: dict[str, Any], device: torch.device) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(values)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    config.use_cache = False
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.train()
    return model


def add_loss_head(model: Any) -> str:
    """TRL's chunked LM head, as the job trains (no full logits); the model's own loss if trl is missing."""
    try:
        from trl.trainer.utils import add_fused_lm_head
    except Exception:  # trl absent or incompatible here: full logits, recorded
        return "model (full logits; trl not importable)"
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    return "trl_fused"


def set_attention(model: Any, name: str) -> None:
    if getattr(model.config, "_attn_implementation", None) == name:
        return
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # older transformers
        model.config._attn_implementation = name


def seed_fast_path(device: DeviceInfo) -> FastPath:
    """The seed recipe expressed as a FastPath: sdpa, every layer recomputed, no TF32 switch, no compile."""
    return decide(FastPathInputs(device=device, attn_implementation="sdpa", tf32=False, checkpointing_layers="all"))


def default_fast_path(
    device: DeviceInfo, model_values: dict[str, Any], batch: int, seq: int, pretend_bytes: int | None
) -> FastPath:
    """What the job decides for this card, with the planner sizing activation checkpointing."""
    planning_device = device if pretend_bytes is None else replace(device, kind="cuda", memory_bytes=pretend_bytes)
    budget, note = checkpoint_budget(
        model_values, planning_device, dtype="bfloat16", optimizer=DEFAULT_OPTIMIZER, batch=batch, seq=seq
    )
    return decide(
        FastPathInputs(
            device=device, packages=installed_packages(), budget=budget, budget_note=note, checkpointing_layers="auto"
        )
    )


def make_optimizer(name: str, model: Any, device: torch.device) -> torch.optim.Optimizer:
    if name != SEED_OPTIMIZER:
        return build_optimizer(name, model, lr=LR, weight_decay=0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=True)
    except (RuntimeError, ValueError):  # a device without the fused kernel
        return torch.optim.AdamW(params, lr=LR, weight_decay=0.0, foreach=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _train_steps(
    model: Any,
    optimizer_name: str,
    args: argparse.Namespace,
    seq: int,
    device: torch.device,
    fused_head: bool,
    compiled: bool,
    step_seconds: list[float],
    losses: list[float],
) -> None:
    """Warm-up then timed optimizer steps; its own frame, so an OOM frees every tensor it made."""
    gen = torch.Generator(device="cpu").manual_seed(seq)
    batches = [
        torch.randint(0, model.config.vocab_size, (args.batch, seq), generator=gen).to(device)
        for _ in range(args.accum)
    ]
    forward = torch.compile(model) if compiled else model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(optimizer_name, model, device)
    kwargs = {"fused_lm_head": True} if fused_head else {}
    for step in range(args.warmup + args.steps):
        sync(device)
        started = time.perf_counter()
        total = torch.zeros((), device=device)
        for ids in batches:
            out = forward(input_ids=ids, labels=ids, **kwargs)
            (out.loss / args.accum).backward()
            total += out.loss.detach() / args.accum
            del out
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step >= args.warmup:
            step_seconds.append(time.perf_counter() - started)
            losses.append(round(float(total), 4))


def run_one(
    model: Any,
    *,
    recipe: str,
    optimizer_name: str,
    fast: FastPath,
    seq: int,
    args: argparse.Namespace,
    device: torch.device,
    peak_flops: float | None,
    fused_head: bool,
    compiled: bool = False,
) -> dict[str, Any]:
    """Warm-up and timed optimizer steps of one recipe at one length; every figure of the run."""
    cfg = model.config
    layers = int(cfg.num_hidden_layers)
    set_attention(model, fast.attn_implementation)
    if device.type == "cuda":
        enable_tf32(fast.tf32)
    apply_activation_checkpointing(model, fast)
    shape = flops.flop_shape(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    embedding = 0 if cfg.tie_word_embeddings else model.get_input_embeddings().weight.numel()
    model_fpt = flops.flops_per_token(shape, n_params, seq, embedding_params=embedding)
    full_recompute_fpt = flops.flops_per_token(shape, n_params, seq, embedding_params=embedding, recompute=True)
    hardware_fpt = model_fpt + recomputed_fraction(fast, layers) * (full_recompute_fpt - model_fpt)
    record: dict[str, Any] = {
        "recipe": recipe + ("+compile" if compiled else ""),
        "seq": seq,
        "batch": args.batch,
        "accum": args.accum,
        "tokens_per_step": args.batch * seq * args.accum,
        "attention": fast.attn_implementation,
        "tf32": fast.tf32,
        "checkpointing": fast.checkpointing_mode,
        "optimizer": optimizer_name,
        "loss_head": "trl_fused" if fused_head else "model",
        "compile": compiled,
        "planned_peak_gib": round(fast.planned_peak_bytes / GiB, 2) if fast.planned_peak_bytes else None,
        "fast_path_reasons": fast.reasons,
        "model_flops_per_token": model_fpt,
        "hardware_flops_per_token": hardware_fpt,
    }
    free(device)
    step_seconds: list[float] = []
    losses: list[float] = []
    try:
        _train_steps(model, optimizer_name, args, seq, device, fused_head, compiled, step_seconds, losses)
        record["status"] = "ok"
    except torch.OutOfMemoryError:
        record["status"] = "oom"
    except Exception as exc:  # keep the other runs; the JSON says what broke
        record["status"] = f"error: {type(exc).__name__}: {exc}"[:500]
        record["traceback"] = traceback.format_exc()[-4000:]
    if device.type == "cuda":
        record["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / GiB, 2)
        record["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / GiB, 2)
    else:
        record["peak_allocated_gib"] = record["peak_reserved_gib"] = None
    model.zero_grad(set_to_none=True)
    free(device)
    record["step_seconds"] = [round(s, 4) for s in step_seconds]
    record["losses"] = losses
    if step_seconds:
        tps = record["tokens_per_step"] * len(step_seconds) / sum(step_seconds)
        record["tokens_per_second"] = round(tps, 1)
        record["mfu"] = round(flops.mfu(tps, model_fpt, peak_flops), 4) if peak_flops else None
        record["hfu"] = round(flops.hfu(tps, hardware_fpt, peak_flops), 4) if peak_flops else None
    else:
        record["tokens_per_second"] = record["mfu"] = record["hfu"] = None
    return record


# ---------------------------------------------------------------- FSDP2 sharded save/restore (issue 9)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp_rank(rank: int, world: int, backend: str, port: int, workdir: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if backend == "gloo":
        torch.set_num_threads(1)  # two CPU ranks on a small machine
    dist.init_process_group(backend, rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))
    values = dict(TINY)
    config = AutoConfig.for_model(values.pop("model_type"), **values)

    def build(seed: int) -> tuple[Any, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, config.vocab_size, (2, 32), generator=gen).to(device) for _ in range(3)]

    def step(model: Any, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return float(loss.detach())

    model, optimizer = build(0)
    for ids in batches[:2]:
        step(model, optimizer, ids)
    msd, osd = get_state_dict(model, optimizer)
    ckpt = os.path.join(workdir, "ckpt")
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
    loss_a = step(model, optimizer, batches[2])
    restored, restored_opt = build(123)  # other initial weights: a no-op restore would show
    msd2, osd2 = get_state_dict(restored, restored_opt)
    dcp.load({"model": msd2, "optim": osd2}, checkpoint_id=ckpt)
    set_state_dict(restored, restored_opt, model_state_dict=msd2, optim_state_dict=osd2)
    loss_b = step(restored, restored_opt, batches[2])
    first = next(model.parameters())
    with torch.no_grad():
        diff = max(
            float((p.full_tensor() - q.full_tensor()).abs().max())
            for p, q in zip(model.parameters(), restored.parameters(), strict=True)
        )
    result = {
        "rank": rank,
        "loss_after_save": loss_a,
        "loss_after_restore": loss_b,
        "max_abs_weight_diff": diff,
        "param_type": type(first).__name__,
        "placements": [str(pl) for pl in getattr(first, "placements", ())],
        "local_shard_numel": first.to_local().numel() if hasattr(first, "to_local") else first.numel(),
        "full_numel": first.numel(),
    }
    Path(workdir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def fsdp2_check(device: torch.device) -> dict[str, Any]:
    """Sharded FSDP2 save (torch.distributed.checkpoint) and restore into a fresh model; next step identical."""
    import torch.multiprocessing as mp

    if device.type == "cuda":
        world, backend, method = torch.cuda.device_count(), "nccl", "spawn"  # CUDA cannot fork once initialised
    else:
        world, backend, method = 2, "gloo", "fork"  # fork: the children reuse this process's imports
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        try:
            mp.start_processes(
                _fsdp_rank, args=(world, backend, _free_port(), workdir), nprocs=world, start_method=method
            )
        except Exception as exc:
            return {"status": f"error: {type(exc).__name__}: {exc}"[:1000], "world_size": world, "backend": backend}
        ranks = [json.loads(Path(workdir, f"rank{r}.json").read_text()) for r in range(world)]
        files = sorted(os.listdir(Path(workdir, "ckpt")))
    same = all(r["loss_after_save"] == r["loss_after_restore"] and r["max_abs_weight_diff"] == 0.0 for r in ranks)
    sharded = all(r["param_type"] == "DTensor" for r in ranks)
    return {
        "status": "ok" if same and sharded else "mismatch",
        "world_size": world,
        "backend": backend,
        "sharded_files": files,
        "identical_next_step": same,
        "ranks": ranks,
        "seconds": round(time.perf_counter() - started, 1),
    }


# ---------------------------------------------------------------- report


def _fmt(value: Any, pattern: str) -> str:
    return "n/a" if value is None else format(value, pattern)


def table(runs: list[dict[str, Any]]) -> str:
    head = (
        f"{'recipe':<16}{'seq':>6}  {'attention':<18}{'ckpt':<9}{'optimizer':<19}"
        f"{'tokens/s':>10}{'MFU':>7}{'HFU':>7}{'peak GiB':>10}{'reserved':>10}  status"
    )
    lines = [head, "-" * len(head)]
    for r in runs:
        lines.append(
            f"{r['recipe']:<16}{r['seq']:>6}  {r['attention']:<18}{r['checkpointing']:<9}{r['optimizer']:<19}"
            f"{_fmt(r['tokens_per_second'], ',.0f'):>10}{_fmt(r['mfu'], '.1%'):>7}{_fmt(r['hfu'], '.1%'):>7}"
            f"{_fmt(r['peak_allocated_gib'], '.1f'):>10}{_fmt(r['peak_reserved_gib'], '.1f'):>10}  {r['status'][:40]}"
        )
    return "\n".join(lines)


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
        fsdp = fsdp2_check(device) if args.fsdp_check else {"status": "skipped", "world_size": None, "backend": None}
        print(f"fsdp2 sharded save/restore: {fsdp['status']} (world {fsdp['world_size']}, {fsdp['backend']})")

    model = build_model(values, device)
    head = add_loss_head(model)
    fused = head == "trl_fused"
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, loss head {head}")
    runs: list[dict[str, Any]] = []
    for seq in args.seq:
        pretend = None
        if args.dry_run:  # a pretend card on which the planner picks selective recomputation: exercises that path
            budget, _ = checkpoint_budget(
                values,
                replace(info, kind="cuda", memory_bytes=1 << 40),
                dtype="bfloat16",
                optimizer=DEFAULT_OPTIMIZER,
                batch=args.batch,
                seq=seq,
            )
            assert budget is not None
            pretend = int((budget.full_bytes + 0.75 * (budget.none_bytes - budget.full_bytes)) / MEMORY_TARGET)
        plans: list[tuple[str, str, FastPath, bool]] = []
        if "seed" in args.recipes:
            plans.append(("seed", SEED_OPTIMIZER, seed_fast_path(info), False))
        if "default" in args.recipes:
            fast = default_fast_path(info, values, args.batch, seq, pretend)
            plans.append(("default", DEFAULT_OPTIMIZER, fast, False))
            if args.compile:
                plans.append(("default", DEFAULT_OPTIMIZER, fast, True))
        for recipe, optimizer_name, fast, compiled in plans:
            common = {"seq": seq, "args": args, "device": device, "peak_flops": peak_flops, "fused_head": fused}
            record = run_one(
                model, recipe=recipe, optimizer_name=optimizer_name, fast=fast, compiled=compiled, **common
            )
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
            if record["status"] == "oom" and fast.checkpointing_mode != "full":
                full = replace(fast, checkpoint_every_n_layers=1, activation_checkpointing=True)
                retry = run_one(model, recipe=recipe + "(full)", optimizer_name=optimizer_name, fast=full, **common)
                runs.append(retry)

    del model
    free(device)
    if device.type == "cuda":  # after the throughput runs (they matter most), with the 7B model freed
        fsdp = fsdp2_check(device) if args.fsdp_check else {"status": "skipped", "world_size": None, "backend": None}
        print(f"fsdp2 sharded save/restore: {fsdp['status']} (world {fsdp['world_size']}, {fsdp['backend']})")

    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "dry_run": args.dry_run,
        "environment": env,
        "memory_cap_mib": cap // MiB if cap else None,
        "peak_bf16_flops": peak_flops,
        "model": {k: v for k, v in values.items()},
        "settings": {
            "batch": args.batch,
            "accum": args.accum,
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "lr": LR,
            "loss_head": head,
        },
        "runs": runs,
        "fsdp2_check": fsdp,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out} ({result['wall_seconds']} s)")
    print(table(runs))
    ok = all(r["status"] in ("ok", "oom") for r in runs) and fsdp["status"] in ("ok", "skipped")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
