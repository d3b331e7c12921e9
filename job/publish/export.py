"""Publish the final model: sharded safetensors, tokenizer, card, metrics, then the manifest.

Files are staged in scratch and pushed to `<run>/final/`; `MANIFEST.json` goes
last and is the commit point. Nothing pickled is ever published.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from job.errors import JobError
from job.logs import get_logger
from job.storage import Store
from job.storage.base import commit_manifest
from job.storage.manifest import Manifest

log = get_logger(__name__)

FINAL_PREFIX = "final"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def stage_final(
    staging: Path,
    model: Any,
    tokenizer: Any,
    *,
    max_shard_size: str,
    card: str,
    metrics: dict[str, Any],
    figure: Any | None = None,
    state_dict: dict[str, Any] | None = None,
) -> Path:
    """Write everything `final/` holds into a fresh `staging` directory.

    `state_dict`: the consolidated weights when the model is sharded over ranks (FSDP)."""
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.config.use_cache = True  # training turns the KV cache off; inference wants it back
    model.save_pretrained(staging, max_shard_size=max_shard_size, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(staging)
    (staging / "README.md").write_text(card, encoding="utf-8")
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    if figure is not None:
        from job.publish.card import write_plot

        write_plot(figure, staging)
    pickles = [p.name for p in staging.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise JobError(f"refusing to publish pickle files: {pickles}")
    return staging


def publish_final(run_store: Store, staging: Path, fence: Callable[[], None] | None = None) -> Manifest:
    """Push the staged directory to `final/`, manifest last.

    `fence` raises when this process may no longer write the run (its lease is not proven): it is
    checked before the files and again right before the manifest, the commit point."""
    if fence is not None:
        fence()
    manifest = run_store.push_directory(staging, FINAL_PREFIX, meta={"kind": "final"}, commit=False)
    if fence is not None:
        fence()
    commit_manifest(run_store, FINAL_PREFIX, manifest)
    log.info(
        "final_published",
        uri=f"{run_store.uri}/{FINAL_PREFIX}",
        files=len(manifest.files),
        total_bytes=manifest.total_bytes,
    )
    return manifest
