"""Everything before the weights load: pull and validate the data, resolve the model, tokenize with masks.

`train` and `validate` share this code, so what `validate` accepts, `train` accepts.

    fetch data ─ sha256 of every file ─ validated before? (cache) ─ else read + validate (exit 65 here)
    resolve the model, load the tokenizer, choose the chat template
    tokenized before, same tokenizer and settings? (cache: scratch, then the run's store) ─ else
        tokenize with masks (all cores) ─ truncate/drop ─ pack ─ save (scratch, then the store)
    report skipped records, log the statistics and one decoded example
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from job.config.schema import JobConfig, SourceConfig, scratch_dir
from job.data.assemble import Assembled, assemble, data_digests, source_rows
from job.data.cache import TokenizeCache, fingerprint, tokenizer_digest
from job.data.masking import apply_chat_template_choice, resolve_chat_template
from job.data.read import file_digests, list_data_files
from job.data.show import shown_examples
from job.data.sources import fetch_source, fetch_sources
from job.data.splits import MAX_LISTED, DataSplit, steps_per_epoch, tokenize_split
from job.data.templates import read_configured_template
from job.durability.scratch import process_alive
from job.errors import DataError, JobError
from job.logs import get_logger
from job.model.load import ModelSource, load_tokenizer, resolve_source
from job.storage import AlreadyExists, Store

log = get_logger(__name__)

__all__ = ["DataSplit", "Prepared", "prepare", "validate"]

SPECIAL_NOTES = {
    "control": "these strings became control tokens; data.special_strings: text tokenizes them as plain text",
    "text": "tokenized as plain text (data.special_strings: text)",
}
EXAMPLE_LOG_CHARS = 1000
"""The decoded example in the log: its start and end, not a whole max_length of a record's text."""


@dataclass
class DatasetInfo:
    """What is known of the records without holding them (a cache hit never reads them)."""

    format: str
    records: int
    records_per_file: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.records


@dataclass
class Prepared:
    """Everything known before the weights load."""

    dataset: DatasetInfo
    train: DataSplit
    eval: DataSplit | None
    source: ModelSource
    tokenizer: Any
    template_origin: str | None
    data_digests: dict[str, str]
    skipped: list[str] = field(default_factory=list)
    """Bad records skipped under data.max_invalid (`location: reason`)."""
    cache_hit: bool = False
    fingerprint: str = ""
    sources: list[dict[str, Any]] = field(default_factory=list)
    """Per `data.train` source: records, examples, tokens and token share, Hub commit (`job.data.assemble`)."""
    notes: dict[str, Any] = field(default_factory=dict)
    """Fields the records hold that training does not use, and template placeholders (`job.data.notes`)."""

    @property
    def format(self) -> str:
        return self.dataset.format


