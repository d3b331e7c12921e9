"""The fast path: attention kernel, TF32, padding-free batches, activation checkpointing and compile, per GPU.

Each switch is settable in the config and, where it is left empty, on wherever the installed packages and
the detected card support it. The decision is a pure function of its inputs (`decide`), so tests fake a
device and its packages instead of torch; `choose_fast_path` gathers the real inputs, decides, and logs
it as one structured line (`fast_path`) with a reason per switch. Nothing is downloaded at run time.
What each switch relies on (kernel support per compute capability, upstream issues): docs/fast-path.md.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from job.errors import ConfigError

MEMORY_TARGET = 0.92
"""Fraction of the card the planned peak may fill (on a 97,887 MiB card: 88 GiB, under the 90 GiB target)."""
FA2_MIN_VERSION = (2, 3, 3)
FA2_CAPABILITIES = ((8, 0), (8, 6), (8, 7), (8, 9), (9, 0))
"""Capabilities flash-attn 2 is built and checked for (README: Ampere, Ada, Hopper; setup.py: sm_80, sm_90)."""
FA3_CAPABILITIES = ((9, 0),)
PACKAGES = ("flash-attn", "flash-attn-3", "liger-kernel", "kernels")
"""Distributions the decision reads (their versions; absent ones are left out)."""
KNOWN_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
PADDING_FREE_ATTENTION = KNOWN_ATTENTION
_EVERY_N = re.compile(r"every_(\d+)")


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
class CheckpointBudget:
    """The planner's peak-memory estimates at the two ends, for choosing how many layers recompute."""

    layers: int
    gpu_bytes: int
    full_bytes: int
    """Planned peak with every layer recomputed."""
    none_bytes: int
    """Planned peak with no recomputation."""

    def peak_bytes(self, every_n: int) -> int:
        """Planned peak when every `every_n`-th layer recomputes (0: none).

        From the planner's formula: each layer that keeps its activations adds the same amount, the
        difference between the two ends spread over L-1 layers (full recomputation still holds one
        layer's activations while recomputing it).
        """
        if every_n == 0:
            return self.none_bytes
        kept = self.layers - math.ceil(self.layers / every_n)
        per_layer = (self.none_bytes - self.full_bytes) / max(self.layers - 1, 1)
        return int(self.full_bytes + kept * per_layer)


