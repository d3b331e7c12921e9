"""The fast path: attention kernel, TF32, padding-free batches, the layers that keep their activations, the batch
split, compile and Liger kernels, per GPU.

Each switch is settable in the config and, where it is left empty, on wherever the installed packages and
the detected card support it. The decision is a pure function of its inputs (`decide`), so tests fake a
device and its packages instead of torch; `choose_fast_path` gathers the real inputs (the planner's peaks
from `job.plan`), decides, and logs it as one structured line (`fast_path`) with a reason per switch.
Nothing is downloaded at run time. What each switch relies on: docs/fast-path.md.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from job.errors import ConfigError
from job.plan.budget import gpu_budgets, layer_count, model_config_at
from job.plan.flops import usable_memory_bytes
from job.plan.speed import MEMORY_TARGET, CheckpointBudget, Layout, decide_layout, every_n_of, parse_layers, splits

__all__ = ["MEMORY_TARGET", "CheckpointBudget", "DeviceInfo", "FastPath", "FastPathInputs", "decide"]

FA2_MIN_VERSION = (2, 3, 3)
FA2_CAPABILITIES = ((8, 0), (8, 6), (8, 7), (8, 9), (9, 0))
"""Capabilities flash-attn 2 is built and checked for (README: Ampere, Ada, Hopper; setup.py: sm_80, sm_90)."""
FA3_CAPABILITIES = ((9, 0),)
PACKAGES = ("flash-attn", "flash-attn-3", "liger-kernel", "kernels")
"""Distributions the decision reads (their versions; absent ones are left out)."""
KNOWN_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
PADDING_FREE_ATTENTION = KNOWN_ATTENTION


@dataclass(frozen=True)
class DeviceInfo:
    """What the decision needs to know about the device."""

    kind: str
    """`cuda` or `cpu`."""
    name: str | None = None
    """CUDA device name, e.g. `NVIDIA RTX PRO 6000 Blackwell Server Edition`."""
    capability: tuple[int, int] | None = None
    """CUDA compute capability (major, minor), e.g. (12, 0)."""
    memory_bytes: int | None = None
    """Total device memory."""
    cuda: str | None = None
    """CUDA version torch was built with."""
    torch: str | None = None

    @property
    def sm(self) -> str:
        return f"sm_{self.capability[0]}{self.capability[1]}" if self.capability else "cpu"


@dataclass(frozen=True)
class FastPathInputs:
    """Everything `decide` reads: the device, installed packages, the user's settings and the planner's peaks."""

    device: DeviceInfo
    packages: Mapping[str, str] = field(default_factory=dict)
    """Installed distribution -> version, for the names in `PACKAGES`."""
    dtype: str = "bfloat16"
    attn_implementation: str | None = None
    tf32: bool | None = None
    compile: bool | None = None
    """model.compile: None is auto (on with CUDA)."""
    liger_kernels: bool = False
    packing: bool = False
    activation_checkpointing: bool = True
    checkpointing_layers: str = "auto"
    layers: int | None = None
    """Decoder layers of the model (from its config.json); None: unknown (then only auto/all/off work)."""
    batch_size: int = 2
    grad_accum: int = 8
    seq_length: int = 2048
    split_batch: bool = False
    """The user set neither batch nor accumulation: the planner may split the same examples another way."""
    budget: CheckpointBudget | None = None
    """The planner's peaks at `batch_size`."""
    split_budgets: Mapping[int, CheckpointBudget] = field(default_factory=dict)
    """The planner's peaks per candidate micro-batch (for the split)."""
    budget_note: str = ""
    """Why there is no budget (e.g. no GPU, or the planner could not size the model)."""


