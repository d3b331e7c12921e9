"""One measured run of bench/gpu_throughput.py: a recipe's fast path on the model, warm-up and timed steps.

`run_one` applies a FastPath (attention, TF32, the layers recomputed) to a model built by `build_model`,
optionally compiles each decoder layer as the job does, trains warm-up then timed optimizer steps on
full-length random tokens (clipped at 1.0, TRL's chunked LM head when `add_loss_head` added it) and returns
every figure of the run: step seconds, losses, optimizer milliseconds (CUDA events), tokens/s, MFU and HFU
(`job.plan.flops`), peak memory; `oom` or the error instead of raising.
Imported by gpu_throughput.py, which puts this checkout's root on sys.path first (for `job`).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch
from job_runs import GiB

from job.optim.adamw import build_optimizer
from job.plan import flops
from job.train.fastpath import FastPath, apply_activation_checkpointing, enable_tf32

LR = 5e-6
SEED_OPTIMIZER = "adamw_torch_fused"
"""The seed recipe's optimizer: `torch.optim.AdamW(fused=True)`, not one of the job's."""


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


def make_optimizer(name: str, model: Any, device: torch.device) -> torch.optim.Optimizer:
    if name != SEED_OPTIMIZER:
        return build_optimizer(name, model, lr=LR, weight_decay=0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=True)
    except (RuntimeError, ValueError):  # a device without the fused kernel
        return torch.optim.AdamW(params, lr=LR, weight_decay=0.0, foreach=True)


@contextlib.contextmanager
def compiled_layers(model: Any, enabled: bool) -> Iterator[dict[str, Any]]:
    """Each decoder layer compiled for the duration, as the job compiles it (`job.train.compile` when this tree
    has it, else `nn.Module.compile` per layer); yields how, and why it fell back to eager if it did."""
    info: dict[str, Any] = {"compiled_with": None}
    if not enabled:
        yield info
        return
    layers = list(model.model.layers)
    try:
        from job.train.compile import compile_layers
    except ImportError:
        compile_layers = None
    handle = compile_layers(model, forced=False) if compile_layers is not None else None
    if handle is not None:
        info["compiled_with"] = "job.train.compile.compile_layers"
    else:
        for layer in layers:
            layer.compile()
        info["compiled_with"] = "nn.Module.compile per decoder layer"
    try:
        yield info
    finally:  # the next run of the same model is eager again
        info["compile_failure"] = getattr(handle, "failure", None)
        for layer in layers:
            layer._compiled_call_impl = None


def recomputed_layers(model: Any) -> tuple[int, int]:
    """(decoder layers that recompute their forward, decoder layers), read from the model's own flags."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    on = getattr(model, "is_activation_checkpointing", None)  # transformers 5.24's name
    on = getattr(model, "is_gradient_checkpointing", False) if on is None else on
    return (sum(bool(layer.gradient_checkpointing) for layer in layers) if on else 0), len(layers)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def timed_step(optimizer: torch.optim.Optimizer, device: torch.device) -> Callable[[], float]:
    """Run optimizer.step(); return a function giving its milliseconds (CUDA events: read after a sync)."""
    if device.type != "cuda":
        started = time.perf_counter()
        optimizer.step()
        ms = (time.perf_counter() - started) * 1000
        return lambda: ms
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    optimizer.step()
    end.record()
    return lambda: begin.elapsed_time(end)