@dataclass(frozen=True)
class FastPathInputs:
    """Everything `decide` reads: the device, installed packages and the user's settings."""

    device: DeviceInfo
    packages: Mapping[str, str] = field(default_factory=dict)
    """Installed distribution -> version, for the names in `PACKAGES`."""
    dtype: str = "bfloat16"
    attn_implementation: str | None = None
    tf32: bool | None = None
    compile: bool = False
    packing: bool = False
    activation_checkpointing: bool = True
    checkpointing_layers: str = "auto"
    budget: CheckpointBudget | None = None
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
    checkpoint_every_n_layers: int
    """1: every layer recomputes; n > 1: every n-th layer (selective). Ignored when checkpointing is off."""
    compile: bool
    reasons: dict[str, str]
    planned_peak_bytes: int | None = None

    @property
    def checkpointing_mode(self) -> str:
        if not self.activation_checkpointing:
            return "off"
        return "full" if self.checkpoint_every_n_layers == 1 else f"every_{self.checkpoint_every_n_layers}"

    def sft_kwargs(self) -> dict[str, Any]:
        """The `SFTConfig` fields this decision sets (TF32 only on a GPU: Trainer refuses it elsewhere)."""
        every_n = self.checkpoint_every_n_layers
        return {
            "activation_checkpointing": self.activation_checkpointing,
            "activation_checkpointing_kwargs": {"every_n_layers": every_n}
            if self.activation_checkpointing and every_n > 1
            else None,
            "tf32": self.tf32 if self.device.kind == "cuda" else None,
            "torch_compile": self.compile,
        }

    def log_fields(self) -> dict[str, Any]:
        """One flat mapping for the structured `fast_path` line."""
        return {
            "device": self.device.name or self.device.kind,
            "capability": self.device.sm,
            "attention": self.attn_implementation,
            "tf32": self.tf32,
            "padding_free": self.padding_free,
            "activation_checkpointing": self.checkpointing_mode,
            "compile": self.compile,
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
    (checkpointing, every_n, peak), reasons["activation_checkpointing"] = _checkpointing(inputs)
    compile_, reasons["compile"] = _compile(inputs)
    return FastPath(inputs.device, attention, tf32, padding_free, checkpointing, every_n, compile_, reasons, peak)


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


def _checkpointing(inp: FastPathInputs) -> tuple[tuple[bool, int, int | None], str]:
    layers = inp.checkpointing_layers.strip().lower()
    budget = inp.budget
    if not inp.activation_checkpointing:
        peak = budget.peak_bytes(0) if budget else None
        return (False, 1, peak), "off by train.activation_checkpointing"
    if layers == "all":
        peak = budget.peak_bytes(1) if budget else None
        return (True, 1, peak), "every layer, by train.activation_checkpointing_layers"
    if match := _EVERY_N.fullmatch(layers):
        n = int(match.group(1))
        if n < 1:
            raise ConfigError("train.activation_checkpointing_layers every_N needs N >= 1")
        return (True, n, budget.peak_bytes(n) if budget else None), f"every {n} layer(s), by the config"
    if layers != "auto":
        raise ConfigError(
            f"train.activation_checkpointing_layers {inp.checkpointing_layers!r} is not auto, all or every_N"
        )
    if budget is None:
        return (True, 1, None), f"every layer (the seed's): {inp.budget_note or 'no memory plan'}"
    limit = int(MEMORY_TARGET * budget.gpu_bytes)

    def gib(n: int) -> str:
        return f"{n / 2**30:.1f} GiB"

    if budget.none_bytes <= limit:
        return (False, 1, budget.none_bytes), f"off: planned peak {gib(budget.none_bytes)} fits {gib(limit)}"
    for n in range(budget.layers, 1, -1):  # fewest recomputed layers first
        peak = budget.peak_bytes(n)
        if peak <= limit:
            recomputed = math.ceil(budget.layers / n)
            return (True, n, peak), (
                f"1 layer in {n} recomputes ({recomputed}/{budget.layers}): planned peak {gib(peak)}"
                f" fits {gib(limit)}; none would need {gib(budget.none_bytes)}"
            )
    fits = "fits" if budget.full_bytes <= limit else "does NOT fit (see `plan`)"
    return (True, 1, budget.full_bytes), f"every layer: planned peak {gib(budget.full_bytes)} {fits} {gib(limit)}"


def _compile(inp: FastPathInputs) -> tuple[bool, str]:
    if not inp.compile:
        return False, "off by default (model.compile): minutes of compilation, recompiles on new shapes"
    if inp.device.kind != "cuda":
        return False, "model.compile is set but there is no CUDA device: not compiled"
    return True, "set by model.compile"


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
        memory_bytes=int(props.total_memory),
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
    planner: Callable[..., dict[str, Any]] | None = None,
) -> tuple[CheckpointBudget | None, str]:
    """The planner's peak with all and with no layers recomputed, or (None, why)."""
    if device.kind != "cuda" or not device.memory_bytes:
        return None, "no GPU to plan for"
    if model_config is None:
        return None, "model config unknown to the planner"
    if planner is None:
        from job.plan.memory import make_plan as planner
    common = {
        "dtype": dtype,
        "optimizer": optimizer,
        "per_device_batch_size": batch,
        "seq_length": seq,
        "gpu_memory_bytes": device.memory_bytes,
        "gpu_name": device.name,
    }
    try:
        full = planner(model_config, activation_checkpointing=True, **common)
        none = planner(model_config, activation_checkpointing=False, **common)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        return None, f"the planner could not size this run ({exc})"
    budget = CheckpointBudget(
        layers=int(full["model"]["layers"]),
        gpu_bytes=device.memory_bytes,
        full_bytes=int(full["memory_bytes"]["total"]),
        none_bytes=int(none["memory_bytes"]["total"]),
    )
    return budget, ""


