"""Config drift: a restart may not silently train a different run.

The first start records `config.resolved.yaml`; a restart compares the settings
that define what is trained (model identity, data, training hyper-parameters).
Where and how the job runs (run.scratch, storage, checkpoint cadence and grace,
values a planner picks for the GPU at hand) is not drift.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from job.config.schema import JobConfig

DEFINING = {
    "model": ("source", "revision", "dtype", "trust_remote_code"),
    "data": None,  # every data key
    "train": None,  # every hyper-parameter, SFTConfig pass-through included
    "distributed": ("nproc_per_node", "nnodes"),  # the world size sets the global batch and the data order
}
MACHINE_DERIVED = {"train": ("dataloader_num_workers", "report_to", "logging_steps")}
SPLIT_KEYS = ("per_device_train_batch_size", "gradient_accumulation_steps")
"""Micro-batch x accumulation: the planner may choose them for the GPU when the user set neither."""


def keep_recorded_split(config: JobConfig, recorded: Any) -> dict[str, int] | None:
    """A restart keeps the micro-batch x accumulation the run began with (the planner chose it for that start's
    GPU; a restart on another card could choose another) unless the user set one; returns what it adopted.

    Adopted values count as set, so this start's planner keeps them too.
    """
    train = recorded.get("train") if isinstance(recorded, dict) else None
    if not isinstance(train, dict) or any(config.is_set(f"train.{key}") for key in SPLIT_KEYS):
        return None
    split = {key: train.get(key) for key in SPLIT_KEYS}
    if not all(isinstance(value, int) and not isinstance(value, bool) and value >= 1 for value in split.values()):
        return None
    for key, value in split.items():
        setattr(config.train, key, value)
    config.mark_given(config.given | {f"train.{key}" for key in SPLIT_KEYS})
    return split


def config_drift(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences (`train.learning_rate: 1e-05 -> 2e-05`), empty when none.

    A field the recording version did not have, now at its default, is not drift: upgrading
    the image mid-run must not strand a run.
    """
    from job.config.load import redacted
    from job.config.schema import JobConfig
    from job.logs import shorten

    # Credentials in URLs are never recorded (and a record from before that rule holds them): compare the
    # redacted forms, so the same URL is never drift and a changed password is not a different run.
    recorded, current = redacted(recorded), redacted(current)
    defaults = JobConfig().to_dict()
    changes = []
    for section, keys in DEFINING.items():
        old, new = recorded.get(section) or {}, current.get(section) or {}
        names = keys if keys is not None else sorted(set(old) | set(new))
        ignored = MACHINE_DERIVED.get(section, ())
        for name in names:
            if name in ignored:
                continue
            if name not in old and name in defaults[section] and new.get(name) == defaults[section][name]:
                continue
            if old.get(name) != new.get(name):
                changes.append(f"{section}.{name}: {shorten(repr(old.get(name)))} -> {shorten(repr(new.get(name)))}")
    return changes