def prepare(config: JobConfig, *, store: Store | None = None) -> Prepared:
    """Pull and validate the data, resolve the model, tokenize with masks. No weights are loaded.

    `store` (the run's) holds the tokenization cache and the skipped-records report; without one
    (`validate`) both stay in scratch.
    """
    data = config.data
    scratch = scratch_dir(config)
    started = time.monotonic()
    if data.chat_template:
        read_configured_template(data.chat_template)  # a bad path or a forbidden file fails before any download
    fetched = fetch_sources(data, scratch, config.storage, pins=_recorded_commits(store))
    _record_commits(store, fetched)
    evaluation_source = SourceConfig(data.eval, data.format) if data.eval else None
    eval_root = fetch_source(evaluation_source, 0, scratch, config.storage).root if evaluation_source else None
    digests = data_digests(fetched)
    eval_digests = file_digests(list_data_files(eval_root), eval_root) if eval_root else None
    split_seed = config.train.seed if data.eval_fraction or len(fetched) > 1 else None
    mixture = [(s.config.path, s.config.format, s.config.weight, s.config.max_examples, s.revision) for s in fetched]
    data_key = fingerprint(
        {"train": digests, "eval": eval_digests, "format": data.format, "eval_fraction": data.eval_fraction,
         "seed": split_seed, "max_record_bytes": data.max_record_bytes,
         **({"sources": mixture} if len(fetched) > 1 else {})}
    )  # fmt: skip
    workdir = _records_workdir(scratch)
    cache = TokenizeCache(scratch / "cache", store if data.cache else None)
    validated = cache.read_validation(data_key) if data.cache else None
    loaded: Assembled | None = None
    if validated is None:
        loaded = assemble(config, fetched, eval_root, workdir)  # bad data stops here, before the model is pulled
        validated = loaded.record
        if data.cache:
            cache.write_validation(data_key, validated)
    else:
        log.info("data_validated_earlier", records=validated["records"], format=validated["format"])
    _check_invalid(validated["skipped"], data.max_invalid)

    source = resolve_source(config.model, scratch, config.storage)
    tokenizer = load_tokenizer(source, config.model)
    template, _ = resolve_chat_template(tokenizer, data.chat_template)
    template_origin = apply_chat_template_choice(tokenizer, data.chat_template) if validated["chat"] else None
    key = fingerprint(
        {"data": data_key, "tokenizer": tokenizer_digest(tokenizer), "chat_template": template if validated["chat"]
         else None, "train_on": data.train_on, "max_length": data.max_length, "truncation": data.truncation,
         "packing": data.packing, "text_mode": data.text_mode, "special_strings": data.special_strings}
    )  # fmt: skip
    hit = cache.load(key) if data.cache else None
    if hit is not None:
        splits, summary, where = hit
        log.info("tokenize_cache_hit", fingerprint=key, where=where, seconds=round(time.monotonic() - started, 2))
        train = DataSplit(splits["train"], summary["train"])
        evaluation = DataSplit(splits["eval"], summary["eval"]) if "eval" in splits else None
    else:
        if data.cache:
            log.info("tokenize_cache_miss", fingerprint=key)
        loaded = loaded or assemble(config, fetched, eval_root, workdir)
        train = tokenize_split(loaded.train, tokenizer, data, "train")
        evaluation = tokenize_split(loaded.eval, tokenizer, data, "eval") if loaded.eval is not None else None
        summary = {"train": train.stats, "eval": evaluation.stats if evaluation else None}
        if data.cache:
            splits = {"train": train.dataset, **({"eval": evaluation.dataset} if evaluation else {})}
            local = cache.save(key, splits, summary)
            cache.publish(key, local)
            train, evaluation = _reopen(local, train, evaluation)  # memory-mapped from disk, not held in RAM
    if data.cache or hit is not None:
        shutil.rmtree(workdir, ignore_errors=True)  # the splits are read from the cache entry, not from here
    skipped = [*validated["skipped"], *train.stats["invalid"], *(evaluation.stats["invalid"] if evaluation else [])]
    _check_invalid(skipped, data.max_invalid)
    if skipped:
        _write_report(skipped, config, scratch, store, data_key)
    info = DatasetInfo(validated["format"], validated["records"], validated["records_per_file"])
    prepared = Prepared(
        info, train, evaluation, source, tokenizer, template_origin, digests, skipped, hit is not None, key,
        sources=source_rows(validated, train.stats.get("tokens_by_origin", [])), notes=validated.get("notes", {}),
    )  # fmt: skip
    if len(prepared.sources) > 1 or any(row["revision"] for row in prepared.sources):  # Hub commits, with the run
        log.info("data_sources", sources=prepared.sources)
    _log_ready(prepared, time.monotonic() - started, data.special_strings)
    return prepared


def _records_workdir(scratch: Path) -> Path:
    """This process's folder for the records' Arrow files and the tokenizer's output (memory-mapped); folders
    left by processes that are gone are removed."""
    root = scratch / "records"
    if root.is_dir():
        for old in root.iterdir():
            pid = old.name.split("-", 1)[0]
            if not pid.isdigit() or int(pid) == os.getpid() or not process_alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
    return root / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


COMMITS = "reports/hub-commits.json"
"""Hub commits the run's first start read, by source path: every restart reads the same data."""


def _recorded_commits(store: Store | None) -> dict[str, str]:
    if store is None or not store.exists(COMMITS):
        return {}
    try:
        recorded = json.loads(store.read_bytes(COMMITS))
    except ValueError:
        log.warning("hub_commits_unreadable", key=COMMITS, note="the Hub revisions are resolved again")
        return {}
    return {k: v for k, v in recorded.items() if isinstance(v, str)} if isinstance(recorded, dict) else {}


def _record_commits(store: Store | None, fetched: list[Any]) -> None:
    """The first start's commits; a later start finds them (a source added later is drift, refused anyway)."""
    commits = {source.config.path: source.revision for source in fetched if source.revision}
    if store is not None and commits and not store.exists(COMMITS):
        with contextlib.suppress(AlreadyExists):  # another start recorded its own first: the next one reads those
            store.write_bytes(COMMITS, json.dumps(commits, indent=1, sort_keys=True).encode(), if_absent=True)


def _check_invalid(skipped: list[str], max_invalid: int) -> None:
    if len(skipped) > max_invalid:
        shown = "\n  ".join(skipped[:MAX_LISTED])
        raise DataError(
            f"{len(skipped)} bad record(s), more than data.max_invalid={max_invalid}:\n  {shown}",
            hint="fix the records, or raise data.max_invalid to skip them",
        )


def _reopen(local: Path, train: DataSplit, evaluation: DataSplit | None) -> tuple[DataSplit, DataSplit | None]:
    import datasets

    train = DataSplit(datasets.load_from_disk(str(local / "train")), train.stats)
    if evaluation is not None:
        evaluation = DataSplit(datasets.load_from_disk(str(local / "eval")), evaluation.stats)
    return train, evaluation


