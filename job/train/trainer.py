"""TRL's SFTConfig and SFTTrainer, assembled from the job's config and the fast path's decision.

The dataset arrives tokenized, with labels already masked (`job.data.masking`), so TRL's own
preparation is skipped and its collator only pads (labels with -100, by length: padding never
trains and a real EOS is never masked). `JobTrainer` totals each optimizer step's loss and
trained tokens itself, since Trainer's logged loss averages a whole logging window.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from trl import SFTConfig, SFTTrainer

from job.config.schema import JobConfig
from job.data.masking import IGNORE_INDEX
from job.dist.group import Group
from job.durability import faults
from job.errors import ConfigError
from job.logs import get_logger
from job.optim.adamw import is_ours, trainer_optimizer
from job.train.async_save import CheckpointWriter, sync_reason
from job.train.callbacks import CheckpointCallback, FlopsBudget, StepMetrics, StepRecord
from job.train.fastpath import FastPath, choose_fast_path, detect_device

log = get_logger(__name__)


def _fsdp_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """FSDP2 defaults: full shard, wrap each decoder layer (the model's `_no_split_modules`), FSDP's own
    activation checkpointing (Trainer's would add an all-gather), sharded checkpoints (each rank writes its
    shard: no gather to one rank on every save). The user's `train.fsdp_config` keys win."""
    fsdp_config = {
        "version": 2,
        "reshard_after_forward": True,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "activation_checkpointing": bool(kwargs.get("activation_checkpointing")),
        "state_dict_type": "SHARDED_STATE_DICT",
        **(kwargs.get("fsdp_config") or {}),
    }
    legacy = kwargs["fsdp"] if str(kwargs["fsdp"]).strip().lower() not in ("true", "1", "yes") else True
    return {"fsdp": legacy, "fsdp_config": fsdp_config, "activation_checkpointing": False}


def build_sft_config(
    config: JobConfig,
    output_dir: Path,
    device: str,
    *,
    has_eval: bool,
    fast: FastPath | None = None,
    packed: bool | None = None,
) -> SFTConfig:
    """SFTConfig from the `train:` section plus the fields the job owns and the fast path's switches.

    `fast` is the run's decision (`choose_fast_path`); without one it is decided here for `device`.
    """
    train = config.train
    on_gpu = device == "cuda"
    sharded = train.fsdp
    if sharded and is_ours(train.optim):
        raise ConfigError(
            f"train.optim {train.optim} is not verified on FSDP2's sharded parameters",
            hint="with train.fsdp use model.dtype: float32 and train.optim: adamw_torch_fused "
            "(FSDP keeps float32 master shards and computes in bf16, so small updates are not lost)",
        )
    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": train.per_device_train_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "learning_rate": train.learning_rate,
        "num_train_epochs": train.num_train_epochs,
        "max_steps": train.max_steps,
        "lr_scheduler_type": train.lr_scheduler_type,
        "warmup_steps": train.warmup_steps,
        "weight_decay": train.weight_decay,
        "max_grad_norm": train.max_grad_norm,
        "logging_steps": train.logging_steps,
        "seed": train.seed,
        "data_seed": train.seed,
        "optim": "adamw_torch" if is_ours(train.optim) else train.optim,  # ours is handed over separately
        # bf16 autocast follows the weights: on CPU it would silently change float32 results.
        # With FSDP, float32 weights are the sharded master copy and bf16 is FSDP's compute dtype.
        "bf16": on_gpu and (config.model.dtype == "bfloat16" or (sharded and config.model.dtype == "float32")),
        "fp16": on_gpu and config.model.dtype == "float16",
        "use_cpu": not on_gpu,
        "max_length": config.data.max_length,
        # The dataset arrives tokenized, masked and (data.packing, or text cut into blocks) with `seq_lengths`:
        # TRL prepares nothing; packing=True only makes its collator padding-free, so positions restart per piece.
        "packing": config.data.packing if packed is None else packed,
        "padding_free": config.data.packing if packed is None else packed,
        "dataset_kwargs": {"skip_prepare_dataset": True},
        # Step-based saves go through Trainer; time- and signal-based ones through CheckpointCallback.
        "save_strategy": "steps",
        "save_steps": config.checkpoint.every_steps,
        "save_total_limit": None,  # retention is ours: never delete a checkpoint still uploading
        "report_to": "none",
        # The trackers' run name (W&B, MLflow); their directories and run ids: job/train/trackers.py.
        "run_name": config.run.name,
        "disable_tqdm": True,
        "eval_strategy": "no",
        "per_device_eval_batch_size": train.per_device_train_batch_size,
        "dataloader_num_workers": 0,
        "ddp_timeout": int(config.distributed.collective_timeout_seconds),
        "ddp_find_unused_parameters": False,  # a causal LM uses every parameter each step; the search costs time
        # Trainer's filter tests every micro-batch's loss on the host (a device sync each); our step
        # records see a non-finite loss anyway and stop the run (exit 70).
        "logging_nan_inf_filter": False,
    }
    if fast is None:
        fast = choose_fast_path(config, detect_device(device))
    kwargs.update(fast.sft_kwargs())
    kwargs.update(train.extra)
    if sharded:
        kwargs.update(_fsdp_kwargs(kwargs))
    if has_eval and "eval_steps" in train.extra and "eval_strategy" not in train.extra:
        kwargs["eval_strategy"] = "steps"  # eval_steps alone means "evaluate every N steps"
    if not has_eval and kwargs.get("eval_strategy") not in (None, "no"):
        raise ConfigError("train.eval_strategy is set but there is no evaluation data", hint="set data.eval")
    try:
        args = SFTConfig(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"the train: section is not a valid SFTConfig: {exc}") from None
    if config.model.dtype == "float32" and (args.bf16 or args.fp16) and not sharded:
        raise ConfigError("model.dtype float32 with bf16/fp16 autocast would not be a float32 run")
    return args


