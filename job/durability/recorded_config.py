"""The run's recorded config: a restart may not silently train something else.

The first start that trains records `config.resolved.yaml` (`TrainingRun.record_start`); every later
start compares the settings that define what is trained against it (`job.config.drift`) and refuses
(64) a difference unless `--allow-config-change`, which keeps the accepted change under `config-changes/`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import yaml

from job.config.drift import config_drift, keep_recorded_split
from job.config.load import redacted, to_yaml
from job.errors import ConfigError
from job.logs import get_logger

if TYPE_CHECKING:
    from job.config.schema import JobConfig
    from job.storage import Store

log = get_logger(__name__)

RESOLVED_CONFIG = "config.resolved.yaml"
CHANGES_PREFIX = "config-changes"


def check_config_drift(store: Store, config: JobConfig, *, allow_change: bool) -> None:
    """Refuse (64) a restart that would train something else than the config recorded when training began.

    A start that failed before training (bad path, bad data) recorded nothing and binds nothing. The batch
    split the planner chose for the first start's GPU is kept, so a restart on another card trains the same run.
    """
    text = to_yaml(config)
    log.info("config_resolved", config=redacted(config.to_dict()))
    if store.stat(RESOLVED_CONFIG) is None:
        return
    recorded = yaml.safe_load(store.read_bytes(RESOLVED_CONFIG))
    if kept := keep_recorded_split(config, recorded):
        log.info("batch_split_kept", **kept)
        text = to_yaml(config)
    changes = config_drift(recorded, yaml.safe_load(text))
    if not changes:
        return
    if not allow_change:
        raise ConfigError(
            "this run was started with a different config:\n  " + "\n  ".join(changes),
            hint="restore those values, use a new run.name, or pass --allow-config-change",
        )
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    body = yaml.safe_dump({"changes": changes}).encode() + text.encode()
    store.write_bytes(f"{CHANGES_PREFIX}/{stamp}.yaml", body)
    log.warning("config_changed_allowed", changes=changes)