def _write_report(skipped: list[str], config: JobConfig, scratch: Path, store: Store | None, key: str) -> None:
    """The skipped records, in the run's store under reports/ (else scratch): the log names where."""
    name = f"reports/invalid-records-{key[:16]}.json"
    body = json.dumps({"max_invalid": config.data.max_invalid, "count": len(skipped), "records": skipped}, indent=1)
    if store is not None:
        try:
            store.write_bytes(name, body.encode(), if_absent=True)
        except AlreadyExists:
            pass  # written by an earlier start for the same files
        except JobError as exc:
            log.warning("invalid_records_report_not_stored", error=str(exc))
        where = f"{store.uri}/{name}"
    else:
        path = scratch / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
        where = str(path)
    log.warning("invalid_records_skipped", count=len(skipped), max_invalid=config.data.max_invalid, report=where)


def _log_ready(prepared: Prepared, seconds: float, special_strings: str) -> None:
    train = prepared.train.stats
    log.info(
        "data_ready",
        format=prepared.format,
        train_examples=train["examples"],
        eval_examples=prepared.eval.stats["examples"] if prepared.eval else 0,
        tokens=train["tokens"],
        tokens_total=train["tokens_total"],
        tokens_kept=train["tokens_kept"],
        trainable_tokens=train["trainable_tokens"],
        truncated=train["truncated"],
        blocks=train["blocks"],
        dropped=train["dropped"],
        skipped_records=len(prepared.skipped),
        sequences=train["sequences"],
        packed=train["packed"],
        chat_template=prepared.template_origin,
        cache_hit=prepared.cache_hit,
        seconds=round(seconds, 2),
    )
    if train["truncated"] or train["dropped"]:
        log.warning(
            "examples_truncated",
            truncated=train["truncated"],
            dropped=train["dropped"],
            first_dropped=train["dropped_sources"][:3],
        )
    special = train["special_strings"]
    if special["records"]:
        log.warning(
            "special_strings_in_content",
            records=special["records"],
            occurrences=special["occurrences"],
            first=special["first"],
            note=SPECIAL_NOTES[special_strings],
        )
    example = train["example"]
    log.info(
        "example_masked",
        source=example["source"],
        note="trained tokens are between « and »",
        text=_ends(example["text"], EXAMPLE_LOG_CHARS),
    )


def _ends(text: str, limit: int) -> str:
    """`text`, or its start and end when longer than `limit` (the masks at both ends stay visible)."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]} [... {len(text) - 2 * half} characters ...] {text[-half:]}"


def validate(config: JobConfig, *, store: Store | None = None, show: int = 0) -> dict[str, Any]:
    """Config and data checks, with the statistics a user needs to size the run; `show`: that many training
    examples decoded, with their trained spans (`job.data.show`)."""
    prepared = prepare(config, store=store)
    train = prepared.train.stats
    per_step = config.train.per_device_train_batch_size * config.train.gradient_accumulation_steps
    report: dict[str, Any] = {
        "format": prepared.format,
        "files": prepared.data_digests,
        "records": prepared.dataset.records,
        "records_per_file": prepared.dataset.records_per_file,
        "skipped_records": len(prepared.skipped),
        "examples": train["examples"],
        "eval_examples": prepared.eval.stats["examples"] if prepared.eval else 0,
        "tokens": train["tokens"],
        "tokens_total": train["tokens_total"],
        "tokens_kept": train["tokens_kept"],
        "tokens_total_at_least": train["tokens_total_at_least"],
        "trainable_tokens": train["trainable_tokens"],
        "truncated": train["truncated"],
        "dropped": train["dropped"],
        "text_mode": config.data.text_mode,
        "documents": train["documents"],
        "blocks": train["blocks"],
        "special_strings": train["special_strings"],
        "max_length": config.data.max_length,
        "length_p50": train["lengths"]["p50"],
        "length_p90": train["lengths"]["p90"],
        "length_p99": train["lengths"]["p99"],
        "length_max": train["lengths"]["max"],
        "packing": config.data.packing,
        "sequences": train["sequences"],
        "examples_per_optimizer_step": per_step if not config.data.packing else None,
        "sequences_per_optimizer_step": per_step,
        "optimizer_steps_per_epoch": steps_per_epoch(train["sequences"], config.train),
        "chat_template": prepared.template_origin,
        "tokenize_cache_hit": prepared.cache_hit,
    }
    if config.data.packing:
        report["packing_efficiency"] = train["packing_efficiency"]
    report["sources"] = prepared.sources
    report["notes"] = prepared.notes
    if show:
        report["shown"] = shown_examples(prepared.train, prepared.tokenizer, show)
    return report
