"""bench/gpu_throughput.py --dry-run: every code path of the GPU benchmark on CPU, as a subprocess."""

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

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("gpu_bench") / "result.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_dry_run_measures_both_recipes_at_both_lengths(dry_run: tuple[dict[str, Any], str]) -> None:
    result, _ = dry_run
    assert result["dry_run"] is True
    runs = {(r["recipe"], r["seq"]): r for r in result["runs"]}
    assert set(runs) == {("seed", 32), ("seed", 64), ("default", 32), ("default", 64)}
    for run in runs.values():
        assert run["status"] == "ok"
        assert run["tokens_per_step"] == result["settings"]["batch"] * run["seq"] * result["settings"]["accum"]
        assert run["tokens_per_second"] > 0 and len(run["step_seconds"]) == result["settings"]["timed_steps"]
        assert all(loss == loss and 0 < loss < 20 for loss in run["losses"])  # finite, near ln(vocab)
        assert run["mfu"] is None and run["hfu"] is None  # no peak FLOP/s for a CPU: never a made-up figure
        assert run["hardware_flops_per_token"] >= run["model_flops_per_token"] > 0
    seed, default = runs[("seed", 32)], runs[("default", 32)]
    assert (seed["optimizer"], seed["checkpointing"]) == ("adamw_torch_fused", "full")
    assert default["optimizer"] == "adamw_kahan"
    # The pretend card of the dry run makes the planner keep some layers' activations: the selective path runs.
    assert default["checkpointing"].startswith("every_")
    assert default["hardware_flops_per_token"] < seed["hardware_flops_per_token"]
    assert (
        default["planned_peak_gib"] is not None
        and "planned peak" in default["fast_path_reasons"]["activation_checkpointing"]
    )
    assert result["settings"]["loss_head"] == "trl_fused"  # the job's loss head, as TRL 1.16 computes it


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
        assert cells[5] == f"{run['tokens_per_second']:,.0f}" and cells[6:8] == ["n/a", "n/a"]
    for column in ("tokens/s", "MFU", "HFU", "peak GiB"):
        assert column in lines[header]