@dataclass(frozen=True)
class FastPath:
    """The decision: one value per switch and a reason for each."""

    device: DeviceInfo
    attn_implementation: str
    tf32: bool
    padding_free: bool
    activation_checkpointing: bool
    """Some layer recomputes (False: every layer keeps its activations)."""
    kept_layers: frozenset[int]
    """Decoder layers (by index) that keep their activations while others recompute; the last ones under auto."""
    compile: bool
    """Compile each decoder layer (regional `torch.compile`, `job.train.compile`)."""
    reasons: dict[str, str]
    planned_peak_bytes: int | None = None
    layers: int | None = None
    batch_size: int = 2
    grad_accum: int = 8
    liger_kernels: bool = False
    """Apply Liger's RMSNorm/SwiGLU/RoPE kernels to the loaded model (`job.train.liger`; compile is off then)."""

    @property
    def layers_kept(self) -> int | None:
        """How many layers keep their activations (None: unknown, checkpointing off on an unread model)."""
        if not self.activation_checkpointing:
            return self.layers
        return len(self.kept_layers)

    @property
    def checkpointing_mode(self) -> str:
        if not self.activation_checkpointing:
            return "off"
        return f"keep_{len(self.kept_layers)}" if self.kept_layers else "full"

    def sft_kwargs(self) -> dict[str, Any]:
        """The `SFTConfig` fields this decision sets (TF32 only on a GPU: Trainer refuses it elsewhere).

        Trainer enables checkpointing in `train()`: on every layer, or every n-th when the kept set is
        transformers' `every_n_layers` pattern; `checkpointing_callback` then sets each layer's flag to the
        exact set when training begins (without it every layer recomputes: slower, never larger)."""
        every_n = every_n_of(self.kept_layers, self.layers) if self.kept_layers and self.layers else None
        return {
            "per_device_train_batch_size": self.batch_size,
            "gradient_accumulation_steps": self.grad_accum,
            "activation_checkpointing": self.activation_checkpointing,
            "activation_checkpointing_kwargs": {"every_n_layers": every_n}
            if self.activation_checkpointing and every_n
            else None,
            "tf32": self.tf32 if self.device.kind == "cuda" else None,
        }

    def log_fields(self) -> dict[str, Any]:
        """One flat mapping for the structured `fast_path` line."""
        kept = self.layers_kept
        return {
            "device": self.device.name or self.device.kind,
            "capability": self.device.sm,
            "attention": self.attn_implementation,
            "tf32": self.tf32,
            "padding_free": self.padding_free,
            "activation_checkpointing": self.checkpointing_mode,
            "layers_kept": f"{kept}/{self.layers}" if kept is not None and self.layers else None,
            "batch": self.batch_size,
            "grad_accum": self.grad_accum,
            "compile": self.compile,
            "liger_kernels": self.liger_kernels,
            "planned_peak_gib": round(self.planned_peak_bytes / 2**30, 2) if self.planned_peak_bytes else None,
            "reasons": dict(self.reasons),
        }


# ---------------------------------------------------------------- the decision (pure)


def decide(inputs: FastPathInputs) -> FastPath:
    """Choose every switch from `inputs` alone; raise ConfigError for settings that cannot work here."""
    reasons: dict[str, str] = {}
    attention, reasons["attention"] = _attention(inputs)
    tf32, reasons["tf32"] = _tf32(inputs)
    padding_free, reasons["padding_free"] = _padding_free(inputs, attention)
    layout = _layout(inputs)
    reasons["activation_checkpointing"], reasons["batch_split"] = layout.layers_reason, layout.split_reason
    compile_, reasons["compile"] = _compile(inputs)
    liger, reasons["liger_kernels"] = _liger(inputs, compile_)
    return FastPath(
        inputs.device, attention, tf32, padding_free, layout.checkpointing, layout.kept, compile_, reasons, layout.peak,
        layout.layers, layout.batch, layout.accum, liger,
    )  # fmt: skip