def _train_steps(model: Any, optimizer_name: str, run: dict[str, Any], args: argparse.Namespace,
                 device: torch.device, fused_head: bool, figures: dict[str, list[float]]) -> None:  # fmt: skip
    """Warm-up then timed optimizer steps; its own frame, so an OOM frees every tensor it made."""
    batch, accum, seq = run["batch"], run["accum"], run["seq"]
    gen = torch.Generator(device="cpu").manual_seed(seq)
    batches = [torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen).to(device) for _ in range(accum)]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(optimizer_name, model, device)
    kwargs = {"fused_lm_head": True} if fused_head else {}
    for step in range(args.warmup + args.steps):
        sync(device)
        started = time.perf_counter()
        total = torch.zeros((), device=device)
        for ids in batches:
            out = model(input_ids=ids, labels=ids, **kwargs)
            (out.loss / accum).backward()
            total += out.loss.detach() / accum
            del out
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer_ms = timed_step(optimizer, device)
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        seconds = time.perf_counter() - started
        if step < args.warmup:
            figures["warmup_seconds"].append(seconds)  # the first includes compilation
        else:
            figures["step_seconds"].append(seconds)
            figures["losses"].append(round(float(total), 4))
            figures["optimizer_ms"].append(optimizer_ms())


def run_one(
    model: Any,
    *,
    recipe: str,
    optimizer_name: str,
    fast: FastPath,
    seq: int,
    batch: int,
    accum: int,
    args: argparse.Namespace,
    device: torch.device,
    peak_flops: float | None,
    fused_head: bool,
    compiled: bool = False,
) -> dict[str, Any]:
    """Warm-up and timed optimizer steps of one recipe at one length; every figure of the run."""
    cfg = model.config
    set_attention(model, fast.attn_implementation)
    if device.type == "cuda":
        enable_tf32(fast.tf32)
    apply_activation_checkpointing(model, fast)
    recomputed, layers = recomputed_layers(model)
    shape = flops.flop_shape(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    embedding = 0 if cfg.tie_word_embeddings else model.get_input_embeddings().weight.numel()
    model_fpt = flops.flops_per_token(shape, n_params, seq, embedding_params=embedding)
    full_recompute_fpt = flops.flops_per_token(shape, n_params, seq, embedding_params=embedding, recompute=True)
    hardware_fpt = model_fpt + recomputed / max(layers, 1) * (full_recompute_fpt - model_fpt)
    record: dict[str, Any] = {
        "recipe": recipe + ("+compile" if compiled else ""),
        "seq": seq,
        "batch": batch,
        "accum": accum,
        "tokens_per_step": batch * seq * accum,
        "attention": fast.attn_implementation,
        "tf32": fast.tf32,
        "checkpointing": fast.checkpointing_mode,
        "recomputed_layers": recomputed,
        "layers": layers,
        "optimizer": optimizer_name,
        "loss_head": "trl_fused" if fused_head else "model",
        "compile": compiled,
        "planned_peak_gib": round(fast.planned_peak_bytes / GiB, 2) if fast.planned_peak_bytes else None,
        "fast_path_reasons": fast.reasons,
        "model_flops_per_token": model_fpt,
        "hardware_flops_per_token": hardware_fpt,
    }
    free(device)
    figures: dict[str, list[float]] = {"step_seconds": [], "warmup_seconds": [], "losses": [], "optimizer_ms": []}
    try:
        with compiled_layers(model, compiled) as how:
            _train_steps(model, optimizer_name, record, args, device, fused_head, figures)
        record.update(how)
        record["status"] = "ok" if not how.get("compile_failure") else "ok (compile failed: eager)"
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
    step_seconds = figures["step_seconds"]
    record["step_seconds"] = [round(s, 4) for s in step_seconds]
    record["warmup_seconds"] = [round(s, 2) for s in figures["warmup_seconds"]]
    record["losses"] = figures["losses"]
    record["optimizer_step_ms"] = [round(ms, 2) for ms in figures["optimizer_ms"]]
    record["optimizer_ms"] = round(statistics.median(figures["optimizer_ms"]), 2) if figures["optimizer_ms"] else None
    if step_seconds:
        tps = record["tokens_per_step"] * len(step_seconds) / sum(step_seconds)
        record["tokens_per_second"] = round(tps, 1)
        record["mfu"] = round(flops.mfu(tps, model_fpt, peak_flops), 4) if peak_flops else None
        record["hfu"] = round(flops.hfu(tps, hardware_fpt, peak_flops), 4) if peak_flops else None
    else:
        record["tokens_per_second"] = record["mfu"] = record["hfu"] = None
    return record