class JobTrainer(SFTTrainer):
    """SFTTrainer that totals each optimizer step's loss, trained tokens and gradient norm, and saves
    checkpoints through a `CheckpointWriter` (staged in host memory, written in the background) when it has one.

    The totals stay on the device until the step ends (`take_step_totals`): one host sync per
    optimizer step, none per micro-batch.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._step_loss: torch.Tensor | None = None
        self._step_tokens: torch.Tensor | None = None
        self._step_grad_norm: torch.Tensor | float | None = None
        self.checkpoint_writer: CheckpointWriter | None = None
        """Set by `build_trainer` when checkpoints may be written asynchronously (`checkpoint.async_save`)."""

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """Trainer's train; then the write in flight is drained (within the preemption budget after a signal),
        so the last checkpoint reaches the uploader before the run publishes or exits."""
        writer = self.checkpoint_writer
        if writer is None:
            return super().train(*args, **kwargs)
        try:
            result = super().train(*args, **kwargs)
        except BaseException:
            writer.drain(failing=True)  # the last good checkpoint stays on its way to the store
            raise
        writer.drain()
        writer.raise_if_failed()
        writer.release()  # the staging buffers' host RAM goes back before publishing
        return result

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        if self.checkpoint_writer is None or self.checkpoint_writer.save(self, trial) == "sync":
            super()._save_checkpoint(model, trial)

    def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        result = super().compute_loss(model, inputs, *args, **kwargs)
        if faults.armed("nan_loss", self.state.global_step + 1):
            loss = result[0] if isinstance(result, tuple) else result
            poisoned = loss * float("nan")  # flows through backward into the weights, as a real blow-up would
            return (poisoned, *result[1:]) if isinstance(result, tuple) else poisoned
        return result

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        # Private hook, pinned by tests/test_train.py: Trainer computes the pre-clip norm every optimizer
        # step but hands it only to its logging-step lines; this keeps each step's (still on the device).
        value = super()._get_grad_norm(model, grad_norm=grad_norm)
        self._step_grad_norm = value.detach() if isinstance(value, torch.Tensor) else value
        return value

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        labels = inputs.get("labels")
        if labels is not None:
            # The first position of each sequence predicts nothing (labels shift by one).
            tokens = (labels[..., 1:] != IGNORE_INDEX).sum()
            self._step_tokens = tokens if self._step_tokens is None else self._step_tokens + tokens
        loss = super().training_step(model, inputs, num_items_in_batch)
        detached = loss.detach().to(torch.float64)
        self._step_loss = detached if self._step_loss is None else self._step_loss + detached
        return loss

    def take_step_totals(self) -> tuple[float, int, float | None]:
        """(loss, trained tokens, grad norm) of the optimizer step that just ended, reset for the next."""
        loss, tokens, norm = self._step_loss, self._step_tokens, self._step_grad_norm
        self._step_loss = self._step_tokens = self._step_grad_norm = None
        values = [v for v in (loss, tokens, norm) if isinstance(v, torch.Tensor)]
        host = iter(_to_host(values))
        loss_value = next(host) if isinstance(loss, torch.Tensor) else 0.0
        token_value = next(host) if isinstance(tokens, torch.Tensor) else 0.0
        norm_value = next(host) if isinstance(norm, torch.Tensor) else norm
        return float(loss_value), int(token_value), None if norm_value is None else float(norm_value)


def _to_host(tensors: list[torch.Tensor]) -> list[float]:
    """The scalars' values with one transfer per device (one sync on a GPU)."""
    by_device: dict[torch.device, list[int]] = {}
    for index, tensor in enumerate(tensors):
        by_device.setdefault(tensor.device, []).append(index)
    out = [0.0] * len(tensors)
    for indices in by_device.values():
        stacked = torch.stack([tensors[i].detach().reshape(()).to(torch.float64) for i in indices]).tolist()
        for i, value in zip(indices, stacked, strict=True):
            out[i] = value
    return out