def _version(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


def _attention(inp: FastPathInputs) -> tuple[str, str]:
    dev, wanted = inp.device, inp.attn_implementation
    fa2, fa3 = inp.packages.get("flash-attn"), inp.packages.get("flash-attn-3")
    if wanted:
        if "/" in wanted or wanted.startswith("kernels"):
            raise ConfigError(
                f"model.attn_implementation {wanted!r} is a Hub kernel: transformers downloads it at run time",
                hint="use an installed kernel: sdpa, or flash_attention_2 with the flash-attn package in the image",
            )
        if wanted not in KNOWN_ATTENTION:
            raise ConfigError(f"model.attn_implementation {wanted!r} is not one of {', '.join(KNOWN_ATTENTION)}")
        if wanted.startswith("flash_attention"):
            package = "flash-attn" if wanted == "flash_attention_2" else "flash-attn-3"
            if dev.kind != "cuda":
                raise ConfigError(f"model.attn_implementation {wanted} needs a CUDA GPU; this run has none")
            if package not in inp.packages:
                # transformers would fetch kernels-community/... from the Hub instead (when `kernels` is installed).
                raise ConfigError(
                    f"model.attn_implementation {wanted} needs the {package} package, which is not installed",
                    hint=f"install {package} in the image, or use sdpa (nothing is downloaded at run time)",
                )
            verified = FA2_CAPABILITIES if wanted == "flash_attention_2" else FA3_CAPABILITIES
            if dev.capability not in verified:
                return wanted, f"set by model.attn_implementation; {package} on {dev.sm} is not verified here"
        return wanted, "set by model.attn_implementation"
    if dev.kind != "cuda":
        return "sdpa", "no CUDA device: PyTorch SDPA (transformers' default)"
    if fa3 and dev.capability in FA3_CAPABILITIES:
        return "flash_attention_3", f"flash-attn-3 {fa3} installed and built for Hopper ({dev.sm})"
    if fa2 and _version(fa2) >= FA2_MIN_VERSION and dev.capability in FA2_CAPABILITIES:
        return "flash_attention_2", f"flash-attn {fa2} installed and supports {dev.sm}"
    if fa2 and _version(fa2) < FA2_MIN_VERSION:
        return "sdpa", f"flash-attn {fa2} is older than 2.3.3 (transformers' minimum)"
    if fa2:
        return "sdpa", (
            f"flash-attn {fa2} is not verified on {dev.sm} (its runtime guard admits sm_8x and sm_90);"
            " SDPA runs PyTorch's flash kernel there"
        )
    return "sdpa", "flash-attn is not installed: PyTorch SDPA (flash / memory-efficient / cuDNN backends)"


def _tf32(inp: FastPathInputs) -> tuple[bool, str]:
    dev = inp.device
    ampere = dev.kind == "cuda" and dev.capability is not None and dev.capability >= (8, 0)
    if inp.tf32 is False:
        return False, "off by model.tf32"
    if not ampere:
        if inp.tf32:
            raise ConfigError(f"model.tf32 is true but TF32 needs an Ampere or newer GPU; this run has {dev.sm}")
        return False, "no Ampere-or-newer GPU"
    where = "set by model.tf32" if inp.tf32 else "on by default"
    return True, f"{where}: {dev.sm} tensor cores run fp32 matmuls as TF32 (bf16 matmuls are unaffected)"


def _padding_free(inp: FastPathInputs, attention: str) -> tuple[bool, str]:
    if not inp.packing:
        return False, "data.packing is off: batches are padded to their longest row"
    if attention not in PADDING_FREE_ATTENTION:
        raise ConfigError(f"data.packing needs an attention kernel that keeps packed examples apart, not {attention}")
    if attention.startswith("flash_attention"):
        return True, f"{attention} runs packed rows through its varlen kernel (cu_seq_lens, no mask)"
    return True, (
        f"{attention}: transformers builds a block-diagonal mask from the restarted position_ids"
        " (correct; SDPA then uses its memory-efficient kernel)"
    )


def _layout(inp: FastPathInputs) -> Layout:
    return decide_layout(
        setting=inp.checkpointing_layers,
        checkpointing=inp.activation_checkpointing,
        layers=inp.layers,
        batch=inp.batch_size,
        accum=inp.grad_accum,
        seq=inp.seq_length,
        split=inp.split_batch,
        budget=inp.budget,
        split_budgets=inp.split_budgets,
        note=inp.budget_note or "no memory plan",
        on_gpu=inp.device.kind == "cuda",
    )


def _compile(inp: FastPathInputs) -> tuple[bool, str]:
    if inp.compile is False:
        return False, "off by model.compile"
    if inp.compile:
        where = "" if inp.device.kind == "cuda" else " (on CPU: inductor's C++ code)"
        return True, f"set by model.compile: each decoder layer compiled{where}"
    if inp.device.kind != "cuda":
        return False, "no CUDA device: eager (model.compile: true compiles on CPU too)"
    return True, "regional: each decoder layer compiled (on by default with CUDA; model.compile: false turns it off)"


def _liger(inp: FastPathInputs, compiled: bool) -> tuple[bool, str]:
    if not inp.liger_kernels:
        return False, "off (model.liger_kernels)"
    if compiled:
        raise ConfigError(
            "liger kernels only with model.compile false: compiled layers fuse RMSNorm, SwiGLU and RoPE already",
            hint="set model.compile: false to use model.liger_kernels, or drop model.liger_kernels",
        )
    if inp.device.kind != "cuda":
        raise ConfigError("model.liger_kernels needs a CUDA GPU (Triton kernels); this run has none")
    version = inp.packages.get("liger-kernel")
    if not version:
        raise ConfigError(
            "model.liger_kernels needs the liger-kernel package, which is not installed",
            hint="install the image's liger extra (nothing is downloaded at run time), or drop model.liger_kernels",
        )
    return True, f"liger-kernel {version}: RMSNorm, SwiGLU and RoPE kernels (the loss stays TRL's chunked head)"


# ---------------------------------------------------------------- refusals


def refuse_downloaded_kernels(extra: Mapping[str, Any], packages: Mapping[str, str]) -> None:
    """ConfigError for trainer settings that download kernels at run time or that TRL 1.16 refuses."""
    if extra.get("use_kernels") or (extra.get("model_init_kwargs") or {}).get("use_kernels"):
        raise ConfigError(
            "use_kernels downloads kernels from the Hugging Face Hub at run time; this job uses installed ones only",
            hint="remove use_kernels; the fast path picks installed kernels (see the fast_path log line)",
        )
    liger = extra.get("liger_kernel_config") or {}
    if liger.get("fused_linear_cross_entropy"):
        raise ConfigError(
            "Liger's fused cross-entropy is refused by TRL 1.16: it replaces the forward that TRL's own"
            " chunked LM head patches (which already computes the loss without full logits)",
            hint="keep only Liger's layer kernels: liger_kernel_config: {fused_linear_cross_entropy: false}",
        )
    if extra.get("use_liger_kernel") and "liger-kernel" not in packages:
        raise ConfigError("train.use_liger_kernel needs the liger-kernel package, which is not installed")


# ---------------------------------------------------------------- gathering the real inputs


def installed_packages(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Versions of the installed distributions among `names` (read from metadata; nothing is imported)."""
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def detect_device(device: str = "cuda") -> DeviceInfo:
    """The CUDA device's name, capability and memory, or a CPU DeviceInfo (no GPU, or `device` is not cuda)."""
    import torch

    if device != "cuda" or not torch.cuda.is_available():
        return DeviceInfo("cpu", torch=torch.__version__)
    props = torch.cuda.get_device_properties(0)
    return DeviceInfo(
        "cuda",
        name=props.name,
        capability=(props.major, props.minor),
        memory_bytes=usable_memory_bytes(0),  # a per-process cap counts
        cuda=torch.version.cuda,
        torch=torch.__version__,
    )


def checkpoint_budget(
    model_config: Any,
    device: DeviceInfo,
    *,
    dtype: str,
    optimizer: str,
    batch: int,
    seq: int,
    planner: Callable[..., dict[int, CheckpointBudget]] | None = None,
) -> tuple[CheckpointBudget | None, str]:
    """The planner's peaks at micro-batch `batch` for every number of layers kept, or (None, why)."""
    memory = device.memory_bytes if device.kind == "cuda" else None
    budgets, note = gpu_budgets(
        model_config, memory, dtype=dtype, optimizer=optimizer, batches=(batch,), seq=seq, planner=planner
    )
    return budgets.get(batch), note


_model_config = model_config_at  # the name tests/test_model.py knows

SPLIT_KEYS = ("train.per_device_train_batch_size", "train.gradient_accumulation_steps")


def choose_fast_path(
    config: Any, dev: DeviceInfo, model_location: str | None = None, *, packed: bool | None = None
) -> FastPath:
    """Decide the fast path for a JobConfig on `dev` and log it. `packed`: the training rows carry `seq_lengths`
    (packing, or text cut into blocks) and must run padding-free; None: as `data.packing` says.

    `model_location` is where the model was resolved to (a directory or a Hub id): the planner reads its
    config.json for the layer count and the peaks; without it, `model.source` is tried (on CPU only when the
    layers setting needs the count, so a CPU run never asks the Hub).
    """
    train, model, data = config.train, config.model, config.data
    packages = installed_packages()
    refuse_downloaded_kernels(train.extra, packages)
    setting = str(getattr(train, "activation_checkpointing_layers", "auto"))
    kind, _ = parse_layers(setting)
    fsdp = bool(getattr(train, "fsdp", False))
    is_set = getattr(config, "is_set", lambda key: False)
    split = dev.kind == "cuda" and not fsdp and not any(is_set(key) for key in SPLIT_KEYS)
    batch, accum = train.per_device_train_batch_size, train.gradient_accumulation_steps
    model_config = None
    if dev.kind == "cuda" or kind in ("every", "keep"):
        model_config = model_config_at(model_location or model.source, model.revision, model.trust_remote_code)
    budgets: dict[int, CheckpointBudget] = {}
    note = "FSDP recomputes every layer itself" if fsdp else "no GPU to plan for"
    if dev.kind == "cuda" and not fsdp:
        wanted = {batch, *(b for b, _ in splits(batch * accum))} if split else {batch}
        budgets, note = gpu_budgets(
            model_config,
            dev.memory_bytes,
            dtype=model.dtype,
            optimizer=train.optim,
            batches=wanted,
            seq=data.max_length,
        )
    fast = decide(
        FastPathInputs(
            device=dev,
            packages=packages,
            dtype=model.dtype,
            attn_implementation=model.attn_implementation,
            tf32=getattr(model, "tf32", None),
            compile=getattr(model, "compile", None),
            liger_kernels=bool(getattr(model, "liger_kernels", False)),
            packing=bool(getattr(data, "packing", False)) if packed is None else packed,
            activation_checkpointing=train.activation_checkpointing,
            checkpointing_layers=setting,
            layers=layer_count(model_config) if model_config is not None else None,
            batch_size=batch,
            grad_accum=accum,
            seq_length=data.max_length,
            split_batch=split,
            budget=budgets.get(batch),
            split_budgets=budgets if split else {},
            budget_note=note,
        )
    )
    log_decision(fast)
    return fast


def log_decision(fast: FastPath) -> None:
    """Log the decision as one structured line (`fast_path`), a reason per switch."""
    from job.logs import get_logger  # structlog: imported late so the GPU bench needs only torch + transformers

    get_logger(__name__).info("fast_path", **fast.log_fields())


# ---------------------------------------------------------------- applying it


def enable_tf32(enabled: bool) -> None:
    """What Trainer's `tf32` does: TF32 for fp32 matmuls and cuDNN convolutions."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def set_layer_flags(model: Any, fast: FastPath) -> int:
    """Each decoder layer recomputes unless it is in `fast.kept_layers`; returns how many recompute.

    The layers must already have a checkpointing function (Trainer's `train()` or `activation_checkpointing_enable`)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = fast.activation_checkpointing and index not in fast.kept_layers
    return sum(layer.gradient_checkpointing for layer in layers)


def apply_activation_checkpointing(model: Any, fast: FastPath) -> None:
    """Checkpoint `model`'s decoder layers as decided, outside Trainer (the GPU bench): enable, then set the flags."""
    if not fast.activation_checkpointing:
        on = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.24's name
        if on or (on is None and getattr(model, "is_gradient_checkpointing", False)):
            disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
            disable()
        return
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    set_layer_flags(model, fast)


def checkpointing_callback(fast: FastPath) -> Any:
    """A TrainerCallback that sets the exact per-layer flags when training begins.

    Trainer enables checkpointing inside `train()` (on every layer, or every n-th), after any callback could
    see the model at construction; `on_train_begin` runs after that, on every start and resume. Under FSDP
    (Trainer's own checkpointing off, FSDP's on) it does nothing."""
    from transformers import TrainerCallback

    class LayerCheckpointing(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            if model is not None and args.activation_checkpointing and fast.activation_checkpointing:
                set_layer_flags(model, fast)

    return LayerCheckpointing()


def recomputed_fraction(fast: FastPath, layers: int) -> float:
    """Share of decoder layers whose forward runs twice (for hardware FLOP utilisation)."""
    if not fast.activation_checkpointing:
        return 0.0
    return (layers - len(fast.kept_layers & frozenset(range(layers)))) / layers
