"""Regional compilation: each decoder layer compiled, the compiler's cache kept with the run.

`compile_layers` gives every decoder layer (transformers' `GradientCheckpointingLayer`) a compiled call.
The layers share one code object, so the 32 identical layers of a 7B model compile once per variant (with
and without activation checkpointing; a static, then one dynamic sequence length). `CompileCache` loads
the compiler's artifacts (`torch.compiler` mega-cache) from the run's store before the first forward and
saves them after the first optimizer step, under a key that hashes everything that changes the generated
code; `CompileCallback` logs the compile time, cache hits and recompiles. Nothing here fails the run, except
a compile the user forced (`model.compile: true`) that cannot compile. Why and what: docs/compile.md.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from job.errors import TrainingFailed
from job.logs import get_logger
from job.storage import Store
from job.train.fastpath import installed_packages

log = get_logger(__name__)

CACHE_PREFIX = "cache/compile"
MAX_CACHE_BYTES = 2 * 2**30
"""A cache object larger than this is not loaded (a 7B run's is tens of MB)."""
RECOMPILE_LIMIT = 8
"""Compiled variants per layer before dynamo runs the rest eagerly. A run needs at most 6: checkpointed or
not, static then dynamic length, and the evaluation's no-grad forward (static, dynamic)."""
MAX_SAVES = 6
"""Cache saves per start: after the first step, then whenever later steps compiled new variants."""
COMPILE_SCHEME = 1
"""Bumped when how this module compiles changes (part of the cache key)."""
VERSIONED_PACKAGES = ("torch", "transformers", "triton", "liger-kernel", "flash-attn", "flash-attn-3")


# ---------------------------------------------------------------- compiling the layers


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The model's repeated decoder blocks (what activation checkpointing wraps)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]


@dataclass
class CompiledLayers:
    """The compiled decoder layers of one model, and what happens when their compilation fails."""

    layers: list[torch.nn.Module]
    forced: bool
    """model.compile: true. A failed compile then stops the run (exit 70) instead of falling back to eager."""
    backend: str = "inductor"
    dynamic: bool | None = None
    failure: str | None = None
    """Why compilation failed and the layers run eagerly (auto mode only)."""
    errors: tuple[type[BaseException], ...] = ()
    """Compile errors (dynamo's; inductor's derive from them), set by `compile_layers`."""

    def call(self, layer: torch.nn.Module, compiled: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One layer's forward: compiled; on a compile error, eager (auto) or TrainingFailed (forced)."""
        if self.failure is None:
            try:
                return compiled(*args, **kwargs)
            except self.errors as exc:
                self._failed(exc)
        # A decoder layer in training has no state to undo: running it again eagerly is the same forward.
        return layer._call_impl(*args, **kwargs)

    def _failed(self, exc: BaseException) -> None:
        reason = _first_line(exc)
        if self.forced:
            raise TrainingFailed(
                f"model.compile is true but torch.compile ({self.backend}) failed on a decoder layer: {reason}",
                hint="set model.compile: false, or leave it empty (a failed compile then falls back to eager)",
            ) from exc
        self.failure = reason
        self.uncompile()
        log.warning("compile_failed_running_eager", backend=self.backend, error=reason, layers=len(self.layers))

    def uncompile(self) -> None:
        for layer in self.layers:
            layer._compiled_call_impl = None


def compile_layers(
    model: Any, *, forced: bool, backend: str = "inductor", dynamic: bool | None = None
) -> CompiledLayers | None:
    """Compile each decoder layer of `model` in place (lazily: the work happens at the first forward).

    Activation checkpointing is the layer's own (transformers wraps `forward`), so a checkpointed layer
    compiles with its recomputation inside the graph, as torchtitan does. `dynamic=None`: the first
    length compiles static, a second one recompiles once with a dynamic sequence dimension.
    """
    from torch._dynamo.exc import TorchDynamoException  # dynamo takes seconds to import: only when compiling

    layers = decoder_layers(model)
    if not layers:
        log.warning("compile_skipped", reason=f"{type(model).__name__} has no GradientCheckpointingLayer blocks")
        return None
    torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    # Compile the backward at the first forward too: its errors then surface where eager can take over.
    if hasattr(torch._functorch.config, "force_non_lazy_backward_lowering"):
        torch._functorch.config.force_non_lazy_backward_lowering = True
    compiled = CompiledLayers(layers, forced, backend, dynamic, errors=(TorchDynamoException,))
    for layer in layers:
        # What `Module.compile()` does, with the error handling above around it.
        inner = torch.compile(layer._call_impl, backend=backend, dynamic=dynamic)
        layer._compiled_call_impl = functools.partial(compiled.call, layer, inner)
    log.info("compile_layers", layers=len(layers), block=type(layers[0]).__name__, backend=backend, forced=forced)
    return compiled


def _first_line(exc: BaseException) -> str:
    """The error in one short line (dynamo's `backend=... raised:` is followed by the backend's own error)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines[0] if lines else "")
    return (text or type(exc).__name__)[:300]


# ---------------------------------------------------------------- what the compiler did


@dataclass(frozen=True)
class CompileStats:
    """A snapshot of torch's process-wide compile counters."""

    graphs: int = 0
    seconds: float = 0.0
    """Dynamo's compile time (tracing, AOTAutograd, inductor; the backward too, see `compile_layers`)."""
    cache_hits: int = 0
    cache_misses: int = 0
    graph_breaks: int = 0

    @classmethod
    def now(cls) -> CompileStats:
        from torch._dynamo.utils import compilation_time_metrics, counters

        return cls(
            graphs=int(counters["stats"]["unique_graphs"]),
            seconds=float(sum(compilation_time_metrics.get("_compile.compile_inner", []))),
            cache_hits=int(counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]),
            cache_misses=int(
                counters["inductor"]["fxgraph_cache_miss"] + counters["aot_autograd"]["autograd_cache_miss"]
            ),
            graph_breaks=int(sum(counters["graph_break"].values())),
        )

    def since(self, before: CompileStats) -> CompileStats:
        return CompileStats(
            graphs=self.graphs - before.graphs,
            seconds=round(self.seconds - before.seconds, 3),
            cache_hits=self.cache_hits - before.cache_hits,
            cache_misses=self.cache_misses - before.cache_misses,
            graph_breaks=self.graph_breaks - before.graph_breaks,
        )


# ---------------------------------------------------------------- the cache key


def package_versions(names: tuple[str, ...] = VERSIONED_PACKAGES) -> dict[str, str]:
    return installed_packages(names)


def key_inputs(
    config: Any, fast: Any, model_config: Any, *, backend: str = "inductor", versions: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Everything that changes the code the compiler generates for this run, as plain data.

    The run's name, paths, learning rate or step counts are left out: they change no kernel. `versions`:
    the installed packages' (torch, transformers, triton...), read from their metadata when not given.
    """
    decision = asdict(fast) if hasattr(fast, "__dataclass_fields__") else dict(vars(fast))
    decision.pop("reasons", None)
    for unused in ("planned_peak_bytes", "grad_accum"):  # memory plan, accumulation: no kernel changes
        decision.pop(unused, None)
    device = dict(decision.pop("device", {}) or {})
    device.pop("memory_bytes", None)  # same card, same kernels
    architecture = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    architecture = {k: v for k, v in architecture.items() if not k.startswith("_")}  # _name_or_path: a local path
    return _plain(
        {
            "scheme": COMPILE_SCHEME,
            "backend": backend,
            "python": platform.python_version(),
            "packages": dict(package_versions() if versions is None else versions),
            "device": device,
            "fast_path": decision,
            "model": architecture,
            "dtype": config.model.dtype,
            "optimizer": config.train.optim,
            "batch": config.train.per_device_train_batch_size,
            "max_length": config.data.max_length,
            "packing": bool(config.data.packing),
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "fsdp": str(config.train.fsdp or ""),
        }
    )


def _plain(value: Any) -> Any:
    """JSON-ready and order-stable: sets (e.g. the kept layers) become sorted lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def cache_key(inputs: Mapping[str, Any]) -> str:
    text = json.dumps(inputs, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


# ---------------------------------------------------------------- the cache in the run's store


def use_scratch_for_inductor(scratch: Path) -> str:
    """TorchInductor's local cache under scratch, unless the environment chose (the image sets it)."""
    return os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str((scratch / "cache" / "torchinductor").resolve()))


@dataclass
class CompileCache:
    """The compiler's artifacts for one cache key, at `cache/compile/<key>.bin` in the run's store.

    Every failure is one warning: a cache is an optimisation, never a reason to stop a run. The object holds
    generated code that runs in this process; it comes from the run's own store, which this job wrote.
    """

    store: Store
    key: str
    fence: Callable[[], None] | None = None
    """The run's lease check, called before every write."""
    writer: bool = True
    """Only rank 0 writes; every rank restores."""
    max_bytes: int = MAX_CACHE_BYTES
    inputs: Mapping[str, Any] = field(default_factory=dict)
    restored: bool = False
    saved_bytes: int = 0
    saves: int = 0

    @property
    def object_key(self) -> str:
        return f"{CACHE_PREFIX}/{self.key}.bin"

    def restore(self) -> bool:
        """Load the artifacts into torch's local caches (before the first forward); True if loaded."""
        where = f"{self.store.uri}/{self.object_key}"
        try:
            info = self.store.stat(self.object_key)
            if info is None:
                log.info("compile_cache_absent", key=self.key, uri=where)
                return False
            if info.size > self.max_bytes:
                log.warning("compile_cache_refused", key=self.key, uri=where, bytes=info.size, limit=self.max_bytes)
                return False
            started = time.monotonic()
            data = self.store.read_bytes(self.object_key)
            if len(data) > self.max_bytes:
                log.warning("compile_cache_refused", key=self.key, uri=where, bytes=len(data), limit=self.max_bytes)
                return False
            loaded = torch.compiler.load_cache_artifacts(data)
        except Exception as exc:  # unreadable, corrupt, another torch's format: compile from scratch
            log.warning("compile_cache_unreadable", key=self.key, uri=where, error=_first_line(exc))
            return False
        if loaded is None:
            log.warning("compile_cache_unreadable", key=self.key, uri=where, error="no artifacts in the object")
            return False
        self.restored = True
        log.info(
            "compile_cache_restored",
            key=self.key,
            uri=where,
            bytes=len(data),
            artifacts=_artifact_counts(loaded),
            seconds=round(time.monotonic() - started, 3),
        )
        return True

    def save(self) -> bool:
        """Write every artifact this process compiled or loaded so far (torch keeps them cumulatively)."""
        if not self.writer or self.saves >= MAX_SAVES:
            return False
        where = f"{self.store.uri}/{self.object_key}"
        started = time.monotonic()
        try:
            result = torch.compiler.save_cache_artifacts()
            if result is None:
                log.info("compile_cache_empty", key=self.key)
                return False
            data, info = result
            if len(data) > self.max_bytes:
                log.warning("compile_cache_not_saved", key=self.key, bytes=len(data), limit=self.max_bytes)
                return False
            if len(data) == self.saved_bytes:
                return False  # nothing new since the last save
            if self.fence is not None:
                self.fence()
            self.store.write_bytes(self.object_key, data)
            if self.saves == 0 and self.inputs:  # what the key stands for, for a reader
                self.store.write_bytes(f"{CACHE_PREFIX}/{self.key}.json", json.dumps(self.inputs, indent=1).encode())
        except Exception as exc:  # a lost lease too (LeaseLost): the checkpoint callback stops the run for that
            log.warning("compile_cache_not_saved", key=self.key, uri=where, error=_first_line(exc))
            return False
        self.saves += 1
        self.saved_bytes = len(data)
        log.info(
            "compile_cache_saved",
            key=self.key,
            uri=where,
            bytes=len(data),
            artifacts=_artifact_counts(info),
            seconds=round(time.monotonic() - started, 3),
        )
        return True


def _artifact_counts(info: Any) -> dict[str, int]:
    artifacts = getattr(info, "artifacts", {}) or {}
    return {kind: len(items) for kind, items in artifacts.items() if items}


# ---------------------------------------------------------------- the trainer's view


class CompileCallback(TrainerCallback):
    """Logs `compile_finished` after this start's first optimizer step (compile seconds, graphs, cache hits),
    `compile_recompiled` when a later step compiled new variants, and saves the cache after each of those."""

    def __init__(self, compiled: CompiledLayers | None, cache: CompileCache | None) -> None:
        self.compiled = compiled
        self.cache = cache
        self.baseline = CompileStats()
        self.last = CompileStats()
        self.step_started = 0.0
        self.first_step_seconds: float | None = None
        self.overhead_logged = False
        self.steps_seen = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.baseline = self.last = CompileStats.now()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step_started = time.monotonic()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        seconds = time.monotonic() - self.step_started
        self.steps_seen += 1
        now = CompileStats.now()
        if self.steps_seen == 1:
            self.first_step_seconds = seconds
            self._finished(state.global_step, seconds, now)
        elif now.graphs == self.last.graphs and not self.overhead_logged and self.first_step_seconds is not None:
            self.overhead_logged = True  # the first step that compiled nothing: what a step costs without
            log.info(
                "compile_step_overhead",
                step=state.global_step,
                first_step_seconds=round(self.first_step_seconds, 3),
                step_seconds=round(seconds, 3),
                extra_seconds=round(self.first_step_seconds - seconds, 3),
            )
        if now.graphs > self.last.graphs and self.steps_seen > 1:
            new = now.since(self.last)
            log.info(
                "compile_recompiled",
                step=state.global_step,
                new_graphs=new.graphs,
                graphs=now.since(self.baseline).graphs,
                compile_seconds=new.seconds,
                cache_hits=new.cache_hits,
                step_seconds=round(seconds, 3),
            )
            self._save()
        self.last = now

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        now = CompileStats.now()
        if now.graphs > self.last.graphs:  # the no-grad forward compiled its own variant
            self._save()
        self.last = now

    def _finished(self, step: int, seconds: float, now: CompileStats) -> None:
        done = now.since(self.baseline)
        failure = self.compiled.failure if self.compiled is not None else None
        log.info(
            "compile_finished",
            step=step,
            compile_seconds=done.seconds,
            first_step_seconds=round(seconds, 3),
            graphs=done.graphs,
            graph_breaks=done.graph_breaks,
            cache_restored=bool(self.cache and self.cache.restored),
            cache_hits=done.cache_hits,
            cache_misses=done.cache_misses,
            eager_fallback=failure,
        )
        if failure is None:
            self._save()

    def _save(self) -> None:
        if self.cache is not None and (self.compiled is None or self.compiled.failure is None):
            self.cache.save()


# ---------------------------------------------------------------- the run's entry point


def speed_up_model(
    model: Any,
    config: Any,
    fast: Any,
    *,
    store: Store | None,
    scratch: Path,
    fence: Callable[[], None] | None,
    writer: bool,
    backend: str = "inductor",
) -> CompileCallback | None:
    """Apply the fast path's model-level switches to the loaded model, before the trainer exists.

    Compile (`fast.compile`): restore the run's compile cache, compile each decoder layer, and return the
    callback that logs the compile and saves the cache. Liger (`fast.liger_kernels`, only with compile off):
    patch the layers with its kernels. None when nothing compiled.
    """
    if getattr(fast, "liger_kernels", False):
        from job.train.liger import apply_liger_kernels

        apply_liger_kernels(model)
    if not fast.compile:
        return None
    use_scratch_for_inductor(scratch)
    cache = None
    if store is not None:
        inputs = key_inputs(config, fast, model.config, backend=backend)
        cache = CompileCache(store, cache_key(inputs), fence=fence, writer=writer, inputs=inputs)
        cache.restore()
    compiled = compile_layers(model, forced=config.model.compile is True, backend=backend)
    if compiled is None:
        return None
    return CompileCallback(compiled, cache)
