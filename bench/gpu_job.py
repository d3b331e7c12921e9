"""The real job on a GPU: `entrypoint.py train` preempted and resumed, then the 7B architecture for a few steps.

No harness: each run is the job itself in a subprocess (JSON logs read from its stderr), on a randomly
initialised Mistral-architecture model saved as safetensors with the Mistral v3 tokenizer, local chat data
and a local store. Two parts (`--only` runs one):

- `resume`: a ~0.7B model (hidden 2048, 12 layers; `--layers 22`: ~1.2B, 9.4 GB checkpoints, the most that
  leaves room on a 64 GiB disk; smaller keeps the part inside its share of a 9-minute device call). Run A
  trains N optimizer steps uninterrupted (a checkpoint every k); run B, same config, gets SIGTERM once
  checkpoint k is saved and must exit 75 within `checkpoint.grace_seconds`, then restarts and exits 0. Both
  run eager (`model.compile: false`: three starts would compile three times). Reported: max |dw| between
  the two final models (GPU kernels need not be bitwise), whether the per-step losses match, and each
  checkpoint's blocked, write and upload seconds.
- `7b`: Mistral-7B-v0.3's architecture (random, ~14.5 GB of bf16 safetensors, built after the resume
  part's files are gone) through the job with the DEFAULT config (only data, model, output, scratch,
  max_steps and logging_steps set) for a few optimizer steps, then SIGTERM before any checkpoint (a 58 GB
  checkpoint does not fit a 64 GiB disk): tokens/s, MFU and peak memory from the job's own step lines, and
  its `fast_path` decisions.

On a card larger than 96 GB the job is capped at 97,887 MiB through `PYTORCH_CUDA_ALLOC_CONF=
per_process_memory_fraction:F` when this torch honours it and the job's planner sees the cap; otherwise
it runs uncapped and the JSON says so. `--dry-run` runs the same flow on CPU with a tiny model (float32
for the resume part: bitwise, max |dw| 0.0) in well under a minute. Prints a short table last, writes
every figure as JSON (`--out`) and exits non-zero when a check fails. Starting the job, reading its
lines and building its inputs: bench/job_runs.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from job_runs import (
    CARD_96GB_MIB,
    REPO,
    GiB,
    Interrupted,
    Job,
    MiB,
    build_model,
    entrypoint,
    environment,
    job_env,
    load_weights,
    public,
    write_config,
    write_data,
)

sys.path.insert(0, str(REPO))

RESUME_SHAPE = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 12,
                "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128}  # fmt: skip
TINY_SHAPE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}  # fmt: skip
# The job itself (entrypoint.py run as __main__), started through this wrapper only for the 7B part: there its
# allocator is capped at the 96 GB card's size before anything runs (`fraction`; 0: no cap), and a disk too
# small for the default run's three 58 GB checkpoints reports `extra` more free bytes (the run stops before
# writing any).
WRAPPER = """
import runpy, shutil, sys
extra, fraction = int(sys.argv.pop(1)), float(sys.argv.pop(1))
if extra:
    real = shutil.disk_usage
    shutil.disk_usage = lambda p: type(real(p))(real(p).total + extra, real(p).used, real(p).free + extra)
if fraction:
    import torch
    torch.cuda.set_per_process_memory_fraction(fraction, 0)
