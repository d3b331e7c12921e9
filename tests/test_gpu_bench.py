"""The GPU benchmarks' dry runs on CPU, as subprocesses: bench/gpu_throughput.py and bench/gpu_job.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench" / "gpu_throughput.py"
JOB_BENCH = REPO / "bench" / "gpu_job.py"

pytestmark = pytest.mark.slow


def _dry_run(script: Path, out: Path) -> tuple[dict[str, Any], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SFT_")}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(script), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    return _dry_run(BENCH, tmp_path_factory.mktemp("gpu_bench") / "result.json")


@pytest.fixture(scope="module")
def job_dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    return _dry_run(JOB_BENCH, tmp_path_factory.mktemp("gpu_job") / "result.json")


def test_dry_run_measures_both_recipes_at_both_lengths(dry_run: tuple[dict[str, Any], str]) -> None:
    result, _ = dry_run
    assert result["dry_run"] is True
    runs = {(r["recipe"], r["seq"]): r for r in result["runs"]}
    assert set(runs) == {("seed", 32), ("seed", 64), ("default", 32), ("default", 64)}
    for run in runs.values():
        assert run["status"] == "ok"
        assert run["tokens_per_step"] == run["batch"] * run["seq"] * run["accum"]
        assert run["batch"] * run["accum"] == 16  # the same examples per optimizer step as the seed's 2 x 8
        assert run["tokens_per_second"] > 0 and len(run["step_seconds"]) == result["settings"]["timed_steps"]
        assert len(run["optimizer_step_ms"]) == len(run["step_seconds"]) and run["optimizer_ms"] > 0
        assert all(loss == loss and 0 < loss < 20 for loss in run["losses"])  # finite, near ln(vocab)
        assert run["mfu"] is None and run["hfu"] is None  # no peak FLOP/s for a CPU: never a made-up figure
        assert run["hardware_flops_per_token"] >= run["model_flops_per_token"] > 0
    seed, default = runs[("seed", 32)], runs[("default", 32)]
    assert (seed["optimizer"], seed["checkpointing"], seed["batch"]) == ("adamw_torch_fused", "full", 2)
    assert seed["recomputed_layers"] == seed["layers"] == 4
    assert default["optimizer"] == "adamw_kahan"
    # The pretend card of the dry run makes the planner keep some layers' activations: the selective path runs.
    assert 0 < default["recomputed_layers"] < default["layers"]
    assert default["hardware_flops_per_token"] < seed["hardware_flops_per_token"]
    assert default["planned_peak_gib"] is not None and "activation_checkpointing" in default["fast_path_reasons"]
    assert result["settings"]["loss_head"] == "trl_fused"  # the job's loss head, as TRL 1.16 computes it


def test_dry_run_checks_the_targets_beside_the_seed(dry_run: tuple[dict[str, Any], str]) -> None:
    result, stdout = dry_run
    targets = {(t["recipe"], t["seq"]): t for t in result["targets"]}
    assert set(targets) == {("default", 32), ("default", 64)}
    runs = {(r["recipe"], r["seq"]): r for r in result["runs"]}
    for (recipe, seq), target in targets.items():
        speedup = runs[(recipe, seq)]["tokens_per_second"] / runs[("seed", seq)]["tokens_per_second"]
        assert target["speedup_vs_seed"]["value"] == pytest.approx(speedup, rel=1e-2)
        assert target["speedup_vs_seed"]["pass"] is (target["speedup_vs_seed"]["value"] >= 1.25)
        assert target["optimizer_ms"]["target"] == 60.0 and target["peak_gib"]["target"] == 90.0
        assert target["mfu"]["pass"] is None and target["peak_gib"]["pass"] is None  # nothing to judge on CPU
    assert "targets, default recipe beside the seed (dry run" in stdout
    assert "default 32: MFU n/a" in stdout


def test_dry_run_checks_sharded_fsdp2_save_and_restore(dry_run: tuple[dict[str, Any], str]) -> None:
    fsdp = dry_run[0]["fsdp2_check"]
    assert fsdp["status"] == "ok" and fsdp["world_size"] == 2 and fsdp["backend"] == "gloo"
    assert fsdp["identical_next_step"] is True
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= set(fsdp["sharded_files"])  # one shard file per rank
    for rank in fsdp["ranks"]:
        assert rank["param_type"] == "DTensor" and rank["placements"] == ["S(0)"]
        assert rank["local_shard_numel"] < rank["full_numel"]  # really sharded, not replicated
        assert rank["loss_after_save"] == rank["loss_after_restore"] and rank["max_abs_weight_diff"] == 0.0


def test_dry_run_prints_the_table_last(dry_run: tuple[dict[str, Any], str]) -> None:
    result, stdout = dry_run
    lines = stdout.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("recipe"))
    assert lines[header + 1].startswith("---")
    rows = lines[header + 2 :]
    assert len(rows) == len(result["runs"])  # nothing printed after the table
    for row, run in zip(rows, result["runs"], strict=True):
        cells = row.split()
        assert cells[0] == run["recipe"] and int(cells[1]) == run["seq"] and cells[-1] == "ok"
        assert cells[2] == f"{run['batch']}x{run['accum']}"
        assert cells[5] == f"{run['tokens_per_second']:,.0f}" and cells[6:8] == ["n/a", "n/a"]
        assert cells[9] == f"{run['optimizer_ms']:.1f}"
    for column in ("tokens/s", "MFU", "HFU", "peak GiB", "opt ms"):
        assert column in lines[header]


def test_job_dry_run_preempts_resumes_and_matches_the_uninterrupted_run(job_dry_run) -> None:
    """The real entrypoint: uninterrupted 0, SIGTERM after a checkpoint 75 within the grace budget, restart 0,
    and on CPU in float32 the resumed run's final weights and losses equal the uninterrupted run's."""
    result, _ = job_dry_run
    resume = result["resume"]
    assert (resume["exit_uninterrupted"], resume["exit_sigterm"], resume["exit_restart"]) == (0, 75, 0)
    assert resume["sigterm_to_exit_seconds"] <= resume["grace_seconds"] == 25.0
    assert resume["resumed_from_step"] >= result["settings"]["every"]
    assert resume["max_abs_dw"] == 0.0 and resume["max_abs_w"] > 0
    assert resume["losses_equal"] is True and len(resume["losses_b"]) == result["settings"]["steps"]
    assert result["settings"]["every"] in resume["checkpoints"]["saved_steps"]
    assert all(checks for checks in result["checks"].values())


def test_job_dry_run_reads_the_default_configs_step_lines(job_dry_run) -> None:
    result, _ = job_dry_run
    big = result["7b"]
    assert big["exit_code"] == 75 and big["sigterm_to_exit_seconds"] < 25  # before any checkpoint: stops at once
    assert len(big["steps"]) >= result["settings"]["big_steps"] and big["tokens_per_second"] > 0
    assert big["steps"][0]["loss"] > 0 and big["fast_path"]["attention"] == "sdpa"
    assert big["fast_path"]["batch"] * big["fast_path"]["grad_accum"] == 2  # the dry run's one micro-batch
    assert big["memory_cap"]["fraction"] == 0.0 and result["environment"]["dry_run"] is True


def test_job_on_a_gpu_trains_the_7b_architecture_with_the_default_config(tmp_path: Path) -> None:
    sys.path.insert(0, str(JOB_BENCH.parent))
    try:
        import gpu_job
    finally:
        sys.path.remove(str(JOB_BENCH.parent))
    args = gpu_job.parse_args([])
    values = gpu_job.big_config(tmp_path, tmp_path / "model", tmp_path / "train.jsonl", args)
    assert values["train"] == {"max_steps": args.big_steps + 3, "logging_steps": 1}
    assert values["model"] == {"source": str(tmp_path / "model")} and values["data"] == {
        "train": str(tmp_path / "train.jsonl")
    }


def test_job_dry_run_prints_its_table_last(job_dry_run) -> None:
    result, stdout = job_dry_run
    lines = stdout.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("figure"))
    body = lines[header + 2 :]
    assert any(line.startswith("resume: max |dw| vs uninterrupted") and line.split()[-1] == "0" for line in body)
    assert any(line.startswith("resume: exits A") and line.endswith(" 0 / 75 / 0") for line in body)
    checks = [line for line in body if line.startswith("check: ")]
    assert len(checks) == len(result["checks"]) and all(line.endswith(" ok") for line in checks)
    assert body[-1] == checks[-1]  # nothing printed after the table