def _model_config(location: str | None, revision: str | None, trust_remote_code: bool = False) -> Any:
    """The transformers config at `location` (a directory or a Hub id), or None when it cannot be read here."""
    if not location:
        return None
    path = Path(location)
    try:
        from transformers import AutoConfig

        if path.is_dir() and (path / "config.json").is_file():
            return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        from job.model.load import HUB_ID  # imported here: the GPU bench loads this module without structlog

        if HUB_ID.match(location) and not path.exists():
            token = os.environ.get("HF_TOKEN") or None
            return AutoConfig.from_pretrained(
                location, revision=revision, token=token, trust_remote_code=trust_remote_code
            )
    except (OSError, ValueError):
        return None
    return None


def choose_fast_path(config: Any, dev: DeviceInfo, model_location: str | None = None) -> FastPath:
    """Decide the fast path for a JobConfig on `dev` and log it.

    `model_location` is where the model was resolved to (a directory or a Hub id): the planner
    reads its config.json to size activation checkpointing; without it, `model.source` is tried.
    """
    train, model, data = config.train, config.model, config.data
    packages = installed_packages()
    refuse_downloaded_kernels(train.extra, packages)
    layers = getattr(train, "activation_checkpointing_layers", "auto")
    budget, note = None, "no GPU to plan for"
    if dev.kind == "cuda" and train.activation_checkpointing and str(layers).lower() == "auto":
        budget, note = checkpoint_budget(
            _model_config(model_location or model.source, model.revision, model.trust_remote_code),
            dev,
            dtype=model.dtype,
            optimizer=train.optim,
            batch=train.per_device_train_batch_size,
            seq=data.max_length,
        )
    fast = decide(
        FastPathInputs(
            device=dev,
            packages=packages,
            dtype=model.dtype,
            attn_implementation=model.attn_implementation,
            tf32=getattr(model, "tf32", None),
            compile=getattr(model, "compile", False),
            packing=bool(getattr(data, "packing", False)),
            activation_checkpointing=train.activation_checkpointing,
            checkpointing_layers=str(layers),
            budget=budget,
            budget_note=note,
        )
    )
    log_decision(fast)
    return fast


def log_decision(fast: FastPath) -> None:
    """Log the decision as one structured line (`fast_path`), a reason per switch."""
    from job.logs import get_logger  # structlog: imported late so the GPU bench needs only torch + transformers

    get_logger(__name__).info("fast_path", **fast.log_fields())


# ---------------------------------------------------------------- applying it outside Trainer (the GPU bench)


def enable_tf32(enabled: bool) -> None:
    """What Trainer's `tf32` does: TF32 for fp32 matmuls and cuDNN convolutions."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def apply_activation_checkpointing(model: Any, fast: FastPath) -> None:
    """Checkpoint `model`'s decoder layers as decided, as Trainer does with `activation_checkpointing_kwargs`.

    Sets each GradientCheckpointingLayer's flag directly, which also works on transformers releases
    older than 5.24's `every_n_layers`.
    """
    if not fast.activation_checkpointing:
        if getattr(model, "is_gradient_checkpointing", False):
            disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
            disable()
        return
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index % fast.checkpoint_every_n_layers == 0


def recomputed_fraction(fast: FastPath, layers: int) -> float:
    """Share of decoder layers whose forward runs twice (for hardware FLOP utilisation)."""
    if not fast.activation_checkpointing:
        return 0.0
    return math.ceil(layers / fast.checkpoint_every_n_layers) / layers