sys.argv[0] = {entry!r}
runpy.run_path({entry!r}, run_name="__main__")
"""


def start(config: Path, env: dict[str, str], wrapped: tuple[int, float] | None = None) -> Job:
    """`entrypoint.py train --config CONFIG`; `wrapped` (extra free bytes, memory fraction): through WRAPPER."""
    args = ["train", "--config", str(config)]
    if wrapped is None:
        return Job(entrypoint(*args), env)
    code = WRAPPER.format(entry=str(REPO / "entrypoint.py"))
    return Job([sys.executable, "-c", code, str(wrapped[0]), str(wrapped[1]), *args], env)


# ---------------------------------------------------------------- the card and its memory cap


def _python(code: str, env: dict[str, str]) -> dict[str, Any] | None:
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    with contextlib.suppress(json.JSONDecodeError, IndexError):
        return json.loads(proc.stdout.strip().splitlines()[-1])
    return None


PROBE = """
import json, torch
from job.train.fastpath import detect_device
total = torch.cuda.get_device_properties(0).total_memory
fraction = min(1.0, %d / total)
torch.cuda.set_per_process_memory_fraction(fraction, 0)
torch.zeros(1, device="cuda")
print(json.dumps({"total": total, "fraction": fraction, "job_sees": detect_device().memory_bytes}))
"""


def memory_cap(env: dict[str, str], enabled: bool) -> dict[str, Any]:
    """The 97,887 MiB cap for the 7B run (`fraction`), when the card is larger and the job's planner sees it."""
    cap = CARD_96GB_MIB * MiB
    probe = _python(PROBE % cap, env)
    if probe is None:
        return {"fraction": 0.0, "why": "no CUDA device answered the probe"}
    info: dict[str, Any] = {"fraction": 0.0, "card_mib": probe["total"] // MiB, "cap_mib": CARD_96GB_MIB}
    info["job_plans_for_mib"] = probe["job_sees"] // MiB
    if not enabled or probe["total"] <= cap:
        return {**info, "why": "disabled" if not enabled else "the card is not larger than 96 GB"}
    if probe["job_sees"] > cap * 1.001:  # it would plan for the whole card and run out of memory under the cap
        return {**info, "why": "uncapped: the job's planner reads the whole card, not the allocator's cap"}
    fraction = round(probe["fraction"], 6)
    return {**info, "fraction": fraction, "why": f"torch.cuda.set_per_process_memory_fraction({fraction})"}


# ---------------------------------------------------------------- part 1: SIGTERM, resume, compare


def compare_runs(a: Path, b: Path) -> dict[str, Any]:
    wa, wb = load_weights(a / "final"), load_weights(b / "final")
    if not wa or wa.keys() != wb.keys():
        return {"max_abs_dw": None, "tensors": len(wa), "note": "final weights missing or keys differ"}
    dw = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    scale = max(float(t.float().abs().max()) for t in wa.values())
    la = json.loads((a / "final" / "metrics.json").read_text())["loss_per_step"]
    lb = json.loads((b / "final" / "metrics.json").read_text())["loss_per_step"]
    same_steps = [s for s, _ in la] == [s for s, _ in lb]
    loss_dev = max((abs(x - y) for (_, x), (_, y) in zip(la, lb, strict=False)), default=None)
    return {"max_abs_dw": dw, "max_abs_w": scale, "tensors": len(wa), "losses_equal": la == lb,
            "same_steps": same_steps, "max_abs_loss_diff": loss_dev, "losses_a": la, "losses_b": lb}  # fmt: skip


def checkpoint_figures(jobs: list[Job]) -> dict[str, Any]:
    """What each save cost: blocked training (staging when async), background write, upload; the staging plan."""

    def pick(event: str, key: str) -> list[Any]:
        return [e.get(key) for job in jobs for e in job.events(event)]

    return {
        "saved_steps": pick("checkpoint_saved_locally", "step"),
        "blocked_seconds": pick("checkpoint_saved_locally", "blocked_seconds"),
        "async_save": pick("checkpoint_saved_locally", "async_save"),
        "write_seconds": pick("checkpoint_written", "seconds"),
        "upload_seconds": pick("checkpoint_committed", "upload_seconds"),
        "bytes": max(pick("checkpoint_committed", "bytes") or [0]) or None,
        "staging": [public(e) for job in jobs for e in job.events("checkpoint_staging")][:1],
    }


def resume_part(work: Path, args: argparse.Namespace, env: dict[str, str], result: dict[str, Any]) -> None:
    """Fills `result` as it goes (a part cut short by its time limit keeps what it measured)."""
    device, dtype = ("cpu", "float32") if args.dry_run else ("cuda", "bfloat16")
    model_dir = work / "model"
    shape = TINY_SHAPE if args.dry_run else {**RESUME_SHAPE, "num_hidden_layers": args.layers}
    params = build_model(model_dir, shape, device=device, dtype=dtype)
    max_length = 64 if args.dry_run else 1024
    data = write_data(work / "data" / "train.jsonl", 64 if args.dry_run else 256, max_length + 100)

    def config(name: str) -> Path:
        values = {
            "run": {"name": name, "output": str(work / "store"), "scratch": str(work / "scratch")},
            "model": {"source": str(model_dir), "compile": False, **({"dtype": "float32"} if args.dry_run else {})},
            "data": {"train": str(data), "max_length": max_length},
            "train": {"max_steps": args.steps, "logging_steps": 1},
            "checkpoint": {"every_steps": args.every, "keep": 1},
        }
        if args.dry_run:  # one micro-batch per step: seconds, not minutes, on two CPU cores
            values["train"].update(per_device_train_batch_size=2, gradient_accumulation_steps=1)
        return write_config(work / f"{name}.yaml", values)

    result.update(parameters=params, dtype=dtype, max_length=max_length, steps=args.steps, every_steps=args.every)

    limit = args.job_timeout
    a = start(config("uninterrupted"), env)
    result["exit_uninterrupted"] = a.wait(limit)
    finished = a.first("run_finished")
    result["tokens_per_second"] = (finished.get("metrics") or {}).get("tokens_per_second")
    if result["exit_uninterrupted"] != 0:
        result["error_tail"] = a.error_tail()
    shutil.rmtree(work / "scratch" / "runs" / "uninterrupted", ignore_errors=True)  # disk room for run B

    b = start(config("preempted"), env)
    saved = b.wait_for("checkpoint_saved_locally", limit, step=args.every)
    grace = float(b.first("config_resolved").get("config", {}).get("checkpoint", {}).get("grace_seconds")
                  or 25.0)  # fmt: skip
    if saved is not None and b.proc.poll() is None:
        b.terminate()
    result["exit_sigterm"] = b.wait(limit)
    result["sigterm_to_exit_seconds"] = b.exit_seconds()
    result["grace_seconds"] = grace
    result["sigterm_decision"] = b.first("preemption_signal").get("decision")
    result["newest_durable_step"] = b.first("preempted").get("newest_durable_step")
    if result["exit_sigterm"] != 75:
        result["error_tail_sigterm"] = b.error_tail()
    c = start(config("preempted"), env)
    result["exit_restart"] = c.wait(limit)
    result["resumed_from_step"] = c.first("resuming").get("step")
    if result["exit_restart"] != 0:
        result["error_tail_restart"] = c.error_tail()
    result["checkpoints"] = checkpoint_figures([a, b, c])
    result["compile_lines"] = {"uninterrupted": a.compile_lines(), "first_start": b.compile_lines(),
                               "restart": c.compile_lines()}  # fmt: skip
    result["fast_path"] = public(a.first("fast_path"))
    result["timelines"] = {"uninterrupted": a.timeline(), "first_start": b.timeline(), "restart": c.timeline()}
    if (work / "store" / "uninterrupted" / "final").is_dir() and (work / "store" / "preempted" / "final").is_dir():
        result.update(compare_runs(work / "store" / "uninterrupted", work / "store" / "preempted"))


# ---------------------------------------------------------------- part 2: the 7B architecture, default config


def big_part(work: Path, args: argparse.Namespace, env: dict[str, str], result: dict[str, Any]) -> None:
    from job.plan.memory import MISTRAL_7B_V03

    cap = {"fraction": 0.0, "why": "dry run on CPU"} if args.dry_run else memory_cap(env, not args.no_cap)
    result["memory_cap"] = cap

    device = "cpu" if args.dry_run else "cuda"
    shape = {**MISTRAL_7B_V03, **TINY_SHAPE} if args.dry_run else MISTRAL_7B_V03
    model_dir = work / "model"
    params = build_model(model_dir, shape, device=device, dtype="bfloat16")
    data = write_data(work / "data" / "train.jsonl", 64 if args.dry_run else 256, 40 if args.dry_run else 2300)
    values = big_config(work, model_dir, data, args)
    config = write_config(work / "default-7b.yaml", values)
    # The job checks for room for three checkpoints (~8 bytes per parameter each) before training; it writes none.
    extra = max(0, 3 * 16 * params - shutil.disk_usage(work).free)
    result.update(parameters=params, config=values, scratch_free_space_pretended_gib=round(extra / GiB, 1))
    job = start(config, env, wrapped=(extra, cap["fraction"]))
    try:
        line = job.wait_for("step", args.job_timeout, count=args.big_steps)
        if line is not None and job.proc.poll() is None:
            job.terminate()  # before the final step's checkpoint: stop without saving
        result["exit_code"] = job.wait(args.job_timeout)
    finally:  # also when this part is cut short: what the job logged so far
        result.update(step_figures(job, args.big_steps))


def big_config(work: Path, model_dir: Path, data: Path, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The default config: only where data, model and outputs are, and how many steps (logged each)."""
    values: dict[str, dict[str, Any]] = {
        "run": {"name": "default-7b", "output": str(work / "store"), "scratch": str(work / "scratch")},
        "model": {"source": str(model_dir)},
        "data": {"train": str(data)},
        "train": {"max_steps": args.big_steps + (20 if args.dry_run else 3), "logging_steps": 1},
    }
    if args.dry_run:  # bf16 on two CPU cores: one micro-batch per step, not the default 8, keeps it to seconds
        values["train"].update(per_device_train_batch_size=2, gradient_accumulation_steps=1)
    return values


def step_figures(job: Job, wanted: int) -> dict[str, Any]:
    """Tokens/s, MFU and peak memory from the job's own step lines; its fast_path decisions and compile lines."""
    keep = ("step", "loss", "tokens_per_second", "mfu", "hfu", "peak_memory_gib", "grad_norm", "_t")
    steps = [{k: line.get(k) for k in keep} for line in job.events("step")]
    steady = steps[1:] or steps  # the first step compiles and warms up
    figures = {
        "sigterm_to_exit_seconds": job.exit_seconds(),
        "fast_path": public(job.first("fast_path")),
        "compile_lines": job.compile_lines(),
        "timeline": job.timeline(),
        "steps": steps,
        "tokens_per_second": _median([s["tokens_per_second"] for s in steady]),
        "mfu": _median([s["mfu"] for s in steady]),
        "hfu": _median([s["hfu"] for s in steady]),
        "peak_memory_gib": max((s["peak_memory_gib"] for s in steps if s["peak_memory_gib"] is not None), default=None),
    }
    if job.proc.returncode not in (0, 75) or len(steps) < wanted:
        figures["error_tail"] = job.error_tail()
    return figures


def _median(values: list[Any]) -> float | None:
    present = sorted(v for v in values if v is not None)
    return present[len(present) // 2] if present else None


# ---------------------------------------------------------------- report


def checks(result: dict[str, Any]) -> dict[str, bool]:
    found: dict[str, bool] = {}
    if r := result.get("resume"):
        found["uninterrupted run exits 0"] = r.get("exit_uninterrupted") == 0
        found["SIGTERM after a checkpoint exits 75"] = r.get("exit_sigterm") == 75
        seconds = r.get("sigterm_to_exit_seconds")
        found["... within checkpoint.grace_seconds"] = seconds is not None and seconds <= (r.get("grace_seconds") or 0)
        found["restart resumes and exits 0"] = r.get("exit_restart") == 0 and r.get("resumed_from_step") is not None
        found["final weights compared"] = r.get("max_abs_dw") is not None
        if result["dry_run"]:  # float32 on CPU: resume is exact
            found["CPU resume bitwise (max |dw| 0, same losses)"] = r.get("max_abs_dw") == 0.0 and bool(
                r.get("losses_equal")
            )
    if b := result.get("7b"):
        found["7B default config trains the asked steps"] = len(b.get("steps", [])) >= result["settings"]["big_steps"]
        found["7B run stops with 75 on SIGTERM"] = b.get("exit_code") == 75
    return found


def _fmt(value: Any, pattern: str = "") -> str:
    return "n/a" if value is None else format(value, pattern)


def table(result: dict[str, Any]) -> str:
    lines = [f"{'figure':<46}value", "-" * 72]
    if r := result.get("resume"):
        exits = f"{r.get('exit_uninterrupted')} / {r.get('exit_sigterm')} / {r.get('exit_restart')}"
        ckpt = r.get("checkpoints", {})
        lines += [
            f"{'resume: parameters':<46}{_fmt(r.get('parameters'), ',')}",
            f"{'resume: exits A / B SIGTERM / B restart':<46}{exits}",
            f"{'resume: SIGTERM to exit s (grace)':<46}{_fmt(r.get('sigterm_to_exit_seconds'))}"
            f" ({r.get('grace_seconds')})",
            f"{'resume: resumed from step':<46}{_fmt(r.get('resumed_from_step'))}",
            f"{'resume: max |dw| vs uninterrupted':<46}{_fmt(r.get('max_abs_dw'), '.3g')}",
            f"{'resume: losses equal (max diff)':<46}{r.get('losses_equal')}"
            f" ({_fmt(r.get('max_abs_loss_diff'), '.3g')})",
            f"{'resume: checkpoint blocked s':<46}{ckpt.get('blocked_seconds')}",
            f"{'resume: tokens/s (run A)':<46}{_fmt(r.get('tokens_per_second'), ',.0f')}",
        ]
    if b := result.get("7b"):
        fp = b.get("fast_path", {})
        split = f"{fp.get('batch')}x{fp.get('grad_accum')}"
        lines += [
            f"{'7b: parameters':<46}{_fmt(b.get('parameters'), ',')}",
            f"{'7b: exit (SIGTERM after the steps)':<46}{b.get('exit_code')}",
            f"{'7b: steps logged':<46}{len(b.get('steps') or [])}",
            f"{'7b: tokens/s (median after step 1)':<46}{_fmt(b.get('tokens_per_second'), ',.0f')}",
            f"{'7b: MFU / HFU':<46}{_fmt(b.get('mfu'), '.1%')} / {_fmt(b.get('hfu'), '.1%')}",
            f"{'7b: peak GiB':<46}{_fmt(b.get('peak_memory_gib'))}",
            f"{'7b: layers kept, batch x accumulation':<46}{fp.get('layers_kept')}, {split}",
            f"{'7b: memory cap':<46}{b.get('memory_cap', {}).get('why')}",
        ]
    for name, ok in result["checks"].items():
        lines.append(f"{'check: ' + name:<66}{'ok' if ok else 'FAILED'}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model: the same flow in well under a minute")
    p.add_argument("--only", choices=["resume", "7b"], help="run one part (default: both, resume first)")
    p.add_argument("--steps", type=int, help="optimizer steps of the resume runs (default 6; 8 in a dry run)")
    p.add_argument("--every", type=int, default=3, help="checkpoint every k steps; SIGTERM once step k is saved")
    p.add_argument("--layers", type=int, default=12, help="decoder layers of the resume part's model (hidden 2048)")
    p.add_argument("--big-steps", type=int, help="step lines to read from the 7B run (default 4; 1 in a dry run)")
    p.add_argument("--job-timeout", type=float, default=600, help="seconds any one start may take")
    p.add_argument("--no-cap", action="store_true", help="do not cap GPU memory at the 96 GB card's 97,887 MiB")
    p.add_argument("--work", type=Path, help="working directory (default: a new temporary one, removed after)")
    p.add_argument("--out", type=Path, default=Path("gpu_job.json"), help="where the JSON goes")
    args = p.parse_args(argv)
    args.steps = args.steps or (8 if args.dry_run else 6)
    args.big_steps = args.big_steps or (1 if args.dry_run else 4)
    if not 1 <= args.every < args.steps:
        p.error("--every must be at least 1 and below --steps")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    env = job_env(dict(os.environ))
    env.setdefault("PYTHONWARNINGS", "ignore")
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "dry_run": args.dry_run,
        "environment": environment(args.dry_run),
        "settings": {"steps": args.steps, "every": args.every, "big_steps": args.big_steps},
    }
    print(f"gpu_job: {result['environment'].get('gpu', 'CPU (dry run)')}")

    def save() -> None:
        result["checks"] = checks(result)
        result["wall_seconds"] = round(time.monotonic() - started, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")

    root = args.work or Path(tempfile.mkdtemp(prefix="gpu-job-"))
    parts = [(name, part) for name, part in (("resume", resume_part), ("7b", big_part)) if args.only in (None, name)]

    def run_part(name: str, part: Any) -> None:
        work = root / name
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        part_started = time.monotonic()
        result[name] = {}
        try:
            part(work, args, env, result[name])
        except Exception as exc:  # keep what the other part measures; the JSON says what broke
            result[name + "_error"] = f"{type(exc).__name__}: {exc}"[:2000]
        finally:
            shutil.rmtree(work, ignore_errors=True)
            print(f"  {name}: {round(time.monotonic() - part_started, 1)} s")

    def stop(signum: int, frame: Any) -> None:
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    # A GPU runs the parts one after the other (its memory, the disk); a dry run side by side (two CPU cores).
    pool = ThreadPoolExecutor(len(parts) if args.dry_run else 1)
    try:
        for future in [pool.submit(run_part, name, part) for name, part in parts]:
            future.result()
            save()
    except Interrupted:
        Job.stopping = True  # no new start; the jobs in flight die with their process groups
        for name, _ in parts:
            result.setdefault(name + "_error", "stopped by SIGTERM (the time limit), figures so far kept")
    finally:
        for job in list(Job.live):
            job.kill()
        pool.shutdown(wait=True, cancel_futures=True)
    if args.work is None:
        shutil.rmtree(root, ignore_errors=True)
    save()
    print(f"wrote {args.out} ({result['wall_seconds']} s)")
    print(table(result))
    failed = [k for k in result if k.endswith("_error")]
    return 0 if result["checks"] and all(result["checks"].values()) and not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
