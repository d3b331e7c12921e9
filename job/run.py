"""One run, top to bottom: the story in DESIGN.md, calling one module per step.

    open the run's store ─ already complete? exit 0
    pull + read + validate data  (bad data fails here, before any weights load)
    resolve the model source, load the tokenizer, tokenize with loss masks
    load the model ─ train (TRL SFTTrainer) ─ evaluate
    stage final/ (safetensors, tokenizer, card, metrics) ─ push, MANIFEST.json last

`validate` runs the same first half and stops before the weights.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from job.config import JobConfig, redacted, to_yaml
from job.data import Dataset, file_digests, load_dataset, split_for_eval
from job.export import FINAL_PREFIX, publish_final, stage_final
from job.logs import get_logger
from job.masking import TokenizedSet, apply_chat_template_choice, describe_example, tokenize_examples
from job.model import ModelSource, load_model, load_tokenizer, resolve_source
from job.storage import AlreadyExists, Store, fetch_input, open_store

log = get_logger(__name__)

RESOLVED_CONFIG = "config.resolved.yaml"


@dataclass
class Prepared:
    """Everything known before the weights load."""

    dataset: Dataset
    train: TokenizedSet
    eval: TokenizedSet | None
    source: ModelSource
    tokenizer: Any
    template_origin: str | None
    data_digests: dict[str, str]


def run_store(config: JobConfig) -> Store:
    return open_store(config.run.output, config.storage).child(config.run.name)


def scratch_dir(config: JobConfig) -> Path:
    return Path(config.run.scratch).absolute()


def prepare(config: JobConfig) -> Prepared:
    """Pull and validate the data, resolve the model, tokenize with masks. No weights are loaded."""
    scratch = scratch_dir(config)
    started = time.monotonic()
    dataset = load_dataset(fetch_input(config.data.train, scratch, config.storage), config.data.format)
    dataset, held_out = split_for_eval(dataset, config.data.eval_fraction, config.train.seed)
    if config.data.eval:
        held_out = load_dataset(fetch_input(config.data.eval, scratch, config.storage), dataset.format)
    digests = file_digests(dataset.files)

    source = resolve_source(config.model, scratch, config.storage)
    tokenizer = load_tokenizer(source, config.model)
    template_origin = None
    if dataset.format == "messages":
        template_origin = apply_chat_template_choice(tokenizer, config.data.chat_template)

    def tokenize(part: Dataset) -> TokenizedSet:
        return tokenize_examples(
            part.examples, tokenizer, max_length=config.data.max_length, train_on=config.data.train_on
        )

    train = tokenize(dataset)
    evaluation = tokenize(held_out) if held_out is not None else None
    log.info(
        "data_ready",
        format=dataset.format,
        train_examples=len(train.input_ids),
        eval_examples=len(evaluation.input_ids) if evaluation else 0,
        tokens=train.tokens,
        trainable_tokens=train.trainable_tokens,
        truncated=train.truncated,
        dropped=len(train.dropped),
        chat_template=template_origin,
        seconds=round(time.monotonic() - started, 2),
    )
    log.info(
        "example_masked",
        source=train.sources[0],
        note="trained tokens are between « and »",
        text=describe_example(tokenizer, train.input_ids[0], train.labels[0]),
    )
    return Prepared(dataset, train, evaluation, source, tokenizer, template_origin, digests)


def validate(config: JobConfig) -> dict[str, Any]:
    """Config and data checks, with the statistics a user needs to size the run."""
    prepared = prepare(config)
    train = prepared.train
    lengths = sorted(len(ids) for ids in train.input_ids)
    per_step = config.train.per_device_train_batch_size * config.train.gradient_accumulation_steps
    return {
        "format": prepared.dataset.format,
        "files": {str(f): d for f, d in prepared.data_digests.items()},
        "records": len(prepared.dataset),
        "examples": len(lengths),
        "eval_examples": len(prepared.eval.input_ids) if prepared.eval else 0,
        "tokens": train.tokens,
        "trainable_tokens": train.trainable_tokens,
        "truncated": train.truncated,
        "dropped": len(train.dropped),
        "max_length": config.data.max_length,
        "length_max": lengths[-1],
        "optimizer_steps_per_epoch": -(-len(lengths) // per_step),
        "chat_template": prepared.template_origin,
    }


def train(config: JobConfig) -> dict[str, Any]:
    """The whole run; returns the final metrics (or the committed ones when already complete)."""
    store = run_store(config)
    if store.is_committed(FINAL_PREFIX):
        log.info("already_complete", uri=f"{store.uri}/{FINAL_PREFIX}")
        return {"already_complete": True}
    _record_resolved_config(store, config)
    timings: dict[str, float] = {}

    started = time.monotonic()
    prepared = prepare(config)
    timings["prepare_seconds"] = time.monotonic() - started

    from datasets import Dataset as HFDataset

    from job.train import build_trainer, detect_device

    def as_hf(part: TokenizedSet) -> HFDataset:
        return HFDataset.from_dict({"input_ids": part.input_ids, "labels": part.labels})

    device = detect_device()
    started = time.monotonic()
    model = load_model(prepared.source, config.model, device)
    timings["load_seconds"] = time.monotonic() - started

    work = scratch_dir(config) / "runs" / config.run.name
    trainer, step_metrics = build_trainer(
        config,
        model,
        prepared.tokenizer,
        as_hf(prepared.train),
        as_hf(prepared.eval) if prepared.eval else None,
        work / "trainer",
        device,
    )
    started = time.monotonic()
    trainer.train()
    timings["train_seconds"] = time.monotonic() - started

    metrics: dict[str, Any] = {**step_metrics.summary(), "data_format": prepared.dataset.format}
    metrics["loss_per_step"] = [[r.step, r.loss] for r in step_metrics.steps]
    if prepared.eval:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]

    from job.card import render_card

    started = time.monotonic()
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    card = render_card(
        config,
        base_model=config.model.source,
        revision=config.model.revision,
        data_files=prepared.data_digests,
        metrics=metrics,
    )
    staging = stage_final(
        work / "final-staging",
        unwrapped,
        prepared.tokenizer,
        max_shard_size=config.run.max_shard_size,
        card=card,
        metrics={**metrics, "timings": timings},
    )
    publish_final(store, staging)
    timings["publish_seconds"] = time.monotonic() - started
    log.info("run_finished", metrics={k: v for k, v in metrics.items() if k != "loss_per_step"}, timings=timings)
    return metrics


def _record_resolved_config(store: Store, config: JobConfig) -> None:
    text = to_yaml(config)
    log.info("config_resolved", config=redacted(config.to_dict()))
    # On a restart the first start's record stays (drift is compared by the checkpoint issue).
    with contextlib.suppress(AlreadyExists):
        store.write_bytes(RESOLVED_CONFIG, text.encode(), if_absent=True)
