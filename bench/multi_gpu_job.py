"""The job itself on several GPUs with FSDP2: sharded checkpoints, SIGTERM to one rank, resume, final output.

Runs where two or more GPUs are at hand (one node), through the real entrypoint:

    python bench/multi_gpu_job.py --gpus 2 --out docs/multi_gpu_job.json

With the builtin tiny Mistral (float32 master shards, bf16 compute, `train.fsdp: true`) it makes
one uninterrupted run and one run whose rank 1 gets SIGTERM after the first committed checkpoint,
then resumes that run, and prints a short table:

- the wrapper the ranks trained under (FSDP2's `FSDP...` class; on CPU Trainer falls back to DDP);
- the launcher's exit codes (75 after the SIGTERM, 0 after the resume);
- the sharded files of a committed checkpoint (`*.distcp`: one per rank and state);
- whether `final/` loads with `from_pretrained` in one process, and max |dw| between the resumed
  and the uninterrupted run's final weights (NCCL reductions may differ in the last bits);
- tokens/s of the uninterrupted run.

`--dry-run` does the same on CPU with two gloo ranks (DDP, exact resume expected) in about 3 minutes.
It exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from job_runs import REPO, Job, entrypoint, job_env, load_weights

WAIT_SECONDS = 1800
"""The longest one start of the job may take."""


def expect(job: Job, event: str, timeout: float = 600, **fields: Any) -> dict[str, Any]:
    """The first line of `event` with `fields`; an error (with the job's last lines) if none comes in time."""
    line = job.wait_for(event, timeout, **fields)
    if line is None:
        raise RuntimeError(f"no {event} {fields}; exit {job.proc.poll()}\n{''.join(job.tail)}")
    return line


def start(args: list[str], env: dict[str, str]) -> Job:
    """The launcher in this script's process group: a Ctrl-C here reaches it and its ranks."""
    return Job(entrypoint(*args), env, new_session=False)


def job_args(work: Path, name: str, ranks: int, dry_run: bool) -> list[str]:
    sets = {
        "run.name": name,
        "run.output": work / "outputs",
        "run.scratch": work / "scratch",
        "model.source": "builtin:tiny-mistral",
        "model.dtype": "float32",  # FSDP: float32 master shards; bf16 compute on GPUs
        "train.fsdp": "true",
        "train.optim": "adamw_torch" if dry_run else "adamw_torch_fused",
        "train.max_steps": 12,
        "train.logging_steps": 2,
        "checkpoint.every_steps": 4,
        "checkpoint.delete_after_final": "false",
    }
    overrides = [item for key, value in sets.items() for item in ("--set", f"{key}={value}")]
    config = str(REPO / "examples" / "cpu-demo.yaml")
    return ["train", "--config", config, *overrides, "--nproc-per-node", str(ranks)]


def max_weight_difference(a: Path, b: Path) -> float:
    first, second = load_weights(a), load_weights(b)
    if first.keys() != second.keys():
        return float("inf")
    return max(float((first[k].float() - second[k].float()).abs().max()) for k in first)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=2, help="ranks (GPUs) on this node")
    parser.add_argument("--dry-run", action="store_true", help="two gloo ranks on CPU instead of GPUs")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    env = job_env(dict(os.environ))
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        import torch

        if torch.cuda.device_count() < args.gpus:
            print(f"needs {args.gpus} GPUs, found {torch.cuda.device_count()}: nothing checked")
            return 2
    work = Path(tempfile.mkdtemp(prefix="multi-gpu-job-"))
    os.chdir(REPO)  # the demo config's data paths are relative to the repository

    reference = start(job_args(work, "reference", args.gpus, args.dry_run), env)
    started = expect(reference, "training_started")
    reference_code = reference.wait(WAIT_SECONDS)
    finished = expect(reference, "run_finished")

    preempted = start(job_args(work, "preempted", args.gpus, args.dry_run), env)
    peer = expect(preempted, "process_group_joined", rank=1)["pid"]
    expect(preempted, "checkpoint_committed", step=4)
    os.kill(peer, signal.SIGTERM)
    preempted_code = preempted.wait(WAIT_SECONDS)
    resumed = start(job_args(work, "preempted", args.gpus, args.dry_run), env)
    resumed_code = resumed.wait(WAIT_SECONDS)

    run_dir = work / "outputs" / "preempted"
    checkpoints = sorted((run_dir / "checkpoints").glob("checkpoint-*"))
    shards = sorted(p.relative_to(checkpoints[-1]).as_posix() for p in checkpoints[-1].rglob("*.distcp"))
    from transformers import AutoModelForCausalLM

    loads = AutoModelForCausalLM.from_pretrained(run_dir / "final") is not None
    result = {
        "ranks": args.gpus,
        "device": "cpu (gloo)" if args.dry_run else "cuda (nccl)",
        "wrapper": started.get("wrapper"),
        "exit_codes": {"uninterrupted": reference_code, "sigterm_one_rank": preempted_code, "resumed": resumed_code},
        "resumed_from_step": resumed.first("resuming").get("step"),
        "sharded_checkpoint_files": shards,
        "final_loads_on_one_process": loads,
        "max_abs_weight_difference_vs_uninterrupted": max_weight_difference(
            work / "outputs" / "reference" / "final", run_dir / "final"
        ),
        "tokens_per_second": finished["metrics"].get("tokens_per_second"),
    }
    checks = {
        "wrapper is FSDP2" if not args.dry_run else "wrapper is DDP (CPU fallback)": (
            str(result["wrapper"]).startswith("FSDP")
            if not args.dry_run
            else result["wrapper"] == "DistributedDataParallel"
        ),
        "exit codes 0 / 75 / 0": (reference_code, preempted_code, resumed_code) == (0, 75, 0),
        "sharded checkpoint (>= 1 .distcp per rank)": args.dry_run or len(shards) >= args.gpus,
        "final loads on one process": loads,
        "resume exact on CPU": not args.dry_run or result["max_abs_weight_difference_vs_uninterrupted"] == 0.0,
    }
    result["checks"] = checks
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'check':48} result")
    for name, ok in checks.items():
        print(f"{name:48} {'ok' if ok else 'FAILED'}")
    for key in ("wrapper", "resumed_from_step", "max_abs_weight_difference_vs_uninterrupted", "tokens_per_second"):
        print(f"{key:48} {result[key]}")
    print(f"{'sharded files in the newest checkpoint':48} {len(shards)}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
