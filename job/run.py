"""One start of a run, top to bottom: `train(config)` builds a `TrainingRun` and runs its story.

    check the GPU driver (71 if too old) ─ join the ranks ─ already complete? exit 0 ─ SIGTERM from here on means 75
    take the lease (one writer) ─ refuse drift from the config recorded when training first began
    prepare inputs (pull, validate, tokenize: bad data fails before any weights load)
    plan (refuse what cannot fit; scratch room and speed) ─ find the resume point (newest verified checkpoint)
    load the model ─ build the trainer ─ record the config ─ fit (checkpoints upload in the background) ─ evaluate
    publish final/ (MANIFEST.json last) ─ delete checkpoints ─ release the lease

docs/design.md tells the story with the store layout and the exit codes. With several ranks
every rank runs it; rank 0 is the one writer (lease, config, metrics, commits, final/), and
each node's first rank pulls the resume checkpoint and uploads its node's checkpoint files.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch

from job.config.load import to_yaml
from job.config.schema import JobConfig, scratch_dir
from job.config.trackers import check_tracker_credentials
from job.data.prepare import Prepared, prepare
from job.dist.group import Group
from job.durability.checkpoints import (
    CheckpointUploader,
    UploadResult,
    clean_leftovers,
    delete_checkpoint,
    prepare_resume,
    stored_checkpoints,
)
from job.durability.lease import Lease
from job.durability.preemption import Measurements, PreemptedNow, PreemptionHandler
from job.durability.recorded_config import RESOLVED_CONFIG, check_config_drift
from job.durability.scratch import check_free_space, scratch_full, sweep_partials
from job.errors import JobError, Preempted, TrainingFailed
from job.host.driver import check_driver
from job.host.scratch_speed import measure_scratch, scratch_needs
from job.logs import Heartbeat, get_logger, quiet_unless_main
from job.model.load import load_model
from job.plan.memory import plan_job, refuse_if_it_cannot_fit, world_size
from job.publish.export import FINAL_PREFIX, publish_final, stage_final
from job.publish.hub_push import check_hub_push, hub_push_pending, push_final_to_hub
from job.publish.metrics import MetricsLog, Timings, read_step_metrics
from job.publish.status import record_failure
from job.storage import AlreadyExists, Store, open_store

if TYPE_CHECKING:  # the trainer's modules import TRL: loaded only once training is near
    from transformers import TrainerCallback

    from job.train.callbacks import FlopsBudget, StepMetrics
    from job.train.fastpath import FastPath
    from job.train.trainer import JobTrainer

log = get_logger(__name__)

STARTS_PREFIX = "logs/starts"
"""One object per start of the run: starts - 1 = preemptions (and crashes) survived."""


def run_store(config: JobConfig) -> Store:
    return open_store(config.run.output, config.storage).child(config.run.name)


def train(config: JobConfig, *, allow_config_change: bool = False, force: bool = False) -> dict[str, Any]:
    """The whole run on this rank; returns the final metrics (or `{"already_complete": True}`)."""
    run = TrainingRun(config, allow_config_change=allow_config_change, force=force)
    try:
        metrics = run.execute()
    finally:
        run.cleanup()
    run.group.close()
    return metrics


@dataclass(frozen=True)
class ResumePoint:
    step: int
    directory: Path
    """The verified checkpoint, pulled into this node's scratch."""


