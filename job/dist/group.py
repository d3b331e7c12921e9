"""Rank discipline inside one worker process: who pulls, who logs, who writes, and how ranks agree.

A worker is a process started by torch's elastic launcher (ours in `launch`, or a user's
`torchrun` / `accelerate launch`): it finds RANK, WORLD_SIZE, LOCAL_RANK... in its
environment. One process alone gets `Group.single()`, whose every operation is a no-op,
so the run's story reads the same for one rank or many.

Two process groups, two timeouts:
- the default group (gloo on CPU; `cpu:gloo,cuda:nccl` on GPUs) carries training
  collectives and the per-step agreement, with `collective_timeout_seconds`: a rank
  that dies takes the others down within that time instead of hanging them;
- a gloo `setup` group carries the barriers around the long phases (pulling inputs,
  tokenizing, publishing), with `setup_timeout_seconds`. Those barriers are awaited
  in a Python loop so that a SIGTERM during a long wait is handled at once.

torch is imported only where a group is used: the CLI records outcomes without it.

Ranks on one node are contiguous (torchelastic's assignment): the node's first rank is
`rank - local_rank`, and it pulls the node's inputs while the others wait.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pickle
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from job.config.schema import DistributedConfig
from job.errors import JobError
from job.logs import adopt_torch_loggers, get_logger

log = get_logger(__name__)
T = TypeVar("T")

_POLL_SECONDS = 0.2


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    nnodes: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Global rank 0: the run's only writer of leases, metrics, manifests and the final output."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """The node's first rank: it pulls the node's inputs and uploads the node's checkpoint files."""
        return self.local_rank == 0

    @property
    def local_main_rank(self) -> int:
        return self.rank - self.local_rank


OUTCOMES_ENV = "SFT_RANK_OUTCOMES"
"""Set by our launcher: a directory where each rank records how and when it ended."""


def record_outcome(exit_code: int, environ: Mapping[str, str] = os.environ) -> None:
    """As a rank of our launcher: write `rank-<R>.json` (exit code, wall time) just before exiting.

    The launcher orders failures by these times: the elastic agent also reports the ranks it tore
    down after the first failure, and a torn-down rank exits 75 or 1 like a root cause would."""
    directory, rank = environ.get(OUTCOMES_ENV), environ.get("RANK")
    if not directory or rank is None:
        return
    with contextlib.suppress(OSError):  # the outcome only sharpens the launcher's exit code
        Path(directory, f"rank-{rank}.json").write_text(json.dumps({"exit_code": exit_code, "time": time.time()}))


