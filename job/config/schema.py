"""The job's configuration schema: one dataclass per section, a docstring under each field.

Defaults are the seed recipe. Each dataclass checks its own values on construction; loading
and merging the layers (file, environment, `--set`) is `job.config.load`. Credentials never
live here: S3 and the Hub take theirs from the environment.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from job.errors import ConfigError
from job.logs import shorten

DTYPES = ("bfloat16", "float16", "float32")
FORMATS = ("auto", "messages", "prompt_completion", "text", "alpaca", "sharegpt")
TRUNCATION_MODES = ("truncate", "drop", "error")
TEXT_MODES = ("blocks", "documents")
SPECIAL_STRINGS_MODES = ("control", "text")
SOURCE_KEYS = ("path", "format", "weight", "max_examples")
MIN_RECORD_BYTES = 1024  # below this even a short chat turn is refused
MAX_RECORD_BYTES = 8 * 1024 * 1024
HUB_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


@dataclass
class RunConfig:
    name: str = "sft-run"
    """Run name; everything the run writes goes to `<output>/<name>/`."""
    output: str = "outputs"
    """Where runs live: `s3://bucket/prefix` or a local directory."""
    scratch: str = "scratch"
    """Local working directory for pulled inputs, caches and checkpoints (a fast volume; ~250 GiB for 7B)."""
    lease_ttl_seconds: float = 60.0
    """Writer lease lifetime: renewed every third of it; the holder stops writing (exit 75) 0.8 of it after
    its last proven renewal. A new pod takes a dead holder's lease after watching it unchanged for this plus
    half, by its own clock (no host's clock is trusted)."""
    max_shard_size: str = "5GB"
    """Largest safetensors shard in `final/` (transformers v5 would default to 50GB)."""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", self.name):
            raise ConfigError(
                f"run.name {shorten(repr(self.name))} is not a valid run name",
                hint="use letters, digits, '.', '_' or '-' (it becomes a directory and an S3 prefix)",
            )
        _require_nonempty("run.output", self.output)
        _require_nonempty("run.scratch", self.scratch)
        if self.lease_ttl_seconds < 3:
            raise ConfigError(f"run.lease_ttl_seconds must be at least 3, got {self.lease_ttl_seconds}")


@dataclass
class ModelConfig:
    source: str = "mistralai/Mistral-7B-v0.3"
    """Base model: a Hub id, `s3://bucket/models/x/`, a local directory, or `builtin:tiny-mistral` (the CPU demo)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin; recorded in the model card."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Weight dtype. `float32` on CPU gives bitwise-reproducible runs."""
    trust_remote_code: bool = False
    """Run model code shipped with the checkpoint. Off: it executes arbitrary Python."""
    attn_implementation: str | None = None
    """Attention kernel (`sdpa`, `eager`, `flash_attention_2`); empty lets transformers choose."""
    tf32: bool | None = None
    """TF32 for fp32 matmuls on Ampere or newer GPUs; empty: on wherever the GPU has it (`job.train.fastpath`)."""
    compile: bool | None = None
    """Compile each decoder layer (regional `torch.compile`); empty: on with a CUDA GPU, off on CPU; true compiles
    on CPU too. The compiler's cache is kept with the run (`cache/`), so a restart does not compile again."""
    liger_kernels: bool = False
    """Liger's Triton kernels for RMSNorm, SwiGLU and RoPE (a CUDA GPU and the `liger` extra; the image has it).
    Only with compile off: compiled layers fuse those operations already."""

    def __post_init__(self) -> None:
        _require_nonempty("model.source", self.source)


@dataclass(frozen=True)
class SourceConfig:
    """One entry of `data.train` given as a list (docs/data.md, "Mixtures")."""

    path: str
    """A file, directory, `s3://` prefix or `hf://datasets/...` id, as `data.train` takes."""
    format: str = "auto"
    """This source's record format (`auto`: detected in it); defaults to `data.format`."""
    weight: float = 1.0
    """How many times each example is taken: 2 doubles the source, 0.5 keeps a seeded half (0 is refused)."""
    max_examples: int | None = None
    """Take a seeded sample of at most this many records before `weight` applies (empty: all)."""

    @classmethod
    def parse(cls, item: Any, where: str, default_format: str) -> SourceConfig:
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict):
            raise ConfigError(f"{where} must be a path or a mapping with `path`, got {type(item).__name__}")
        unknown = sorted(set(item) - set(SOURCE_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {shorten(repr(unknown))}", hint=f"use {', '.join(SOURCE_KEYS)}")
        path = item.get("path")
        if not isinstance(path, str) or not path.strip():
            raise ConfigError(f"{where}.path must be a non-empty string")
        fmt = item.get("format") or default_format
        if fmt not in FORMATS:
            raise ConfigError(f"{where}.format {shorten(repr(fmt))} is not one of {', '.join(FORMATS)}")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise ConfigError(f"{where}.weight must be a positive number, got {shorten(repr(weight))}")
        cap = item.get("max_examples")
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ConfigError(f"{where}.max_examples must be a positive integer, got {shorten(repr(cap))}")
        return cls(path.strip(), fmt, float(weight), cap)


@dataclass
class DataConfig:
    train: str | list[Any] | None = None
    """Training data: a file (`.jsonl`, `.json`, `.parquet`, `.jsonl.gz`, `.jsonl.zst`) or a directory/prefix of
    them (local path, `s3://`, or a Hub dataset `hf://datasets/OWNER/NAME[@REVISION][/PATTERN]`), read in sorted
    order. Or a list of sources, each a path or a mapping with `path` and optional `format`, `weight` (how many
    times each example is taken: 2 doubles, 0.5 takes a seeded half) and `max_examples` (a seeded sample of at most
    that many records). Required."""
    eval: str | None = None
    """Evaluation data, same forms as `train`; or use `eval_fraction`."""
    eval_fraction: float = 0.0
    """Fraction of `train` held out for evaluation (seeded split) when `eval` is empty."""
    format: Literal["auto", "messages", "prompt_completion", "text", "alpaca", "sharegpt"] = "auto"
    """Record format: `messages`, `prompt_completion`, `text`, `alpaca`, `sharegpt`, or `auto` (detected)."""
    max_length: int = 2048
    """Tokens per example (per packed sequence with `packing`); see `truncation` for longer examples."""
    truncation: Literal["truncate", "drop", "error"] = "truncate"
    """Examples longer than `max_length`: `truncate` (keep the start), `drop` them, or `error` (exit 65)."""
    text_mode: Literal["blocks", "documents"] = "blocks"
    """`text` records (continued pretraining): `blocks` joins the documents, each ending in EOS, and cuts them into
    `max_length` blocks, so no token is lost; `documents` keeps one example per document, cut by `truncation`."""
    special_strings: Literal["control", "text"] = "control"
    """Special-token strings inside record content (`</s>`, `[INST]`): `control` tokenizes them as the control
    tokens they spell (counted and warned about), `text` as the plain characters they are (as mistral-common
    does)."""
    train_on: Literal["assistant", "all"] = "assistant"
    """Chat data: train on assistant turns only (each with its end-of-turn token), or on every token."""
    chat_template: str | None = None
    """A Jinja chat template replacing the tokenizer's; empty keeps the tokenizer's. A value ending in `.jinja` or
    `.j2`, or written `file:PATH`, is read from that file (at most 256 KiB; nothing under /proc, /sys or /dev, links
    resolved first); any other value is the template text itself."""
    packing: bool = False
    """Pack examples into sequences of `max_length` (best-fit decreasing), padding-free: positions restart per
    example and no example attends to another."""
    max_invalid: int = 0
    """Bad records that may be skipped (listed in the run's `reports/`); more stop the job with exit 65."""
    max_record_bytes: int = MAX_RECORD_BYTES
    """Largest record (a JSON Lines line, a JSON array element, a Parquet row) in bytes; a larger one is a bad
    record (exit 65 naming file:line and its size), found without reading it whole where the format allows."""
    num_proc: int = 0
    """Processes that tokenize (0: every CPU core available to the job)."""
    cache: bool = True
    """Reuse the tokenized dataset (scratch and the run's `cache/` prefix) when data, tokenizer and settings match."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval and self.eval_fraction:
            raise ConfigError("data.eval and data.eval_fraction are both set", hint="use one of them")
        if self.max_length < 8:
            raise ConfigError(f"data.max_length must be at least 8, got {self.max_length}")
        if self.format not in FORMATS:
            raise ConfigError(f"data.format {shorten(repr(self.format))} is not one of {', '.join(FORMATS)}")
        if self.truncation not in TRUNCATION_MODES:
            raise ConfigError(
                f"data.truncation {shorten(repr(self.truncation))} is not one of {', '.join(TRUNCATION_MODES)}"
            )
        if self.max_invalid < 0:
            raise ConfigError(f"data.max_invalid must not be negative, got {self.max_invalid}")
        if self.num_proc < 0:
            raise ConfigError(f"data.num_proc must be 0 (all cores) or more, got {self.num_proc}")
        if self.max_record_bytes < MIN_RECORD_BYTES:
            raise ConfigError(f"data.max_record_bytes must be at least {MIN_RECORD_BYTES}, got {self.max_record_bytes}")
        if self.text_mode not in TEXT_MODES:
            raise ConfigError(f"data.text_mode {shorten(repr(self.text_mode))} is not one of {', '.join(TEXT_MODES)}")
        if self.special_strings not in SPECIAL_STRINGS_MODES:
            raise ConfigError(
                f"data.special_strings {shorten(repr(self.special_strings))} is not one of "
                f"{', '.join(SPECIAL_STRINGS_MODES)}"
            )
        if isinstance(self.train, list):
            self.sources()  # every entry checked now, with its index in the message

    def sources(self) -> list[SourceConfig]:
        """`train` as a list of sources: one (with `format`) for a single path."""
        if self.train is None:
            return []
        if isinstance(self.train, str):
            return [SourceConfig(self.train, self.format)]
        if not self.train:
            raise ConfigError("data.train is an empty list", hint="give at least one source")
        out = [SourceConfig.parse(item, f"data.train[{index}]", self.format) for index, item in enumerate(self.train)]
        paths = [source.path for source in out]
        repeated = sorted({p for p in paths if paths.count(p) > 1})
        if repeated:
            raise ConfigError(
                f"data.train names {shorten(repr(repeated))} more than once", hint="use `weight` to repeat a source"
            )
        return out


@dataclass
class TrainConfig:
    """The seed recipe's trainer settings. Any other `trl.SFTConfig` field may be
    given under `train:` too; it is type-checked against SFTConfig and kept in `extra`."""

    per_device_train_batch_size: int = 2
    """Examples per micro-batch. When neither this nor `gradient_accumulation_steps` is set, the planner may split
    the same examples per optimizer step (here 2 x 8 = 16) into another micro-batch x accumulation on a GPU, the
    one it expects to run fastest within memory; a value you set is always kept."""
    gradient_accumulation_steps: int = 8
    """Micro-batches per optimizer step."""
    activation_checkpointing: bool = True
    """Recompute activations in the backward pass: ~20% slower, far less memory (alias: gradient_checkpointing)."""
    learning_rate: float = 5.0e-6
    """Peak learning rate."""
    num_train_epochs: float = 3.0
    """Passes over the training data (`max_steps` > 0 overrides)."""
    max_steps: int = -1
    """Stop after this many optimizer steps, at least 1 (-1: use num_train_epochs)."""
    lr_scheduler_type: str = "linear"
    """Learning-rate schedule (any transformers scheduler name)."""
    warmup_steps: float = 0
    """Warm-up steps (a value below 1 is a fraction of all steps)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    logging_steps: int = 10
    """Log a step line every N optimizer steps."""
    seed: int = 42
    """Seed for weights init, data order and dropout; same seed, same run."""
    optim: str = "adamw_kahan"
    """Optimizer: `adamw_kahan` (bf16 weights, Kahan-compensated), `adamw_8bit_sr`, `adamw_fp32_master`, or any
    transformers name (the seed recipe's `adamw_torch_fused` loses small bf16 updates: docs/fidelity.md)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further `trl.SFTConfig` fields, passed through as given (internal: write them directly under `train:`)."""
    activation_checkpointing_layers: str = "auto"
    """Layers that recompute when `activation_checkpointing` is on: `auto` (the planner keeps as many layers'
    activations as fit the GPU, all when they fit), `all`, `keep_N` (N layers keep their activations, the others
    recompute), or `every_N` (every N-th layer recomputes)."""

    @property
    def fsdp(self) -> bool:
        """`train.fsdp: true` (or a legacy option string such as "full_shard auto_wrap")."""
        value = self.extra.get("fsdp")
        return bool(value) and str(value).strip().lower() not in ("false", "0", "no", "none")

    def __post_init__(self) -> None:
        if self.per_device_train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ConfigError("train batch size and gradient_accumulation_steps must be at least 1")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ConfigError(f"train.learning_rate must be a positive number, got {self.learning_rate}")
        if self.max_steps == 0 or self.max_steps < -1:  # Trainer would still take one step and publish it
            raise ConfigError(
                f"train.max_steps must be at least 1, or -1 to use train.num_train_epochs; got {self.max_steps}"
            )
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ConfigError("train.num_train_epochs must be positive when train.max_steps is not set")
        if self.logging_steps < 1:
            raise ConfigError(f"train.logging_steps must be at least 1, got {self.logging_steps}")


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    """Save a checkpoint every N optimizer steps."""
    every_minutes: float = 8.0
    """...and at least every M minutes of training, whichever comes first. With the write and upload after it,
    a preemption without warning loses at most about 10 minutes of work."""
    keep: int = 2
    """Committed checkpoints kept in the store; older ones are deleted after a newer one commits."""
    grace_seconds: float = 25.0
    """Seconds the job may spend after SIGTERM; keep it below what the platform really gives."""
    background_upload: bool = True
    """Upload checkpoints while training continues; false blocks training until each one is committed."""
    async_save: bool = True
    """Copy the training state to host memory (the only part that blocks training; pinned memory on a GPU, in
    bounded chunks when host RAM is short) and write it to scratch in the background; false writes while
    training waits."""
    delete_after_final: bool = True
    """Delete the run's checkpoints once the final model is committed."""
    scratch_probe_mib: int = 256
    """MiB written and fsynced to scratch at start to measure its write speed; the log then says how long a
    checkpoint write will take, and warns when that is too slow for `every_minutes`. 0 skips the probe."""

    def __post_init__(self) -> None:
        if self.every_steps < 1 or self.keep < 1:
            raise ConfigError("checkpoint.every_steps and checkpoint.keep must be at least 1")
        if self.scratch_probe_mib < 0:
            raise ConfigError("checkpoint.scratch_probe_mib must not be negative", hint="0 skips the probe")
        if self.every_minutes <= 0 or self.grace_seconds < 0:
            raise ConfigError("checkpoint.every_minutes must be positive and checkpoint.grace_seconds not negative")


@dataclass
class PublishConfig:
    hub_repo: str | None = None
    """`owner/name` of a Hugging Face Hub model repo: once final/ is committed to run.output, it is also pushed
    there (HF_TOKEN with write access; HF_ENDPOINT for a private Hub). Unset: the store only."""
    hub_private: bool = True
    """Create the Hub repo private when it does not exist yet (an existing repo keeps its visibility)."""

    def __post_init__(self) -> None:
        if self.hub_repo is not None and not HUB_REPO.fullmatch(self.hub_repo):
            raise ConfigError(
                f"publish.hub_repo {self.hub_repo!r} is not a Hub model repo id",
                hint="write it as owner/name (letters, digits, '-', '_', '.'), e.g. my-org/mistral-7b-sft",
            )


@dataclass
class StorageConfig:
    endpoint_url: str | None = None
    """S3 endpoint (MinIO, R2, Ceph...); empty: `AWS_ENDPOINT_URL_S3`, then `AWS_ENDPOINT_URL`, then AWS."""
    region: str | None = None
    """S3 region; empty: `AWS_REGION` / `AWS_DEFAULT_REGION` / the profile's."""
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    """Bucket addressing; `path` for MinIO-like stores."""
    checksums: Literal["when_required", "when_supported"] = "when_required"
    """When boto3 sends/validates CRC checksums; `when_supported` is the AWS default, which some stores reject."""
    max_attempts: int = 8
    """Attempts per request, the first included (botocore `standard` retry mode), before exit 69."""
    connect_timeout: float = 10.0
    """Seconds to wait for a connection."""
    read_timeout: float = 60.0
    """Seconds to wait for a response."""
    multipart_threshold_mb: int = 16
    """Files of this size (MiB) or more transfer in parallel parts."""
    multipart_chunksize_mb: int = 16
    """Part size (MiB) of multipart transfers (raised automatically to stay within S3's 10,000 parts)."""
    max_concurrency: int = 10
    """Parallel requests (files and parts together); each part in flight holds one part in memory."""
    verify_etag: bool = True
    """Check each pushed object's ETag against the local MD5 (skipped for SSE-KMS/SSE-C objects)."""
    progress_interval_seconds: float = 10.0
    """Seconds between progress lines (bytes done, MB/s, ETA) of a pull or push larger than a few MB."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.max_concurrency < 1:
            raise ConfigError("storage.max_attempts and storage.max_concurrency must be at least 1")
        if self.multipart_threshold_mb < 5 or self.multipart_chunksize_mb < 5:
            raise ConfigError("storage multipart sizes must be at least 5 MiB (the S3 minimum part size)")
        if self.multipart_chunksize_mb > 5 * 1024:
            raise ConfigError("storage.multipart_chunksize_mb must be at most 5120 (the S3 maximum part size)")
        if self.connect_timeout <= 0 or self.read_timeout <= 0:
            raise ConfigError("storage.connect_timeout and storage.read_timeout must be positive")
        if self.progress_interval_seconds <= 0:
            raise ConfigError("storage.progress_interval_seconds must be positive")
        if self.endpoint_url and not self.endpoint_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"storage.endpoint_url {shorten(repr(self.endpoint_url))} is not an http(s) URL",
                hint="e.g. http://minio.storage.svc:9000",
            )


@dataclass
class DistributedConfig:
    nproc_per_node: int = 1
    """Processes (one per GPU) on each node; above 1 the job starts its ranks through torch's elastic launcher."""
    nnodes: int = 1
    """Nodes in the run; above 1 every node runs the same command and they meet at `rdzv_endpoint`."""
    rdzv_endpoint: str | None = None
    """`host:port` where the nodes meet (torch's c10d rendezvous, hosted by the node at that address)."""
    rdzv_id: str | None = None
    """Rendezvous id shared by the nodes of one start; empty: run.name."""
    collective_timeout_seconds: float = 600.0
    """Longest wait in one training collective: a dead rank takes the others down after this, not a hang."""
    setup_timeout_seconds: float = 7200.0
    """Longest wait for a node's first rank to pull and tokenize (or rank 0 to publish) before giving up."""

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1 or self.nnodes < 1:
            raise ConfigError("distributed.nproc_per_node and distributed.nnodes must be at least 1")
        if self.collective_timeout_seconds <= 0 or self.setup_timeout_seconds <= 0:
            raise ConfigError("distributed timeouts must be positive")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ConfigError(
                f"distributed.nnodes is {self.nnodes} but distributed.rdzv_endpoint is empty",
                hint="set it to host:port of the first node (e.g. sft-run-node-0-0.sft-run:29400)",
            )
        if self.rdzv_endpoint and not re.fullmatch(r"[A-Za-z0-9.\-_\[\]:]+:\d+", self.rdzv_endpoint):
            raise ConfigError(
                f"distributed.rdzv_endpoint {shorten(repr(self.rdzv_endpoint))} is not host:port",
                hint="e.g. 10.0.0.5:29400",
            )

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


@dataclass
class JobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def is_set(self, key: str) -> bool:
        """Whether `section.key` was given (file, environment or `--set`) rather than left at its default."""
        return key in self.given

    @property
    def given(self) -> frozenset[str]:
        """Every `section.key` that was set rather than left at its default."""
        return getattr(self, "_given", frozenset())

    def mark_given(self, keys: frozenset[str]) -> None:
        self._given = frozenset(keys)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict in the file's shape: `train.extra` is folded back under `train:`."""
        out = dataclasses.asdict(self)
        out["train"].update(out["train"].pop("extra"))
        return out


SECTION_TYPES: dict[str, type] = {
    "run": RunConfig,
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "publish": PublishConfig,
    "storage": StorageConfig,
    "distributed": DistributedConfig,
}

# SFTConfig fields that another section owns: naming the right key beats "unknown key".
OWNED_ELSEWHERE: dict[str, str] = {
    "output_dir": "run.output and run.name",
    "max_length": "data.max_length",
    "max_seq_length": "data.max_length",
    "assistant_only_loss": "data.train_on",
    "completion_only_loss": "data.train_on",
    "dataset_text_field": "data.format",
    "chat_template_path": "data.chat_template",
    "model_init_kwargs": "model.dtype / model.attn_implementation / model.trust_remote_code",
    "bf16": "model.dtype (bf16 autocast follows the weight dtype on a GPU)",
    "fp16": "model.dtype",
    "tf32": "model.tf32 (the job enables TF32 where the GPU supports it)",
    "use_cpu": "the job (it runs on the GPU when one is present)",
    "save_strategy": "checkpoint.every_steps / checkpoint.every_minutes",
    "save_steps": "checkpoint.every_steps",
    "save_total_limit": "checkpoint.keep",
    "resume_from_checkpoint": "the job's own resume (it restores the newest committed checkpoint)",
    "push_to_hub": "publish.hub_repo (final/ is pushed after it is committed to run.output)",
    "hub_model_id": "publish.hub_repo",
    "hub_private_repo": "publish.hub_private",
    "hub_token": "the HF_TOKEN environment variable",
    "logging_dir": "run.output",
    "dataset_kwargs": "data.*",
    "eval_dataset": "data.eval",
}
ALIASES = {"gradient_checkpointing": "activation_checkpointing"}


def _require_nonempty(key: str, value: str | None) -> None:
    if not value or not str(value).strip():
        raise ConfigError(f"{key} is empty", hint=f"set {key}")


def scratch_dir(config: JobConfig) -> Path:
    """The run's local working directory (absolute: relative paths resolve against the working directory)."""
    return Path(config.run.scratch).absolute()
