"""job/launch: two ranks through torch's elastic launcher, as real processes with real signals (gloo, CPU).

The run asks for FSDP2 (`train.fsdp: true`); on CPU, Trainer runs it as DDP without a word, so
these tests cover the launcher, exit codes, rank discipline, preemption agreement and exact
resume under DDP and assert that wrapper. Sharded FSDP2 state is checked on a GPU (bench/).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from conftest import JobProcess, cpu_run_args, free_port, run_job
from job.config.load import load_config
from job.dist.launch import SHUTDOWN_MARGIN_SECONDS, exit_code_for, hosts_rendezvous, launch_config
from job.errors import FATAL_EXIT_CODES

DDP = (
    "--nproc-per-node", "2",
    "--set", "train.max_steps=12",
    "--set", "train.logging_steps=2",
    "--set", "checkpoint.every_steps=4",
    "--set", "train.fsdp=true",
    "--set", "train.optim=adamw_torch",  # ours are refused under FSDP (unverified on sharded parameters)
)  # fmt: skip


def ddp_args(tmp: Path, model_dir: Path, name: str, *extra: str) -> list[str]:
    return [*cpu_run_args(tmp, model_dir, name), *DDP, *extra]


def test_the_pods_exit_code_keeps_the_root_cause() -> None:
    # {rank: exit code}, {rank: when it ended}: the agent reports the ranks it tore down too.
    assert exit_code_for({1: 65, 0: 1}, {1: 10.0, 0: 10.5}) == 65  # rank 0's broken collective; bad data is why
    assert exit_code_for({0: 1, 1: 65}, {0: 9.0, 1: 10.0}) == 65  # a fatal code wins whenever it came
    assert exit_code_for({3: 64, 1: 77}) == 77  # several fatal: the lowest rank's
    assert exit_code_for({0: 75, 1: 1}, {0: 10.0, 1: 10.2}) == 75  # preempted before training; peer's barrier broke
    assert exit_code_for({0: 1, 1: 75}, {0: 10.0, 1: 10.2}) == 1  # a bug on rank 0; rank 1 torn down by SIGTERM
    assert exit_code_for({1: -9, 0: 75}, {0: 10.2}) == 1  # SIGKILL (OOM killer, node loss); rank 0 torn down
    assert exit_code_for({0: -6, 1: 1}, {1: 10.0}) == 1  # aborted (e.g. the NCCL watchdog)
    assert exit_code_for({0: 75, 1: 75}, {0: 10.0, 1: 10.0}) == 75  # both stopped at the agreed step
    assert exit_code_for({0: -15, 1: 75}) == 75  # SIGTERM before the rank's handler: preempted too
    assert set(FATAL_EXIT_CODES) == {64, 65, 66, 70, 71, 74, 77}


def test_ranks_record_when_they_end_for_the_launcher(tmp_path: Path) -> None:
    from job.dist.group import OUTCOMES_ENV, read_outcomes, record_outcome

    record_outcome(75, {OUTCOMES_ENV: str(tmp_path), "RANK": "1"})
    record_outcome(1, {"RANK": "0"})  # not under our launcher: nothing written
    ended = read_outcomes(tmp_path)
    assert list(ended) == [1] and abs(ended[1] - time.time()) < 60


def test_launch_config_follows_the_config() -> None:
    config = load_config(
        None,
        ["data.train=x.jsonl", "distributed.nproc_per_node=4", "checkpoint.grace_seconds=40", "run.name=r1"],
        environ={},
    )
    launch = launch_config(config)
    assert (launch.nproc_per_node, launch.min_nodes, launch.max_nodes) == (4, 1, 1)
    assert launch.rdzv_endpoint == "localhost:0" and launch.rdzv_backend == "c10d" and launch.run_id == "r1"
    assert launch.max_restarts == 0  # restarts are the platform's: a new pod resumes from a checkpoint
    assert launch.shutdown_timeout == 40 + SHUTDOWN_MARGIN_SECONDS
    multi = load_config(
        None,
        ["data.train=x.jsonl", "distributed.nnodes=2", "distributed.rdzv_endpoint=node-0.sft:29400"],
        environ={},
    )
    assert launch_config(multi).rdzv_endpoint == "node-0.sft:29400" and launch_config(multi).min_nodes == 2


def test_the_pod_named_by_the_endpoint_hosts_the_rendezvous_without_waiting_for_its_dns_record() -> None:
    endpoint = "sft-job-multinode-node-0-0.sft-job-multinode:29400"
    assert hosts_rendezvous(endpoint, hostname="sft-job-multinode-node-0-0") is True
    assert hosts_rendezvous(endpoint, hostname="sft-job-multinode-node-0-1") is None  # torch decides: a client
    assert hosts_rendezvous("10.0.0.5:29400", hostname="sft-job-multinode-node-0-0") is None
    assert hosts_rendezvous(None) is None


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    """One uninterrupted 2-rank run, shared by the assertions about it and the resume comparison."""
    tmp = tmp_path_factory.mktemp("ddp")
    result = run_job(*ddp_args(tmp, tiny_model_dir, "ddp-ref"))
    assert result.returncode == 0, result.stderr[-4000:]
    return result, tmp / "outputs" / "ddp-ref"


@pytest.mark.slow
def test_two_ranks_train_under_ddp_with_one_writer_and_publish_one_loadable_model(ddp_reference, reference_run) -> None:
    result, run_dir = ddp_reference
    lines = result.lines
    joined = {line["rank"]: line for line in lines if line.get("event") == "process_group_joined"}
    assert sorted(joined) == [0, 1] and joined[0]["pid"] != joined[1]["pid"]
    started = [line for line in lines if line.get("event") == "training_started"]
    assert len(started) == 1 and started[0]["wrapper"] == "DistributedDataParallel"
    assert started[0]["world_size"] == 2
    # Only rank 0 logs progress; the other rank logs warnings and errors only, each with its rank.
    steps = [line for line in lines if line.get("event") == "step"]
    assert [line["step"] for line in steps] == [2, 4, 6, 8, 10, 12] and {line["rank"] for line in steps} == {0}
    after_join = [line for line in lines if line.get("rank") == 1 and line["event"] != "process_group_joined"]
    assert after_join and {line["level"] for line in after_join} <= {"warning", "error"}
    assert sum(line.get("event") == "lease_acquired" for line in lines) == 1

    final = run_dir / "final"
    single = sorted(p.name for p in (reference_run[1] / "final").iterdir())
    assert sorted(p.name for p in final.iterdir()) == single  # the same layout as a one-process run
    metrics = json.loads((final / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 12
    starts = [json.loads(p.read_text()) for p in (run_dir / "logs" / "starts").iterdir()]
    assert [s["world_size"] for s in starts] == [2]

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(final)  # one process, no process group
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_at_one_step_and_the_resume_is_exact(
    ddp_reference, tiny_model_dir, tmp_path
) -> None:
    args = ddp_args(tmp_path, tiny_model_dir, "ddp-pre")
    job = JobProcess(*args)
    peer = job.wait_for("process_group_joined", rank=1)["pid"]
    job.wait_for("checkpoint_committed", step=4)  # measured: a save on SIGTERM now fits the budget
    os.kill(peer, signal.SIGTERM)  # to rank 1 alone, not the launcher
    code = job.wait()
    assert code == 75, "".join(job.raw[-40:])  # the ranks' last lines say which one ended how
    agreed = job.events("preemption_agreed")
    assert sorted(line["rank"] for line in agreed) == [0, 1]
    assert len({line["step"] for line in agreed}) == 1 and all(line["save"] for line in agreed)
    step = agreed[0]["step"]
    assert 4 < step < 12
    assert job.wait_for("preempted", rank=0)["newest_durable_step"] == step
    assert job.wait_for("ranks_failed")["exit_code"] == 75

    resumed = run_job(*args)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert [line["step"] for line in resumed.lines if line.get("event") == "resuming"] == [step]

    from safetensors.torch import load_file

    ours = load_file(tmp_path / "outputs" / "ddp-pre" / "final" / "model.safetensors")
    reference = load_file(ddp_reference[1] / "final" / "model.safetensors")
    assert ours.keys() == reference.keys()
    assert all(ours[name].equal(reference[name]) for name in ours), "resumed 2-rank run != uninterrupted one"


@pytest.mark.slow
def test_sigterm_to_the_launcher_reaches_every_rank_and_exits_75(tiny_model_dir, tmp_path) -> None:
    """Kubernetes and `docker stop` signal PID 1's child: the launcher. It forwards; the ranks agree."""
    job = JobProcess(*ddp_args(tmp_path, tiny_model_dir, "ddp-term"))
    job.wait_for("checkpoint_committed", step=4)
    job.signal(signal.SIGTERM)
    assert job.wait(timeout=120) == 75
    assert job.wait_for("launcher_signalled")["exit_code"] == 75
    agreed = job.events("preemption_agreed")
    assert sorted(line["rank"] for line in agreed) == [0, 1] and len({line["step"] for line in agreed}) == 1
    assert job.wait_for("preempted", rank=0)["newest_durable_step"] == agreed[0]["step"]