def build_trainer(
    config: JobConfig,
    model: Any,
    tokenizer: Any,
    train_dataset: Any,
    eval_dataset: Any | None,
    output_dir: Path,
    fast: FastPath,
    extra_callbacks: Sequence[TrainerCallback] = (),
    sink: Callable[[StepRecord], None] | None = None,
    flops_budget: FlopsBudget | None = None,
    group: Group | None = None,
) -> tuple[JobTrainer, StepMetrics]:
    """The trainer with our step records first among its callbacks (a non-finite loss stops the step
    before any checkpoint is saved), and Trainer's printed dicts and progress bars removed."""
    packed = "seq_lengths" in (getattr(train_dataset, "column_names", None) or ())
    args = build_sft_config(
        config, output_dir, fast.device.kind, has_eval=eval_dataset is not None, fast=fast, packed=packed
    )
    metrics = StepMetrics(sink=sink, flops=flops_budget, group=group or Group.single())
    optimizer = None
    if is_ours(config.train.optim):
        # SFTConfig.optim only takes transformers' enum; Trainer builds ours after placing the model, with its
        # usual weight-decay groups and scheduler, and restores its state (weights_only) on resume.
        optimizer = trainer_optimizer(
            config.train.optim,
            lr=args.learning_rate,
            weight_decay=args.weight_decay,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
            seed=config.train.seed,
        )
    trainer = JobTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        optimizer_cls_and_kwargs=optimizer,
        callbacks=[metrics, *extra_callbacks],
    )
    metrics.trainer = trainer
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.checkpoint_writer = checkpoint_writer(config, trainer)
    if trainer.checkpoint_writer is not None:
        for callback in extra_callbacks:
            if isinstance(callback, CheckpointCallback):
                callback.attach_writer(trainer.checkpoint_writer)
    return trainer, metrics


def checkpoint_writer(config: JobConfig, trainer: JobTrainer) -> CheckpointWriter | None:
    """The background checkpoint writer (`checkpoint.async_save`), or None where Trainer's synchronous save
    is used (said once in the log): several ranks or FSDP, or training waits for each commit anyway."""
    if not config.checkpoint.async_save:
        reason = "checkpoint.async_save is false"
    elif not config.checkpoint.background_upload:
        reason = "checkpoint.background_upload is false: training waits for each commit anyway"
    else:
        reason = sync_reason(trainer)
    if reason is not None:
        log.info("checkpoint_async_save", enabled=False, reason=reason)
        return None
    log.info("checkpoint_async_save", enabled=True, device=trainer.args.device.type)
    return CheckpointWriter(trainer.args.device.type)
