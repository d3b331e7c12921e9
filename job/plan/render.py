"""The plan as text: a GiB table of the peak, the layers kept, the batch split and its candidates, the time,
and the checkpoint's host-RAM staging (`plan` prints it; `plan --json` prints the dict itself)."""

from __future__ import annotations

from typing import Any

GiB = 1 << 30
_SOURCES = {"given": "given", "detected": "detected", "default": "assumed: no GPU here"}
_LABELS = {
    "weights": "weights",
    "gradients": "gradients",
    "optimizer": "optimizer states",
    "activations": "activations",
    "backward": "backward peak",
    "overhead": "optimizer step",
}


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def _layers_lines(plan: dict[str, Any]) -> list[str]:
    layers = plan["layers"]
    kept, total = layers["kept"], layers["total"]
    if kept == total:
        which = "all keep their activations: no recomputation"
    elif kept == 0:
        which = "none keep their activations: every layer recomputes"
    else:
        first, last = layers["kept_layers"][0], layers["kept_layers"][-1]
        span = f"layers {first}-{last}" if last - first + 1 == kept else f"layers {layers['kept_layers']}"
        which = f"{kept} of {total} keep their activations ({span}), {total - kept} recompute"
    return [f"layers     {which}", f"           {layers['reason']}"]


def _split_lines(plan: dict[str, Any]) -> list[str]:
    split = plan.get("batch_split")
    examples = plan["per_device_batch_size"] * plan["gradient_accumulation_steps"]
    head = (
        f"batch      {plan['per_device_batch_size']} x {plan['gradient_accumulation_steps']} accumulation"
        f" = {examples} examples per optimizer step"
    )
    if not split:
        return [head + " (as configured)"]
    if split["chosen_by"] != "planner":
        return [head + f" (the planner's to choose; {split['reason']})"]
    lines = [head + " (chosen by the planner; candidates:)"]
    best = max(c["expected_mfu"] for c in split["candidates"]) or 1.0
    layers = plan["layers"]["total"]
    for c in split["candidates"]:
        split_name = f"{c['batch']} x {c['accum']}"
        if c["kept"] is None:
            lines.append(f"  {split_name:<8} does not fit ({c['peak_bytes'] / GiB:.2f} GiB)")
            continue
        mark = "  <- chosen" if c["batch"] == plan["per_device_batch_size"] else ""
        lines.append(
            f"  {split_name:<8} keeps {c['kept']:>3}/{layers}  peak {c['peak_bytes'] / GiB:6.2f} GiB"
            f"  expected MFU {c['expected_mfu']:.3f} ({c['expected_mfu'] / best:.0%}){mark}"
        )
    return lines


def _checkpoint_line(plan: dict[str, Any]) -> list[str]:
    ckpt = plan.get("checkpoint")
    if not ckpt:
        return []
    staging, limit = ckpt["staging"], ckpt["host_limit_bytes"]
    host = f"host RAM {limit / GiB:.1f} GiB ({ckpt['host_limit_source']})" if limit else "host RAM unknown"
    return [
        f"checkpoint {ckpt['state_bytes'] / 1e9:.2f} GB (weights + optimizer states); {host}; staging"
        f" {staging['mode']}: {staging['host_bytes'] / GiB:.1f} GiB of host RAM,"
        f" ~{staging['expected_stall_seconds']:.1f} s blocked per save",
        f"           {staging['reason']}",
    ]


def render_plan(plan: dict[str, Any]) -> str:
    """A human-readable GiB table of `plan`, with the layers kept, the batch split, the time and any advice."""
    mem, gpu = plan["memory_bytes"], plan["gpu_memory_bytes"] / GiB
    lines = [
        f"model      {plan['model']['architecture']}: {plan['parameters']:,} parameters, {plan['dtype']}",
        f"training   optimizer {plan['optimizer']}, batch {plan['per_device_batch_size']} x {plan['seq_length']}"
        f" tokens per device",
        f"gpu        {plan['gpu']['name']} ({_SOURCES[plan['gpu']['source']]}): {gpu:.2f} GiB",
        *_layers_lines(plan),
        *_split_lines(plan),
    ]
    if plan.get("world_size", 1) > 1:
        how = "FSDP: weights, gradients, optimizer states sharded" if plan["sharded"] else "DDP: each holds it all"
        lines.append(f"ranks      {plan['world_size']} ({how}); memory below is per GPU, time for all")
    lines += ["", f"  {'component':<18}{'GiB':>8}"]
    lines += [f"  {label:<18}{mem[key] / GiB:>8.2f}" for key, label in _LABELS.items()]
    verdict = "fits" if plan["fits"] else "does NOT fit"
    spare = "spare" if plan["fits"] else "short"
    reserve = plan["device_reserve_bytes"] / GiB
    lines += [
        f"  {'-' * 26}",
        f"  {'peak (allocator)':<18}{mem['total'] / GiB:>8.2f}   + {reserve:.1f} GiB context and allocator reserve"
        f" of {gpu:.2f} GiB: {verdict}, {abs(plan['headroom_bytes']) / GiB:.2f} GiB {spare}",
        f"  backward peak at the {plan['peak_at']}; memory target {plan['memory_target_bytes'] / GiB:.2f} GiB",
        "",
    ]
    tps = plan["tokens_per_second_estimate"]
    if tps:
        lines.append(
            f"speed      ~{tps:,.0f} tokens/s: HFU {plan['assumed_utilisation']:.0%} of"
            f" {plan['gpu']['peak_bf16_flops'] / 1e12:.1f} TFLOP/s at"
            f" {plan['flops_per_token']['hardware'] / 1e9:.1f} GFLOP/token; MFU {plan['mfu_estimate']:.2f}"
            " (optimizer step not counted)"
        )
    if plan["seconds_estimate"]:
        total = plan["dataset_tokens"] * plan["epochs"]
        lines.append(
            f"time       {plan['dataset_tokens']:,} tokens x {plan['epochs']:g} epochs = {total:,.0f} tokens:"
            f" ~{_duration(plan['seconds_estimate'])}"
        )
    lines += _checkpoint_line(plan)
    if plan["advice"]:
        lines.append("advice     any one of these fits:")
        lines += [f"  - {a}" for a in plan["advice"]]
    lines += [f"warning    {w}" for w in plan["warnings"]]
    return "\n".join(lines)