def read_outcomes(directory: Path) -> dict[int, float]:
    """{rank: wall time it ended} for the ranks that recorded an outcome."""
    ended = {}
    for path in directory.glob("rank-*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            ended[int(path.stem.removeprefix("rank-"))] = float(json.loads(path.read_text())["time"])
    return ended


def is_worker(environ: Mapping[str, str] = os.environ) -> bool:
    """True in a process started by a torch launcher (ours, torchrun or accelerate launch)."""
    return "LOCAL_RANK" in environ and int(environ.get("WORLD_SIZE", "1")) > 1


def ranks_from_env(environ: Mapping[str, str] = os.environ) -> Ranks:
    if not is_worker(environ):
        return Ranks()
    world = int(environ["WORLD_SIZE"])
    local_world = int(environ.get("LOCAL_WORLD_SIZE", world))
    return Ranks(
        rank=int(environ["RANK"]),
        world_size=world,
        local_rank=int(environ["LOCAL_RANK"]),
        local_world_size=local_world,
        node_rank=int(environ.get("GROUP_RANK", int(environ["RANK"]) // local_world)),
        nnodes=max(world // local_world, 1),
    )


class Group:
    """The worker's view of the other ranks; every method is a no-op for a single process."""

    def __init__(self, ranks: Ranks, setup_group: Any = None, setup_timeout: float = 0.0) -> None:
        self.ranks = ranks
        self._setup = setup_group
        self._setup_timeout = setup_timeout

    @classmethod
    def single(cls) -> Group:
        return cls(Ranks())

    @classmethod
    def join(cls, settings: DistributedConfig) -> Group:
        """Join the process group of the launcher that started this worker (once per process)."""
        ranks = ranks_from_env()
        if not ranks.distributed:
            return cls.single()
        import torch
        import torch.distributed as dist

        adopt_torch_loggers()
        on_gpu = torch.cuda.is_available()
        if on_gpu:
            torch.cuda.set_device(ranks.local_rank)
        if not dist.is_initialized():
            # accelerate (inside Trainer) finds this group initialized and uses it with our timeout.
            dist.init_process_group(
                backend="cpu:gloo,cuda:nccl" if on_gpu else "gloo",
                timeout=datetime.timedelta(seconds=settings.collective_timeout_seconds),
            )
        setup = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=settings.setup_timeout_seconds))
        log.info(
            "process_group_joined",
            pid=os.getpid(),
            rank=ranks.rank,
            world_size=ranks.world_size,
            local_rank=ranks.local_rank,
            node_rank=ranks.node_rank,
            nnodes=ranks.nnodes,
            backend=dist.get_backend(),
            collective_timeout_seconds=settings.collective_timeout_seconds,
        )
        return cls(ranks, setup, settings.setup_timeout_seconds)

    @property
    def distributed(self) -> bool:
        return self.ranks.distributed

    def barrier(self, phase: str) -> None:
        """Wait for every rank (setup group); a signal during the wait is handled at once."""
        if not self.distributed:
            return
        import torch.distributed as dist

        self._await(dist.barrier(group=self._setup, async_op=True), phase)

    def all_gather(self, value: Any, phase: str) -> list[Any]:
        """Every rank's `value`, by rank (setup group; small picklable values)."""
        if not self.distributed:
            return [value]
        import torch
        import torch.distributed as dist

        data = torch.frombuffer(bytearray(pickle.dumps(value)), dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.ranks.world_size)]
        self._await(dist.all_gather(sizes, size, group=self._setup, async_op=True), phase)
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[: data.numel()] = data
        gathered = [torch.zeros(longest, dtype=torch.uint8) for _ in sizes]
        self._await(dist.all_gather(gathered, padded, group=self._setup, async_op=True), phase)
        return [pickle.loads(g[: int(s.item())].numpy().tobytes()) for g, s in zip(gathered, sizes, strict=True)]

    def from_main(self, value: T, phase: str) -> T:
        """Rank 0's `value` on every rank."""
        return self.all_gather(value, phase)[0] if self.distributed else value

    def from_local_main(self, value: T, phase: str) -> T:
        """The node's first rank's `value` on every rank of the node."""
        return self.all_gather(value, phase)[self.ranks.local_main_rank] if self.distributed else value

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (default group, collective timeout): one small all-reduce."""
        return self._all_reduce(values, "SUM")

    def max(self, values: list[float]) -> list[float]:
        """Element-wise maximum over ranks (default group, collective timeout): one small all-reduce."""
        return self._all_reduce(values, "MAX")

    def _all_reduce(self, values: list[float], op: str) -> list[float]:
        if not self.distributed:
            return [float(v) for v in values]
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
        return tensor.tolist()

    def _await(self, work: Any, phase: str) -> None:
        started = time.monotonic()
        while not work.is_completed():
            # The poll (not a blocking wait) lets Python run a SIGTERM handler while peers are busy.
            if time.monotonic() - started > self._setup_timeout:
                raise JobError(
                    f"rank {self.ranks.rank} waited {self._setup_timeout:.0f} s for the other ranks ({phase})",
                    hint="a rank is stuck or gone; see its log lines; distributed.setup_timeout_seconds bounds this",
                )
            time.sleep(_POLL_SECONDS)
        work.wait()  # raises if a peer failed

    def close(self) -> None:
        if not self.distributed:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
