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

With several ranks (`job.dist.launch` started them) every rank runs this story, with one
writer: rank 0 holds the lease, records the config, metrics and starts, commits
checkpoints and publishes; rank 0 prepares the inputs first, then each other node's
first rank (reading rank 0's tokenization from the store), then the remaining ranks
(from their node's scratch); each node's first rank pulls the resume checkpoint and
uploads its node's checkpoint files. A rank that fails raises like a single process
would: its peers fail on the next collective and the launcher keeps the root cause.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from job.config.drift import config_drift
from job.config.load import redacted, to_yaml
from job.config.schema import JobConfig, scratch_dir
from job.data.prepare import prepare
from job.dist.group import Group
from job.durability.checkpoints import (
    CheckpointUploader,
    UploadResult,
    check_scratch_space,
    clean_leftovers,
    delete_checkpoint,
    prepare_resume,
    stored_checkpoints,
)
from job.durability.lease import Lease
from job.durability.preemption import SAFETY_SECONDS, Measurements, PreemptedNow, PreemptionHandler
from job.errors import ConfigError, JobError, Preempted, TrainingFailed
from job.logs import Heartbeat, get_logger, quiet_unless_main
from job.model.load import load_model
from job.plan.job_plan import plan_job, refuse_if_it_cannot_fit, world_size
from job.publish.export import FINAL_PREFIX, publish_final, stage_final
from job.publish.metrics import MetricsLog, read_step_metrics
from job.publish.status import record_failure
from job.storage import AlreadyExists, Store, open_store

log = get_logger(__name__)

RESOLVED_CONFIG = "config.resolved.yaml"
STARTS_PREFIX = "logs/starts"
"""One object per start of the run: starts - 1 = preemptions (and crashes) survived."""


def run_store(config: JobConfig) -> Store:
    return open_store(config.run.output, config.storage).child(config.run.name)


def train(config: JobConfig, *, allow_config_change: bool = False, force: bool = False) -> dict[str, Any]:
    """The whole run on this rank; returns the final metrics (or `already_complete`)."""
    group = Group.join(config.distributed)
    quiet_unless_main(group.ranks.rank, group.distributed)
    result = _train_as_rank(config, group, allow_config_change, force)
    group.close()
    return result


def _train_as_rank(config: JobConfig, group: Group, allow_config_change: bool, force: bool) -> dict[str, Any]:
    store = run_store(config)
    if group.from_main(store.is_committed(FINAL_PREFIX), "final check"):
        log.info("already_complete", uri=f"{store.uri}/{FINAL_PREFIX}")
        return {"already_complete": True}
    # From here on SIGTERM means "preempted" (75), whatever phase it lands in; nothing is measured
    # yet, so until training has saved a checkpoint it stops at once.
    preemption = PreemptionHandler(config.checkpoint.grace_seconds, Measurements())
    preemption.install()
    lease = Lease(store, config.run.lease_ttl_seconds) if group.ranks.is_main else None
    try:
        complete = False
        if lease is not None:
            lease.acquire()
            # A predecessor may have finished while we waited for its lease.
            complete = store.is_committed(FINAL_PREFIX)
            if not complete:
                _check_config_drift(store, config, allow_config_change)
                holder = {"holder": lease.holder, "world_size": group.ranks.world_size}
                store.write_bytes(f"{STARTS_PREFIX}/{time.time():.3f}.json", json.dumps(holder).encode())
        if group.from_main(complete, "lease"):
            log.info("already_complete", uri=f"{store.uri}/{FINAL_PREFIX}")
            return {"already_complete": True}
        return _train_holding_lease(config, store, lease, force, preemption, group)
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
        if lease is not None:
            lease.release()


def _train_holding_lease(
    config: JobConfig, store: Store, lease: Lease | None, force: bool, preemption: PreemptionHandler, group: Group
) -> dict[str, Any]:
    """Everything while rank 0 holds the lease; a SIGTERM at any point (pull, training, publish) exits 75."""
    ranks = group.ranks
    metrics_log = MetricsLog(store, enabled=ranks.is_main)
    uploader_timings: dict[str, list[float]] = {"save": [], "upload": []}

    def on_committed(result: UploadResult) -> None:
        uploader_timings["save"].append(round(preemption.measured.save_seconds or 0.0, 3))
        uploader_timings["upload"].append(round(result.seconds, 3))
        _on_committed(result, preemption, metrics_log)

    uploader = None
    if ranks.is_local_main:
        uploader = CheckpointUploader(
            store,
            config.checkpoint.keep,
            on_committed=on_committed,
            node_rank=ranks.node_rank,
            nnodes=ranks.nnodes,
            parts_timeout=config.distributed.setup_timeout_seconds,
        )
    try:
        return _train(config, store, lease, force, preemption, uploader, metrics_log, uploader_timings, group)
    except PreemptedNow:
        _stop_preempted(store, uploader, preemption, metrics_log)
        raise  # unreachable: _stop_preempted raises Preempted


def _train(
    config: JobConfig,
    store: Store,
    lease: Lease | None,
    force: bool,
    preemption: PreemptionHandler,
    uploader: CheckpointUploader | None,
    metrics_log: MetricsLog,
    uploader_timings: dict[str, list[float]],
    group: Group,
) -> dict[str, Any]:
    ranks = group.ranks
    timings: dict[str, Any] = {}
    with Heartbeat("prepare") as beat:  # pulls data and model, tokenizes
        prepared = _prepare_in_turn(config, store, group)
    timings["prepare_seconds"] = beat.stop()

    from job.train.trainer import CheckpointCallback, build_trainer, detect_device

    work = scratch_dir(config) / "runs" / config.run.name
    trainer_dir = work / "trainer"
    clean_leftovers(store if ranks.is_main else None, trainer_dir if ranks.is_local_main else None)
    plan = plan_job(config, model_config=prepared.source.location, dataset_tokens=prepared.train.tokens)
    refuse_if_it_cannot_fit(plan, force)
    memory = plan["memory_bytes"]
    resume = None
    if ranks.is_local_main:
        # A checkpoint holds the weights and the optimizer states; a Hub model still has to be downloaded.
        check_scratch_space(
            scratch_dir(config),
            checkpoint_bytes=memory["weights"] + memory["optimizer"],
            model_bytes_to_pull=memory["weights"] if prepared.source.is_hub else 0,
        )
        resume = prepare_resume(store, work / "resume")
    resume = group.from_local_main(resume, "resume")
    _same_resume_step_everywhere(group, resume)

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
                lease.lost.is_set if lease is not None else lambda: False,
                group,
            )
        ],
        sink=metrics_log.add,
        flops_budget=_flops_budget(plan, device),
        group=group,
    )
    if resume:
        log.info("resuming", step=resume[0], checkpoint=str(resume[1]))
    started = time.monotonic()
    # With peers, a signal mid-step is settled at the step's end, together (see preemption).
    preemption.defer_to_step_end = group.distributed
    try:
        trainer.train(resume_from_checkpoint=str(resume[1]) if resume else None)
    except (TrainingFailed, torch.OutOfMemoryError) as exc:
        if uploader is not None:
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
        preemption.defer_to_step_end = False
    timings["train_seconds"] = time.monotonic() - started
    timings["checkpoint_save_seconds"] = uploader_timings["save"]
    timings["checkpoint_upload_seconds"] = uploader_timings["upload"]
    if preemption.requested:  # the step finished and its save was handed to the uploader
        raise PreemptedNow(preemption.signal_name)

    if uploader is not None:
        uploader.close()
        if uploader.error is not None:
            raise uploader.error
    metrics_log.flush()
    # Every start's steps, each once; rank 0 reports the run, the others help evaluate and publish.
    steps = read_step_metrics(store) if ranks.is_main else []
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
    # FSDP: every rank hands its shards over; rank 0 receives the whole (consolidated) state dict.
    state_dict = trainer.accelerator.get_state_dict(trainer.model) if group.distributed else None
    if ranks.is_main:
        staging = _stage(config, store, prepared, trainer, work, metrics, timings, steps, evals, state_dict)
        publish_final(store, staging)
    group.barrier("publish")
    timings["publish_seconds"] = publishing.stop()
    if not ranks.is_main:
        return metrics
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
    state_dict: dict[str, Any] | None = None,
) -> Path:
    """Card (with curves and run facts), metrics, weights and tokenizer in a staging directory."""
    from job.publish.card import plot_curves, render_card

    facts = {
        "hardware": _hardware(),
        "world_size": world_size(config),
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
        state_dict=state_dict,
    )