@pytest.mark.slow
def test_a_rank_that_dies_takes_the_group_down_with_a_retryable_code(tiny_model_dir, tmp_path) -> None:
    job = JobProcess(*ddp_args(tmp_path, tiny_model_dir, "ddp-kill"))
    peer = job.wait_for("process_group_joined", rank=1)["pid"]
    job.wait_for("training_started")
    os.kill(peer, signal.SIGKILL)  # the OOM killer, a lost node: no handler runs
    killed = time.monotonic()
    assert job.wait(timeout=120) == 1
    assert time.monotonic() - killed < 30  # no hang on the dead peer
    assert {line["failed_rank"]: line["exit_code"] for line in job.events("rank_failed")}.get(1) == -signal.SIGKILL


@pytest.mark.slow
def test_bad_data_on_rank_0_is_the_pods_exit_code_not_the_peers_broken_barrier(tiny_model_dir, tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{not json\n')
    result = run_job(*ddp_args(tmp_path, tiny_model_dir, "ddp-bad", "--set", f"data.train={bad}"))
    assert result.returncode == 65, result.stderr[-3000:]
    failed = [line for line in result.lines if line.get("event") == "job_failed"]
    assert failed and failed[0]["rank"] == 0 and "bad.jsonl:2" in failed[0]["error"]


@pytest.mark.slow
def test_two_nodes_upload_their_own_files_and_node_0_commits_them_together(tiny_model_dir, tmp_path) -> None:
    """Two launchers on loopback, one rank each, each with its own scratch: the multi-node protocol."""
    endpoint = f"127.0.0.1:{free_port()}"
    common = [
        *cpu_run_args(tmp_path, tiny_model_dir, "two-nodes"),
        "--set", "train.max_steps=8",
        "--set", "checkpoint.every_steps=4",
        "--set", "checkpoint.delete_after_final=false",
        "--nnodes", "2",
        "--nproc-per-node", "1",
        "--rdzv-endpoint", endpoint,
    ]  # fmt: skip
    nodes = [JobProcess(*common, "--set", f"run.scratch={tmp_path / f'scratch-node{k}'}") for k in (0, 1)]
    codes = [node.wait(timeout=300) for node in nodes]
    assert codes == [0, 0], "".join(nodes[0].raw[-20:] + nodes[1].raw[-20:])
    run_dir = tmp_path / "outputs" / "two-nodes"
    manifest = json.loads((run_dir / "checkpoints" / "checkpoint-00000008" / "MANIFEST.json").read_text())
    names = {entry["name"] for entry in manifest["files"]}
    assert {"rng_state_0.pth", "rng_state_1.pth", "model.safetensors", "optimizer.pt"} <= names
    part = json.loads((run_dir / "checkpoints" / "checkpoint-00000008" / ".parts" / "node-00001.json").read_text())
    assert [entry["name"] for entry in part["files"]] == ["rng_state_1.pth"]  # node 1 wrote only its rank's file
    assert (run_dir / "final" / "MANIFEST.json").is_file()