class TrainingRun:
    """One start of a run on this rank. State lives here; each method is one step of the story."""

    def __init__(self, config: JobConfig, *, allow_config_change: bool = False, force: bool = False) -> None:
        self.config = config
        self.allow_config_change = allow_config_change
        self.force = force
        self.group = Group.single()
        self.store = run_store(config)
        self.work = scratch_dir(config) / "runs" / config.run.name
        self.timings = Timings()
        # Filled in as the story goes:
        self.preemption: PreemptionHandler | None = None
        self.lease: Lease | None = None
        self.holding_lease = False
        self.metrics_log = MetricsLog(self.store, enabled=False)
        self.uploader: CheckpointUploader | None = None
        self.prepared: Prepared | None = None
        self.plan: dict[str, Any] = {}
        self.scratch_needed_bytes: int | None = None
        """Three checkpoints and the model to pull, once planned: what a full scratch disk lacked."""
        self.resume: ResumePoint | None = None
        self.fast: FastPath | None = None
        self.compile_callback: TrainerCallback | None = None
        self.model: Any = None
        self.trainer: JobTrainer | None = None
        self.step_metrics: StepMetrics | None = None
        self.history: list[dict[str, Any]] = []
        """Every start's step records, read back from the store by rank 0 after training."""
        self.evals: list[tuple[int, float]] = []

    # ------------------------------------------------------------------ the story

    def execute(self) -> dict[str, Any]:
        try:
            check_driver(torch.version.cuda)  # every rank, before torch touches CUDA: 71 if the driver is too old
            # 64 now, not after the pull (W&B's login) or hours of training (the push), when they cannot work:
            check_hub_push(self.config)
            check_tracker_credentials(self.config.train.extra.get("report_to"))
            self.join_ranks()
            if self.already_complete("final check"):
                return self.push_to_hub(None)
            self.watch_for_preemption()
            if not self.take_lease():
                return self.push_to_hub(None)
            self.prepare_inputs()
            self.plan_run()
            self.find_resume_point()
            self.load_model()
            self.build_trainer()
            self.fit()
            metrics = self.evaluate()
            self.publish(metrics)
            self.delete_checkpoints(metrics)
            self.push_to_hub(self.work / "final-staging")
            return metrics
        except PreemptedNow:
            self.stop_preempted()
        except JobError as exc:
            if not exc.retryable:
                record_failure(self.store, exc.exit_code, exc.message)
            raise
        except Exception as exc:
            full = scratch_full(exc, scratch_dir(self.config), self.scratch_needed_bytes)
            if full is None:
                raise
            record_failure(self.store, full.exit_code, full.message)
            raise full from exc

    def cleanup(self) -> None:
        if self.preemption is not None:
            self.preemption.training_done = True
            self.preemption.uninstall()
        if self.lease is not None:
            self.lease.release()

    # ------------------------------------------------------------------ steps

    def join_ranks(self) -> None:
        self.group = Group.join(self.config.distributed)
        quiet_unless_main(self.group.ranks.rank, self.group.distributed)
        self.metrics_log = MetricsLog(self.store, enabled=self.group.ranks.is_main)

    def already_complete(self, phase: str) -> bool:
        complete = self.group.from_main(self.group.ranks.is_main and self.store.is_committed(FINAL_PREFIX), phase)
        if complete:
            log.info("already_complete", uri=f"{self.store.uri}/{FINAL_PREFIX}")
        return complete

    def watch_for_preemption(self) -> None:
        # Nothing is measured yet, so until training has saved a checkpoint a SIGTERM stops at once.
        self.preemption = PreemptionHandler(self.config.checkpoint.grace_seconds, Measurements())
        self.preemption.install()

    def take_lease(self) -> bool:
        """Rank 0 takes the run's lease (one writer) and records this start; False if the run finished meanwhile."""
        if self.group.ranks.is_main:
            self.lease = Lease(self.store, self.config.run.lease_ttl_seconds)
            self.lease.acquire()
        if self.already_complete("lease"):  # a predecessor may have finished while we waited for its lease
            return False
        if self.group.ranks.is_main:
            check_config_drift(self.store, self.config, allow_change=self.allow_config_change)
        self.holding_lease = True
        return True

    def record_start(self) -> None:
        """Rank 0, as training begins: the first such start records its config as the run's; every one leaves
        a `logs/starts/` object (the card's count of preemptions survived)."""
        if not self.group.ranks.is_main:
            return
        self.fence()
        try:
            self.store.write_bytes(RESOLVED_CONFIG, to_yaml(self.config).encode(), if_absent=True)
            log.info("config_recorded", uri=f"{self.store.uri}/{RESOLVED_CONFIG}")
        except AlreadyExists:
            pass  # an earlier start trained; check_config_drift compared against it
        holder = {"holder": self.lease.holder, "world_size": self.group.ranks.world_size}
        self.store.write_bytes(f"{STARTS_PREFIX}/{time.time():.3f}.json", json.dumps(holder).encode())

    def prepare_inputs(self) -> None:
        """Rank 0 pulls and tokenizes (cache in the store), then each other node's first rank (reading that
        cache), then everyone else from their node's scratch: inputs are fetched once per node, tokenized once."""
        ranks, group = self.group.ranks, self.group
        if ranks.is_local_main:  # before this start writes any: what a crashed predecessor half-wrote
            sweep_partials(scratch_dir(self.config))
        with Heartbeat("prepare") as beat:
            prepared = prepare(self.config, store=self.store) if ranks.is_main else None
            group.barrier("prepare on rank 0")
            if ranks.is_local_main and not ranks.is_main:
                prepared = prepare(self.config, store=self.store)
            group.barrier("prepare on each node")
            self.prepared = prepared if prepared is not None else prepare(self.config, store=None)
        self.timings.prepare_seconds = beat.stop()

    def plan_run(self) -> None:
        """Clean a predecessor's leftovers, refuse (64) what the planner says cannot fit unless forced, then
        (each node's first rank) refuse (74) a scratch without room for it and measure how fast it writes."""
        ranks = self.group.ranks
        clean_leftovers(self.store if ranks.is_main else None, self.work / "trainer" if ranks.is_local_main else None)
        self.plan = plan_job(
            self.config, model_config=self.prepared.source.location, dataset_tokens=self.prepared.train.tokens
        )
        refuse_if_it_cannot_fit(self.plan, self.force)
        if ranks.is_local_main:  # a Hub model still has to be downloaded to scratch
            needs = scratch_needs(self.plan["memory_bytes"], download_model=self.prepared.source.is_hub)
            self.scratch_needed_bytes = needs.total_bytes
            check_free_space(scratch_dir(self.config), needs.total_bytes, needs.detail)
            measure_scratch(scratch_dir(self.config), needs.checkpoint_bytes, self.config.checkpoint)

    def find_resume_point(self) -> None:
        """Each node's first rank verifies and pulls the newest committed checkpoint; all ranks must agree."""
        found = None
        if self.group.ranks.is_local_main:
            found = prepare_resume(self.store, self.work / "resume")
        found = self.group.from_local_main(found, "resume")
        steps = set(self.group.all_gather(found[0] if found else None, "resume step"))
        if len(steps) > 1:
            raise JobError(
                f"the nodes would resume from different checkpoints: {sorted(steps, key=str)}",
                hint="a checkpoint verified on one node and not on another; the retry starts over from the store",
            )
        self.resume = ResumePoint(*found) if found else None

    def load_model(self) -> None:
        from job.train.compile import speed_up_model
        from job.train.fastpath import choose_fast_path, detect_device

        location, packed = self.prepared.source.location, self.prepared.train.packed
        self.fast = choose_fast_path(self.config, detect_device(), model_location=location, packed=packed)
        train = self.config.train  # the planner's split (only where the user set neither) is what gets recorded
        train.per_device_train_batch_size, train.gradient_accumulation_steps = (
            self.fast.batch_size,
            self.fast.grad_accum,
        )
        with Heartbeat("load_model") as beat:
            self.model = load_model(
                self.prepared.source, self.config.model, self.fast.device.kind, attention=self.fast.attn_implementation
            )
            # Compiled layers (their cache restored from the store) or Liger's kernels, as the fast path decided.
            self.compile_callback = speed_up_model(
                self.model,
                self.config,
                self.fast,
                store=self.store,
                scratch=scratch_dir(self.config),
                fence=self.fence,
                writer=self.group.ranks.is_main,
            )
        self.timings.load_seconds = beat.stop()

    def build_trainer(self) -> None:
        from job.train.callbacks import CheckpointCallback, StopAtFinalStep
        from job.train.fastpath import checkpointing_callback
        from job.train.trackers import configure_trackers
        from job.train.trainer import build_trainer

        ranks = self.group.ranks
        if ranks.is_local_main:
            self.uploader = CheckpointUploader(
                self.store,
                self.config.checkpoint.keep,
                on_committed=self.on_checkpoint_committed,
                node_rank=ranks.node_rank,
                nnodes=ranks.nnodes,
                parts_timeout=self.config.distributed.setup_timeout_seconds,
                fence=self.fence if ranks.is_main else None,
            )
        # Not held = lost to another process, or no renewal proven within the TTL: stop before writing again.
        lease_lost = (lambda: not self.lease.held()) if self.lease is not None else lambda: False
        checkpoints = CheckpointCallback(
            self.config.checkpoint.every_minutes,
            self.config.checkpoint.background_upload,
            self.uploader,
            self.preemption,
            lease_lost,
            self.group,
        )
        # Before the Trainer reads them: the trackers' directories under scratch and the run ids they resume.
        trackers = configure_trackers(self.config, self.work, self.store, is_main=ranks.is_main, fence=self.fence)
        self.trainer, self.step_metrics = build_trainer(
            self.config,
            self.model,
            self.prepared.tokenizer,
            self.prepared.train.dataset,
            self.prepared.eval.dataset if self.prepared.eval else None,
            self.work / "trainer",
            self.fast,
            extra_callbacks=[
                StopAtFinalStep(),
                checkpoints,
                checkpointing_callback(self.fast),  # the exact layers that keep their activations
                *([self.compile_callback] if self.compile_callback else []),
                *trackers,  # rank 0: TensorBoard's event files (and a local MLflow store) to logs/
            ],
            sink=self.metrics_log.add,
            flops_budget=self.flops_budget(),
            group=self.group,
        )

    def fit(self) -> None:
        """Train to the last step; a SIGTERM stops at a step's end (saving if the budget allows) and exits 75.

        A start that resumes from the final step's checkpoint trains nothing and goes on to publish."""
        from job.train.callbacks import FinalStepReached

        if self.resume:
            log.info("resuming", step=self.resume.step, checkpoint=str(self.resume.directory))
        self.record_start()
        started = time.monotonic()
        # With peers, a signal mid-step is settled at the step's end, together (see preemption).
        self.preemption.defer_to_step_end = self.group.distributed
        try:
            self.trainer.train(resume_from_checkpoint=str(self.resume.directory) if self.resume else None)
        except FinalStepReached:
            log.info("resumed_at_final_step", step=self.trainer.state.global_step)
        except Exception as exc:
            full = scratch_full(exc, scratch_dir(self.config), self.scratch_needed_bytes)
            if not isinstance(exc, (TrainingFailed, torch.OutOfMemoryError)) and full is None:
                raise
            if self.uploader is not None:  # keep the last good checkpoint durable
                self.uploader.wait(timeout=self.config.checkpoint.grace_seconds)
            self.metrics_log.flush()
            if full is not None:
                raise full from exc
            if isinstance(exc, torch.OutOfMemoryError):
                raise TrainingFailed(
                    f"CUDA out of memory at step {self.trainer.state.global_step}: {str(exc).splitlines()[0]}",
                    hint="check `python entrypoint.py plan`; lower per_device_train_batch_size or data.max_length",
                ) from None
            raise
        finally:
            self.preemption.training_done = True
            self.preemption.defer_to_step_end = False
        self.timings.train_seconds = time.monotonic() - started
        if self.preemption.requested:  # the step finished and its save was handed to the uploader
            raise PreemptedNow(self.preemption.signal_name)
        if self.uploader is not None:
            self.uploader.close()
            self.uploader.raise_if_failed()  # with its own exit code (LeaseLost 75, AccessDenied 77...)
        self.metrics_log.flush()

    def evaluate(self) -> dict[str, Any]:
        """The run's metrics: every start's steps (rank 0 reads them from the store) and the final eval loss."""
        self.history = read_step_metrics(self.store) if self.group.ranks.is_main else []
        metrics: dict[str, Any] = {**self.step_metrics.summary(), "data_format": self.prepared.dataset.format}
        if metrics["final_step"] is None and self.history:  # resumed at the final step: nothing trained now
            metrics["final_step"], metrics["final_loss"] = self.history[-1]["step"], self.history[-1]["loss"]
        metrics["loss_per_step"] = [[r["step"], r["loss"]] for r in self.history]
        metrics["resumed_from_step"] = self.resume.step if self.resume else None
        metrics["tokens_seen"] = sum(r.get("tokens", 0) for r in self.history)
        self.evals = list(self.step_metrics.evals)
        if self.prepared.eval:
            metrics["eval_loss"] = self.trainer.evaluate()["eval_loss"]
            self.evals.append((self.trainer.state.global_step, metrics["eval_loss"]))
        metrics["eval_loss_per_step"] = [[step, loss] for step, loss in self.evals]
        return metrics

    def publish(self, metrics: dict[str, Any]) -> None:
        """Stage final/ (weights, tokenizer, card, metrics, curves) and push it, MANIFEST.json last."""
        publishing = Heartbeat("publish").start()
        # FSDP: every rank hands its shards over; rank 0 receives the whole (consolidated) state dict.
        state_dict = self.trainer.accelerator.get_state_dict(self.trainer.model) if self.group.distributed else None
        if self.group.ranks.is_main:
            publish_final(self.store, self.stage_final(metrics, state_dict), fence=self.fence)
        self.group.barrier("publish")
        self.timings.publish_seconds = publishing.stop()

    def stage_final(self, metrics: dict[str, Any], state_dict: dict[str, Any] | None) -> Path:
        from job.publish.card import hardware, plot_curves, render_card

        facts = {
            "hardware": hardware(),
            "world_size": world_size(self.config),
            "preemptions_survived": max(len(self.store.list(STARTS_PREFIX)) - 1, 0),
            "wall_seconds_this_start": round(self.timings.phases_seconds(), 1),
            "torch": torch.__version__,
        }
        card = render_card(
            self.config,
            base_model=self.config.model.source,
            hub_id=self.config.model.source if self.prepared.source.is_hub else None,
            revision=self.config.model.revision,
            data_files=self.prepared.data_digests,
            sources=self.prepared.sources,
            metrics=metrics,
            facts=facts,
        )
        return stage_final(
            self.work / "final-staging",
            self.trainer.accelerator.unwrap_model(self.trainer.model),
            self.prepared.tokenizer,
            max_shard_size=self.config.run.max_shard_size,
            card=card,
            metrics={**metrics, **facts, "timings": asdict(self.timings)},
            figure=plot_curves(self.history, self.evals),
            state_dict=state_dict,
        )

    def delete_checkpoints(self, metrics: dict[str, Any]) -> None:
        if not self.group.ranks.is_main:
            return
        if self.config.checkpoint.delete_after_final:
            self.fence()
            _, keys = stored_checkpoints(self.store)
            for step in sorted(keys):
                delete_checkpoint(self.store, step, keys[step])
            log.info("checkpoints_deleted_after_final", count=len(keys))
        summary = {k: v for k, v in metrics.items() if k != "loss_per_step"}
        log.info("run_finished", metrics=summary, timings=asdict(self.timings))

    def push_to_hub(self, staged: Path | None) -> dict[str, Any]:
        """Rank 0, after the store commit (the store stays the source of truth): push final/ to publish.hub_repo
        unless reports/hub-push.json says it was; `staged` None pulls it from the store (a run complete earlier)."""
        if self.group.ranks.is_main and hub_push_pending(self.config, self.store):
            push_final_to_hub(self.config, self.store, staged, scratch_dir(self.config), fence=self.fence)
        return {"already_complete": True}

    def stop_preempted(self) -> NoReturn:
        """Wait for in-flight uploads while the grace budget lasts, then raise Preempted (75) naming the
        newest durable step."""
        signal_name = self.preemption.signal_name
        if not self.holding_lease:
            log.warning("preempted", signal=signal_name, newest_durable_step=None, phase="before training")
            raise Preempted(f"stopped by {signal_name} before training began") from None
        uploader = self.uploader
        finished = uploader.wait(timeout=max(self.preemption.remaining(), 0.0)) if uploader is not None else True
        self.metrics_log.flush()
        newest = uploader.newest_committed if uploader is not None and uploader.node_rank == 0 else None
        if newest is None:
            committed, _ = stored_checkpoints(self.store)  # e.g. the checkpoint this start resumed from
            newest = committed[0] if committed else None
        log.warning("preempted", signal=signal_name, newest_durable_step=newest, uploads_finished=finished)
        where = f"step {newest}" if newest is not None else "none yet (the next start begins from step 0)"
        raise Preempted(f"stopped by {signal_name}; newest durable checkpoint: {where}") from None

    # ------------------------------------------------------------------ helpers

    def fence(self) -> None:
        """Before a durable write: LeaseLost (75) unless this process can still prove it holds the lease."""
        if self.lease is not None:
            self.lease.ensure_held()

    def on_checkpoint_committed(self, result: UploadResult) -> None:
        """Uploader thread: record the timings, flush metrics up to the step, check the grace budget once."""
        measured = self.preemption.measured
        self.timings.checkpoint_save_seconds.append(round(measured.save_seconds or 0.0, 3))
        self.timings.checkpoint_upload_seconds.append(round(result.seconds, 3))
        first = measured.upload_seconds is None
        measured.upload_seconds = result.seconds
        self.metrics_log.flush(up_to_step=result.step)
        if first:
            self.preemption.check_budget(result.seconds)

    def flops_budget(self) -> FlopsBudget | None:
        from job.train.callbacks import FlopsBudget

        gpu = self.plan["gpu"]
        if self.fast.device.kind != "cuda" or not gpu["peak_bf16_flops"] or gpu["source"] != "detected":
            return None  # MFU against a CPU, or a GPU of unknown peak, would be a made-up figure
        per_token = self.plan["flops_per_token"]
        return FlopsBudget(per_token["model"], per_token["hardware"], gpu["peak_bf16_flops"])