def _prepare_in_turn(config: JobConfig, store: Store, group: Group) -> Any:
    """Rank 0 pulls and tokenizes (cache in the store), then each other node's first rank (reading that
    cache), then everyone else from their node's scratch: inputs are fetched once per node, tokenized once."""
    ranks = group.ranks
    prepared = prepare(config, store=store) if ranks.is_main else None
    group.barrier("prepare on rank 0")
    if ranks.is_local_main and not ranks.is_main:
        prepared = prepare(config, store=store)
    group.barrier("prepare on each node")
    return prepared if prepared is not None else prepare(config, store=None)


def _same_resume_step_everywhere(group: Group, resume: tuple[int, Path] | None) -> None:
    steps = set(group.all_gather(resume[0] if resume else None, "resume step"))
    if len(steps) > 1:
        raise JobError(
            f"the nodes would resume from different checkpoints: {sorted(steps, key=str)}",
            hint="a checkpoint verified on one node and not on another; the retry starts over from the store",
        )


def _flops_budget(plan: dict[str, Any], device: str) -> Any:
    from job.train.trainer import FlopsBudget

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
    uploader: CheckpointUploader | None,
    preemption: PreemptionHandler,
    metrics_log: MetricsLog,
) -> None:
    """Wait for in-flight uploads while the budget lasts, then raise Preempted (75) naming the durable step."""
    finished = uploader.wait(timeout=max(preemption.remaining(), 0.0)) if uploader is not None else True
    metrics_log.flush()
    newest = uploader.newest_committed if uploader is not None and uploader.node_rank == 0 else None
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
