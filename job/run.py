"""One run, top to bottom: the story in DESIGN.md, calling one module per step.

    open the run's store ─ already complete? exit 0
    take the run's lease (one writer) ─ refuse config drift
    pull + read + validate data  (bad data fails here, before any weights load)
    resolve the model source, load the tokenizer, tokenize with loss masks
    clean a predecessor's leftovers ─ verify and pull the newest committed checkpoint
    load the model ─ train (TRL SFTTrainer; checkpoints upload in the background) ─ evaluate
       └─ SIGTERM: save only if it fits the grace budget, flush uploads, exit 75
    stage final/ (safetensors, tokenizer, card, metrics) ─ push, MANIFEST.json last ─ drop checkpoints

`validate` runs the same first half and stops before the weights.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from job.checkpoints import (
    CheckpointUploader,
    UploadResult,
    check_scratch_space,
    clean_leftovers,
    delete_checkpoint,
    prepare_resume,
    stored_checkpoints,
)
from job.config import JobConfig, redacted, to_yaml
from job.drift import config_drift
from job.errors import ConfigError, JobError, Preempted, TrainingFailed
from job.export import FINAL_PREFIX, publish_final, stage_final
from job.lease import Lease
from job.logs import Heartbeat, get_logger
from job.metrics import MetricsLog, read_step_metrics
from job.model import load_model
from job.planning import plan_job, refuse_if_it_cannot_fit
from job.preemption import SAFETY_SECONDS, Measurements, PreemptedNow, PreemptionHandler
from job.prepare import prepare, scratch_dir
from job.status import record_failure
from job.storage import AlreadyExists, Store, open_store

log = get_logger(__name__)

RESOLVED_CONFIG = "config.resolved.yaml"
STARTS_PREFIX = "logs/starts"
"""One object per start of the run: starts - 1 = preemptions (and crashes) survived."""


def run_store(config: JobConfig) -> Store:
    return open_store(config.run.output, config.storage).child(config.run.name)


def train(config: JobConfig, *, allow_config_change: bool = False, force: bool = False) -> dict[str, Any]:
    """The whole run; returns the final metrics (or `already_complete`)."""
    store = run_store(config)
    if store.is_committed(FINAL_PREFIX):
        log.info("already_complete", uri=f"{store.uri}/{FINAL_PREFIX}")
        return {"already_complete": True}
    # From here on SIGTERM means "preempted" (75), whatever phase it lands in; nothing is measured
    # yet, so until training has saved a checkpoint it stops at once.
    preemption = PreemptionHandler(config.checkpoint.grace_seconds, Measurements())
    preemption.install()
    lease = Lease(store, config.run.lease_ttl_seconds)
    try:
        lease.acquire()
        if store.is_committed(FINAL_PREFIX):  # a predecessor finished while we waited for its lease
            log.info("already_complete", uri=f"{store.uri}/{FINAL_PREFIX}")
            return {"already_complete": True}
        _check_config_drift(store, config, allow_config_change)
        store.write_bytes(f"{STARTS_PREFIX}/{time.time():.3f}.json", json.dumps({"holder": lease.holder}).encode())
        return _train_holding_lease(config, store, lease, force, preemption)
    except PreemptedNow:
        log.warning("preempted", signal=preemption.signal_name, newest_durable_step=None, phase="before training")
        raise Preempted(f"stopped by {preemption.signal_name} before training began") from None
    except JobError as exc:
        if not exc.retryable:
            record_failure(store, exc.exit_code, exc.message)
        raise
    finally:
        preemption.training_done = True
        preemption.uninstall()
        lease.release()


def _train_holding_lease(
    config: JobConfig, store: Store, lease: Lease, force: bool, preemption: PreemptionHandler
) -> dict[str, Any]:
    """Everything while holding the lease; a SIGTERM at any point (pull, training, publish) exits 75."""
    metrics_log = MetricsLog(store)
    uploader_timings: dict[str, list[float]] = {"save": [], "upload": []}

    def on_committed(result: UploadResult) -> None:
        uploader_timings["save"].append(round(preemption.measured.save_seconds or 0.0, 3))
        uploader_timings["upload"].append(round(result.seconds, 3))
        _on_committed(result, preemption, metrics_log)

    uploader = CheckpointUploader(store, config.checkpoint.keep, on_committed=on_committed)
    try:
        return _train(config, store, lease, force, preemption, uploader, metrics_log, uploader_timings)
    except PreemptedNow:
        _stop_preempted(store, uploader, preemption, metrics_log)
        raise  # unreachable: _stop_preempted raises Preempted


def _train(
    config: JobConfig,
    store: Store,
    lease: Lease,
    force: bool,
    preemption: PreemptionHandler,
    uploader: CheckpointUploader,
    metrics_log: MetricsLog,
    uploader_timings: dict[str, list[float]],
) -> dict[str, Any]:
    timings: dict[str, Any] = {}
    with Heartbeat("prepare") as beat:  # pulls data and model, tokenizes
        prepared = prepare(config, store=store)
    timings["prepare_seconds"] = beat.stop()

    from job.train import CheckpointCallback, build_trainer, detect_device

    work = scratch_dir(config) / "runs" / config.run.name
    trainer_dir = work / "trainer"
    clean_leftovers(store, trainer_dir)
    plan = plan_job(config, model_config=prepared.source.location, dataset_tokens=prepared.train.tokens)
    refuse_if_it_cannot_fit(plan, force)
    memory = plan["memory_bytes"]
    # A checkpoint holds the weights and the optimizer states; a Hub model still has to be downloaded.
    check_scratch_space(
        scratch_dir(config),
        checkpoint_bytes=memory["weights"] + memory["optimizer"],
        model_bytes_to_pull=memory["weights"] if prepared.source.is_hub else 0,
    )
    resume = prepare_resume(store, work / "resume")

    device = detect_device()
    with Heartbeat("load_model") as beat:
        model = load_model(prepared.source, config.model, device)
    timings["load_seconds"] = beat.stop()

    trainer, step_metrics = build_trainer(
        config,
        model,
        prepared.tokenizer,
        prepared.train.dataset,
        prepared.eval.dataset if prepared.eval else None,
        trainer_dir,
        device,
        extra_callbacks=[
            CheckpointCallback(
                config.checkpoint.every_minutes,
                config.checkpoint.background_upload,
                uploader,
                preemption,
                lease.lost.is_set,
            )
        ],
        sink=metrics_log.add,
        flops_budget=_flops_budget(plan, device),
    )
    if resume:
        log.info("resuming", step=resume[0], checkpoint=str(resume[1]))
    started = time.monotonic()
    try:
        trainer.train(resume_from_checkpoint=str(resume[1]) if resume else None)
    except (TrainingFailed, torch.OutOfMemoryError) as exc:
        uploader.wait(timeout=config.checkpoint.grace_seconds)  # keep the last good checkpoint durable
        metrics_log.flush()
        if isinstance(exc, torch.OutOfMemoryError):
            raise TrainingFailed(
                f"CUDA out of memory at step {trainer.state.global_step}: {str(exc).splitlines()[0]}",
                hint="check `python entrypoint.py plan`; lower per_device_train_batch_size or data.max_length",
            ) from None
        raise
    finally:
        preemption.training_done = True
    timings["train_seconds"] = time.monotonic() - started
    timings["checkpoint_save_seconds"] = uploader_timings["save"]
    timings["checkpoint_upload_seconds"] = uploader_timings["upload"]
    if preemption.requested:  # the step finished and its save was handed to the uploader
        raise PreemptedNow(preemption.signal_name)

    uploader.close()
    if uploader.error is not None:
        raise uploader.error
    metrics_log.flush()
    steps = read_step_metrics(store)  # every start's steps, each once
    metrics: dict[str, Any] = {**step_metrics.summary(), "data_format": prepared.dataset.format}
    metrics["loss_per_step"] = [[r["step"], r["loss"]] for r in steps]
    metrics["resumed_from_step"] = resume[0] if resume else None
    metrics["tokens_seen"] = sum(r.get("tokens", 0) for r in steps)
    evals = list(step_metrics.evals)
    if prepared.eval:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
        evals.append((trainer.state.global_step, metrics["eval_loss"]))
    metrics["eval_loss_per_step"] = [[step, loss] for step, loss in evals]

    publishing = Heartbeat("publish").start()
    staging = _stage(config, store, prepared, trainer, work, metrics, timings, steps, evals)
    publish_final(store, staging)
    timings["publish_seconds"] = publishing.stop()
    if config.checkpoint.delete_after_final:
        _, keys = stored_checkpoints(store)
        for step in sorted(keys):
            delete_checkpoint(store, step, keys[step])
        log.info("checkpoints_deleted_after_final", count=len(keys))
    log.info("run_finished", metrics={k: v for k, v in metrics.items() if k != "loss_per_step"}, timings=timings)
    return metrics


def _stage(
    config: JobConfig,
    store: Store,
    prepared: Any,
    trainer: Any,
    work: Path,
    metrics: dict[str, Any],
    timings: dict[str, Any],
    steps: list[dict[str, Any]],
    evals: list[tuple[int, float]],
) -> Path:
    """Card (with curves and run facts), metrics, weights and tokenizer in a staging directory."""
    from job.card import plot_curves, render_card

    facts = {
        "hardware": _hardware(),
        "preemptions_survived": max(len(store.list(STARTS_PREFIX)) - 1, 0),
        "wall_seconds_this_start": round(sum(v for v in timings.values() if isinstance(v, float)), 1),
        "torch": torch.__version__,
    }
    card = render_card(
        config,
        base_model=config.model.source,
        revision=config.model.revision,
        data_files=prepared.data_digests,
        metrics=metrics,
        facts=facts,
    )
    return stage_final(
        work / "final-staging",
        trainer.accelerator.unwrap_model(trainer.model),
        prepared.tokenizer,
        max_shard_size=config.run.max_shard_size,
        card=card,
        metrics={**metrics, **facts, "timings": timings},
        figure=plot_curves(steps, evals),
    )


def _flops_budget(plan: dict[str, Any], device: str) -> Any:
    from job.train import FlopsBudget

    peak = plan["gpu"]["peak_bf16_flops"]
    if device != "cuda" or not peak or plan["gpu"]["source"] != "detected":
        return None  # MFU against a CPU, or a GPU of unknown peak, would be a made-up figure
    per_token = plan["flops_per_token"]
    return FlopsBudget(per_token["model"], per_token["hardware"], peak)


def _hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB)"
    import platform

    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def _on_committed(result: UploadResult, preemption: PreemptionHandler, metrics_log: MetricsLog) -> None:
    first = preemption.measured.upload_seconds is None
    preemption.measured.upload_seconds = result.seconds
    metrics_log.flush(up_to_step=result.step)
    if not first:
        return
    needed = preemption.save_cost(include_step=True) or 0.0
    log.info(
        "checkpoint_timing",
        step_seconds=preemption.measured.step_seconds,
        save_seconds=preemption.measured.save_seconds,
        upload_seconds=result.seconds,
        needed_on_sigterm_seconds=round(needed + SAFETY_SECONDS, 2),
        grace_seconds=preemption.grace_seconds,
    )
    if needed + SAFETY_SECONDS > preemption.grace_seconds:
        log.warning(
            "checkpoint_slower_than_grace_budget",
            needed_seconds=round(needed + SAFETY_SECONDS, 1),
            grace_seconds=preemption.grace_seconds,
            consequence="on SIGTERM the job exits without a last save; periodic checkpoints bound the loss",
            fix=f"checkpoint.grace_seconds >= {needed + SAFETY_SECONDS:.0f} where the platform allows it, "
            "or save more often (checkpoint.every_minutes)",
        )


def _stop_preempted(
    store: Store,
    uploader: CheckpointUploader,
    preemption: PreemptionHandler,
    metrics_log: MetricsLog,
) -> None:
    """Wait for in-flight uploads while the budget lasts, then raise Preempted (75) naming the durable step."""
    finished = uploader.wait(timeout=max(preemption.remaining(), 0.0))
    metrics_log.flush()
    newest = uploader.newest_committed
    if newest is None:
        committed, _ = stored_checkpoints(store)  # e.g. the checkpoint this start resumed from
        newest = committed[0] if committed else None
    log.warning("preempted", signal=preemption.signal_name, newest_durable_step=newest, uploads_finished=finished)
    where = f"step {newest}" if newest is not None else "none yet (the next start begins from step 0)"
    raise Preempted(f"stopped by {preemption.signal_name}; newest durable checkpoint: {where}")


def _check_config_drift(store: Store, config: JobConfig, allow_change: bool) -> None:
    """Record the first start's config; refuse (64) a restart that would train something else."""
    text = to_yaml(config)
    log.info("config_resolved", config=redacted(config.to_dict()))
    try:
        store.write_bytes(RESOLVED_CONFIG, text.encode(), if_absent=True)
        return
    except AlreadyExists:
        recorded = yaml.safe_load(store.read_bytes(RESOLVED_CONFIG))
    changes = config_drift(recorded, yaml.safe_load(text))
    if not changes:
        return
    if not allow_change:
        raise ConfigError(
            "this run was started with a different config:\n  " + "\n  ".join(changes),
            hint="restore those values, use a new run.name, or pass --allow-config-change",
        )
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    store.write_bytes(f"config-changes/{stamp}.yaml", yaml.safe_dump({"changes": changes}).encode() + text.encode())
    log.warning("config_changed_allowed", changes=changes)
