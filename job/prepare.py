"""Everything before the weights load: pull and validate the data, resolve the model, tokenize with masks.

`train` and `validate` share this code, so what `validate` accepts, `train` accepts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from job.config import JobConfig
from job.data import Dataset, file_digests, load_dataset, split_for_eval
from job.logs import get_logger
from job.masking import TokenizedSet, apply_chat_template_choice, describe_example, tokenize_examples
from job.model import ModelSource, load_tokenizer, resolve_source
from job.storage import fetch_input

log = get_logger(__name__)


def scratch_dir(config: JobConfig) -> Path:
    return Path(config.run.scratch).absolute()


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
