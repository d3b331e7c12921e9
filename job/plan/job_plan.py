"""`plan` for a job config: find the model's config.json without its weights, then `job.plan.memory.make_plan`.

`train` asks the same question before loading weights and refuses (exit 64) a configuration
that cannot fit, unless `--force`.
"""

from __future__ import annotations

import json
from typing import Any

from job.config.schema import JobConfig, scratch_dir
from job.errors import ConfigError
from job.logs import get_logger

log = get_logger(__name__)


def model_config_source(config: JobConfig) -> Any:
    """A config dict, a directory or a Hub id for `make_plan`, fetching only config.json."""
    from job.model.load import resolve_source
    from job.storage import is_remote, open_store

    source = config.model.source
    if is_remote(source):
        return json.loads(open_store(source.rstrip("/"), config.storage).read_bytes("config.json"))
    # builtin: built once; local: checked; Hub id: AutoConfig downloads config.json alone
    return resolve_source(config.model, scratch_dir(config), config.storage).location


def plan_job(
    config: JobConfig,
    *,
    model_config: Any = None,
    gpu_memory_bytes: int | None = None,
    dataset_tokens: int | None = None,
) -> dict[str, Any]:
    from job.plan.memory import make_plan

    train = config.train
    epochs = train.num_train_epochs
    if train.max_steps > 0 and dataset_tokens:
        epochs = 0.0  # stated in steps: the time follows from steps, not from the dataset
    from job.model.load import ModelSource, hub_errors

    source = model_config if model_config is not None else model_config_source(config)
    with hub_errors(ModelSource(str(source), "hub", config.model.revision)):
        return make_plan(
            source,
            dtype=config.model.dtype,
            optimizer=train.optim,
            per_device_batch_size=train.per_device_train_batch_size,
            seq_length=config.data.max_length,
            activation_checkpointing=bool(train.activation_checkpointing),
            gpu_memory_bytes=gpu_memory_bytes,
            dataset_tokens=dataset_tokens,
            epochs=epochs or 1.0,
            world_size=world_size(config),
            sharded=train.fsdp,
        )


def world_size(config: JobConfig) -> int:
    """The ranks this run trains on: the launcher's (when this is one of its ranks) or the config's."""
    from job.dist.group import ranks_from_env

    ranks = ranks_from_env()
    return ranks.world_size if ranks.distributed else config.distributed.world_size


def refuse_if_it_cannot_fit(plan: dict[str, Any], force: bool) -> None:
    if plan["fits"]:
        return
    gib = 2**30
    message = (
        f"the planner estimates {plan['memory_bytes']['total'] / gib:.1f} GiB for this run on "
        f"{plan['gpu']['name']} ({plan['gpu_memory_bytes'] / gib:.1f} GiB)"
    )
    if force:
        log.warning("plan_does_not_fit_forced", estimate=message, advice=plan["advice"])
        return
    raise ConfigError(message, hint="; ".join(plan["advice"]) + " (or pass --force)")
