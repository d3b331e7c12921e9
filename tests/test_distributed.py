"""job/distributed: rank discovery and the Group's operations, on a real 2-process gloo group."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch.multiprocessing as mp

from conftest import free_port
from job.config.schema import DistributedConfig
from job.dist.group import Group, Ranks, is_worker, ranks_from_env


def test_a_single_process_is_not_a_worker_and_its_group_does_nothing() -> None:
    assert not is_worker({})
    assert not is_worker({"LOCAL_RANK": "0", "WORLD_SIZE": "1"})
    group = Group.join(DistributedConfig())
    assert not group.distributed and group.ranks == Ranks()
    group.barrier("nothing to wait for")
    assert group.all_gather({"a": 1}, "x") == [{"a": 1}]
    assert group.from_main(3, "x") == 3 and group.from_local_main(4, "x") == 4
    assert group.sum([1.0, 2.0]) == [1.0, 2.0]


def test_ranks_come_from_the_launchers_environment() -> None:
    env = {"LOCAL_RANK": "1", "RANK": "5", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1"}
    ranks = ranks_from_env(env)
    assert is_worker(env)
    assert (ranks.rank, ranks.local_rank, ranks.node_rank, ranks.nnodes) == (5, 1, 1, 2)
    assert not ranks.is_main and not ranks.is_local_main and ranks.local_main_rank == 4
    assert Ranks(rank=4, world_size=8, local_rank=0, local_world_size=4).is_local_main


def _worker(local_rank: int, port: int, results: dict) -> None:
    # Two "nodes" of one rank each would hide local_main_rank; here one node of two ranks.
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(local_rank),
            "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
        }
    )
    group = Group.join(DistributedConfig(collective_timeout_seconds=30, setup_timeout_seconds=30))
    out = {
        "gathered": group.all_gather({"rank": local_rank, "blob": "x" * (10 + 1000 * local_rank)}, "gather"),
        "from_main": group.from_main(f"rank{local_rank}", "main"),
        "sum": group.sum([1.0, float(local_rank), local_rank == 1]),
    }
    # A SIGTERM while this rank waits at a barrier runs its handler at once, not when the barrier ends.
    if local_rank == 0:
        import threading

        def on_term(signum, frame):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, on_term)
        sent = time.monotonic() + 0.5
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
        try:
            group.barrier("rank 1 is busy for 3 s")
        except KeyboardInterrupt:
            out["barrier_interrupted_after"] = time.monotonic() - sent
    results[local_rank] = out
    if local_rank == 1:
        time.sleep(3)  # busy, not at the barrier; rank 0's signal must not wait for this
    os._exit(0)  # rank 0 abandoned a barrier: no orderly group shutdown


@pytest.mark.slow
def test_a_two_rank_group_gathers_sums_and_stays_interruptible() -> None:
    manager = mp.Manager()
    results = manager.dict()
    mp.start_processes(_worker, args=(free_port(), results), nprocs=2, start_method="spawn", join=True)
    zero, one = results[0], results[1]
    assert [g["rank"] for g in zero["gathered"]] == [0, 1]
    assert zero["gathered"] == one["gathered"] and len(one["gathered"][1]["blob"]) == 1010
    assert zero["from_main"] == one["from_main"] == "rank0"
    assert zero["sum"] == one["sum"] == [2.0, 1.0, 1.0]
    assert zero["barrier_interrupted_after"] < 2.0  # the peer was busy for 3 s
