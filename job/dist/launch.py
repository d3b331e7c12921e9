"""Start the ranks through torch's elastic launcher and give the pod *our* exit code.

`train` with `distributed.nproc_per_node` (or `nnodes`) above 1 runs here: the launcher
process starts the ranks (subprocesses running the same command line; they find their
rank in the environment and train), and maps their exit codes to one:

    a rank exited with a fatal code (64, 65, 66, 70, 77)  -> that code (the lowest rank's)
    else a rank was killed without a word (SIGKILL, abort)  -> 1, retryable
    else the rank that ended first exited 75 (preempted), or the launcher was signalled  -> 75
    else (a rank failed unexpectedly, or a node never joined)  -> 1, retryable

`torchrun` would exit 1 whenever a child fails, 75s included, so a Kubernetes
podFailurePolicy could not tell preemption from a crash. The elastic agent also reports the
ranks it tore down because a peer failed; each rank records when it ended (a file in a
directory the launcher names), so the earliest failure is the root cause. On SIGTERM the agent
forwards the signal to every rank and waits `checkpoint.grace_seconds` (+5 s) for them
to agree on a last step, save if it fits, and exit, before it kills them.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from job.config.schema import JobConfig
from job.dist.group import OUTCOMES_ENV, read_outcomes
from job.errors import FATAL_EXIT_CODES, UNEXPECTED_EXIT_CODE, Preempted
from job.logs import adopt_torch_loggers, get_logger

log = get_logger(__name__)

SHUTDOWN_MARGIN_SECONDS = 5
"""Beyond checkpoint.grace_seconds, time the ranks get to exit after SIGTERM before SIGKILL."""


def exit_code_for(failures: dict[int, int], ended: dict[int, float] | None = None) -> int:
    """One exit code for the pod from the failed ranks' codes ({rank: code}; negative: killed by signal).

    `ended` holds when each rank that could say so ended (`distributed.record_outcome`). The agent
    reports the ranks it tore down (SIGTERM) after the first failure too, and a torn-down rank exits
    75 (its SIGTERM handler) or 1 (a broken collective) just like a root cause: the earliest wins."""
    ended = ended or {}
    codes = [failures[rank] for rank in sorted(failures)]
    fatal = [code for code in codes if code in FATAL_EXIT_CODES]
    if fatal:
        return fatal[0]
    # Killed without a word (OOM killer, node loss, an abort): never a teardown's SIGTERM, always a crash.
    if any(code < 0 and code != -signal.SIGTERM and rank not in ended for rank, code in failures.items()):
        return UNEXPECTED_EXIT_CODE
    timed = sorted((ended[rank], code) for rank, code in failures.items() if rank in ended)
    if timed:
        return Preempted.exit_code if timed[0][1] == Preempted.exit_code else UNEXPECTED_EXIT_CODE
    # -SIGTERM: a rank signalled before it had installed its handler, i.e. preempted as well.
    if any(code in (Preempted.exit_code, -signal.SIGTERM) for code in codes):
        return Preempted.exit_code
    return UNEXPECTED_EXIT_CODE


def hosts_rendezvous(endpoint: str | None, hostname: str | None = None) -> bool | None:
    """True on the node named by the endpoint's first DNS label (a Kubernetes pod's hostname), else None.

    torch decides by resolving the endpoint, which fails while the pod's own DNS record is not
    published yet: pod 0 would then wait for a host that is itself."""
    if not endpoint:
        return None
    host = endpoint.rsplit(":", 1)[0]
    try:
        ipaddress.ip_address(host.strip("[]"))
        return None  # an address: torch's own check compares it with this node's addresses
    except ValueError:
        pass
    return True if host.split(".")[0] == (hostname or socket.gethostname()).split(".")[0] else None


def launch_config(config: JobConfig) -> Any:
    from torch.distributed.launcher.api import LaunchConfig

    settings = config.distributed
    rdzv_configs: dict[str, Any] = {"timeout": int(settings.setup_timeout_seconds)}
    if hosts_rendezvous(settings.rdzv_endpoint):
        rdzv_configs["is_host"] = True
    return LaunchConfig(
        min_nodes=settings.nnodes,
        max_nodes=settings.nnodes,
        nproc_per_node=settings.nproc_per_node,
        run_id=settings.rdzv_id or config.run.name,
        role="sft",
        rdzv_backend="c10d",
        # One node: torchrun --standalone's choice, a private store on a free port.
        rdzv_endpoint=settings.rdzv_endpoint or "localhost:0",
        rdzv_configs=rdzv_configs,
        max_restarts=0,  # a restart is the platform's (a new pod resumes from the newest checkpoint)
        monitor_interval=0.5,
        start_method="spawn",
        shutdown_timeout=int(config.checkpoint.grace_seconds) + SHUTDOWN_MARGIN_SECONDS,
    )


def launch(config: JobConfig, argv: Sequence[str]) -> int:
    """Run `python -m job <argv>` on every rank; the ranks' outcome as one exit code."""
    settings = config.distributed
    outcomes = Path(tempfile.mkdtemp(prefix="sft-ranks-"))
    os.environ[OUTCOMES_ENV] = str(outcomes)  # inherited by the ranks
    # Ranks share the node's cores (torchrun would pin each to one thread; dataloading here is light).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // settings.nproc_per_node)))
    log.info(
        "launching_ranks",
        nproc_per_node=settings.nproc_per_node,
        nnodes=settings.nnodes,
        world_size=settings.world_size,
        rdzv_endpoint=settings.rdzv_endpoint or "localhost (one node)",
    )
    try:
        return _launch_and_map(config, argv, outcomes)
    finally:
        shutil.rmtree(outcomes, ignore_errors=True)


def _launch_and_map(config: JobConfig, argv: Sequence[str], outcomes: Path) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.launcher.api import elastic_launch

    adopt_torch_loggers()  # torch.distributed, just imported, added its own stderr handlers
    settings = config.distributed
    try:
        elastic_launch(launch_config(config), entrypoint=sys.executable)("-m", "job", *argv)
    except ChildFailedError as exc:
        failures = {rank: failure.exitcode for rank, failure in exc.failures.items()}
        ended = read_outcomes(outcomes)
        for rank, code in sorted(failures.items()):
            log.error("rank_failed", failed_rank=rank, exit_code=code, ended_at=ended.get(rank))
        code = exit_code_for(failures, ended)
        log.error("ranks_failed", exit_code=code, failed_ranks=sorted(failures))
        return code
    except SignalException as exc:
        log.warning("launcher_signalled", signal=exc.sigval.name, exit_code=Preempted.exit_code)
        return Preempted.exit_code
    except RendezvousError as exc:
        log.error(
            "rendezvous_failed",
            error=str(exc),
            exit_code=UNEXPECTED_EXIT_CODE,
            hint="every node must run the same command with the same distributed.rdzv_endpoint and nnodes",
        )
        return UNEXPECTED_EXIT_CODE
    log.info("ranks_finished", world_size=settings.world_size)
    return 0
