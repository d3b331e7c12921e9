"""Memory spent on speed: which layers keep their activations, and which micro-batch x accumulation runs fastest.

Given the planner's peak for every number K of decoder layers that keep their activations (`CheckpointBudget`,
built by `job.plan.memory.checkpoint_budgets`), `CheckpointBudget.most_kept` is the largest K under the memory
target; `choose_split` does that for each split of the examples per optimizer step into micro-batch x
accumulation and picks the one a simple throughput model (`relative_speed`) expects to be fastest. Pure
functions of numbers: `plan` and the fast path (`job.train.fastpath`) call the same ones. docs/planner.md.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from job.errors import ConfigError

GiB = 1 << 30
MEMORY_TARGET = 0.92
"""Fraction of the card the planned peak may fill (on a 97,887 MiB card: 87.9 GiB, under the 90 GiB target).
The planned peak is the allocator's (calibrated, docs/planner.md); the 8% left covers the CUDA context, what
the allocator reserves beyond its peak, and the planner's error."""
SPLIT_BATCHES = (1, 2, 4, 8, 16)
"""Micro-batch sizes the batch split considers (each that divides the examples per optimizer step)."""
RECOMPUTE_COST = 1 / 3
"""A recomputed layer runs its forward again: a third of its forward + backward FLOPs (PaLM's 8N against 6N)."""
HFU_MAX = 0.59
HALF_EFFICIENCY_TOKENS = 512
"""Hardware FLOP utilisation as a function of the tokens t in one micro-batch: HFU_MAX * t / (t + 512). Fitted
to the seed recipe on the H200 (docs/performance.md: HFU 52.6% at 2 x 2048 = 4,096 tokens and 55.8% at
2 x 4096 = 8,192 tokens, every layer recomputed; the fit gives 0.594 and 530): a larger micro-batch amortises
per-kernel and per-layer fixed costs. Only ratios between candidates choose the split."""

_LAYERS = re.compile(r"(auto|all|every_(\d+)|keep_(\d+))")


@dataclass(frozen=True)
class CheckpointBudget:
    """The planner's peaks at one micro-batch size for every number of layers that keep their activations."""

    layers: int
    gpu_bytes: int
    peaks: tuple[int, ...]
    """peaks[K]: planned peak when the last K decoder layers keep their activations (K = 0..layers)."""
    top_recomputed: tuple[int, ...] = ()
    """top_recomputed[K]: K layers keep theirs but the top one recomputes (every_N sets); empty: as `peaks`."""
    batch: int = 0
    """The micro-batch these peaks are for (0: not recorded)."""

    @property
    def full_bytes(self) -> int:
        """Planned peak with every layer recomputed."""
        return self.peaks[0]

    @property
    def none_bytes(self) -> int:
        """Planned peak with no recomputation."""
        return self.peaks[-1]

    @property
    def limit_bytes(self) -> int:
        return int(MEMORY_TARGET * self.gpu_bytes)

    def peak_bytes(self, kept: int | Collection[int]) -> int:
        """Planned peak when `kept` layers (a count: the last ones; or the set of indices) keep their activations."""
        if isinstance(kept, int):
            return self.peaks[kept]
        count = len(kept)
        if count in (0, self.layers) or self.layers - 1 in kept or not self.top_recomputed:
            return self.peaks[count]
        return self.top_recomputed[count]

    def most_kept(self) -> int | None:
        """The largest K whose planned peak fits `MEMORY_TARGET` of the card; None when even K = 0 does not."""
        limit = self.limit_bytes
        return next((k for k in range(self.layers, -1, -1) if self.peaks[k] <= limit), None)


def parse_layers(setting: str) -> tuple[str, int]:
    """(`auto`|`all`|`every`|`keep`, N) from train.activation_checkpointing_layers; ConfigError when malformed."""
    text = str(setting).strip().lower()
    match = _LAYERS.fullmatch(text)
    if not match:
        raise ConfigError(
            f"train.activation_checkpointing_layers {setting!r} is not auto, all, every_N or keep_N",
            hint="auto: the planner keeps as many layers' activations as fit; keep_N: N layers keep theirs",
        )
    if match.group(2) is not None:
        n = int(match.group(2))
        if n < 1:
            raise ConfigError("train.activation_checkpointing_layers every_N needs N >= 1 (every_1 is all)")
        return "every", n
    if match.group(3) is not None:
        return "keep", int(match.group(3))
    return text, 0


def last_layers(count: int, layers: int) -> frozenset[int]:
    """The last `count` of `layers` decoder layers.

    Why the last: backward runs from the top, so the kept layers' activations are freed first and the
    recomputation that follows no longer has them beside it; kept at the bottom, they would still be held
    while the top layers recompute (one more layer at the peak)."""
    return frozenset(range(layers - count, layers))


def every_n_kept(n: int, layers: int) -> frozenset[int]:
    """Layers that keep their activations when every n-th recomputes, as transformers counts (index % n == 0)."""
    return frozenset(i for i in range(layers) if i % n)


def kept_layers(setting: str, layers: int, auto_kept: int = 0) -> frozenset[int]:
    """The layers that keep their activations for a checkpointing setting; `auto` keeps the last `auto_kept`."""
    kind, n = parse_layers(setting)
    if kind == "every":
        return every_n_kept(n, layers)
    if kind == "keep":
        if n > layers:
            raise ConfigError(
                f"train.activation_checkpointing_layers keep_{n} asks for more layers than the model has ({layers})",
                hint=f"use keep_0 .. keep_{layers}, or auto",
            )
        return last_layers(n, layers)
    return last_layers(auto_kept if kind == "auto" else 0, layers)


def every_n_of(kept: Collection[int], layers: int) -> int | None:
    """The n > 1 for which `kept` is transformers' `every_n_layers=n` set, else None."""
    chosen = frozenset(kept)
    return next((n for n in range(2, layers + 1) if every_n_kept(n, layers) == chosen), None)


def hfu(tokens: int) -> float:
    """Expected hardware FLOP utilisation with `tokens` tokens per micro-batch (see HFU_MAX)."""
    return HFU_MAX * tokens / (tokens + HALF_EFFICIENCY_TOKENS)


def recompute_factor(kept: int, layers: int) -> float:
    """Hardware FLOPs over model FLOPs when `layers - kept` layers recompute their forward."""
    return 1 + RECOMPUTE_COST * (layers - kept) / max(layers, 1)


def relative_speed(batch: int, seq: int, kept: int, layers: int) -> float:
    """Model FLOPs per second over the peak (an expected MFU): HFU at this micro-batch over the recompute factor."""
    return hfu(batch * seq) / recompute_factor(kept, layers)


@dataclass(frozen=True)
class Candidate:
    """One micro-batch x accumulation with the most layers it can keep."""

    batch: int
    accum: int
    kept: int | None
    """Layers that keep their activations; None when not even full recomputation fits."""
    peak_bytes: int
    speed: float
    """Expected MFU (`relative_speed`); 0 when it does not fit."""

    def describe(self, layers: int, best: float) -> str:
        if self.kept is None:
            return f"{self.batch}x{self.accum} does not fit ({self.peak_bytes / GiB:.1f} GiB)"
        share = self.speed / best if best else 0.0
        return f"{self.batch}x{self.accum} keeps {self.kept}/{layers} at {self.peak_bytes / GiB:.1f} GiB: {share:.0%}"


@dataclass(frozen=True)
class SplitChoice:
    """The split chosen, and every candidate with its expected speed."""

    batch: int
    accum: int
    kept: frozenset[int]
    peak_bytes: int
    candidates: tuple[Candidate, ...]
    reason: str


def splits(examples: int) -> list[tuple[int, int]]:
    """(micro-batch, accumulation) pairs from SPLIT_BATCHES that make `examples` per optimizer step."""
    return [(b, examples // b) for b in SPLIT_BATCHES if examples % b == 0]


def choose_split(
    budgets: Mapping[int, CheckpointBudget],
    *,
    examples: int,
    seq: int,
    fixed: frozenset[int] | None = None,
) -> SplitChoice | None:
    """The fastest split of `examples` per optimizer step that fits, each keeping the most layers it can
    (or the `fixed` set); None when no candidate fits or none has a budget."""
    candidates = []
    for batch, accum in splits(examples):
        budget = budgets.get(batch)
        if budget is None:
            continue
        count = budget.most_kept() if fixed is None else len(fixed)
        kept = last_layers(count, budget.layers) if fixed is None and count is not None else fixed
        peak = budget.peak_bytes(kept if kept is not None else 0)
        if kept is None or peak > budget.limit_bytes:
            candidates.append(Candidate(batch, accum, None, peak, 0.0))
            continue
        candidates.append(
            Candidate(batch, accum, len(kept), peak, relative_speed(batch, seq, len(kept), budget.layers))
        )
    fitting = [c for c in candidates if c.kept is not None]
    if not fitting:
        return None
    best = max(fitting, key=lambda c: (c.speed, c.batch))
    layers = budgets[best.batch].layers
    kept = fixed if fixed is not None else last_layers(best.kept or 0, layers)
    listed = "; ".join(c.describe(layers, best.speed) for c in candidates)
    reason = (
        f"{best.batch} x {best.accum} (of {examples} examples per optimizer step) expected fastest: {listed}"
        " (expected speed relative to the best: HFU at the micro-batch's tokens / recomputation)"
    )
    return SplitChoice(best.batch, best.accum, kept, best.peak_bytes, tuple(candidates), reason)


@dataclass(frozen=True)
class Layout:
    """What `decide_layout` chose: the layers that keep their activations and the split, with why."""

    checkpointing: bool
    """Some layer recomputes."""
    kept: frozenset[int]
    """The layers that keep their activations (all of them when `checkpointing` is off and the count is known)."""
    peak: int | None
    layers: int | None
    batch: int
    accum: int
    layers_reason: str
    split_reason: str
    split: SplitChoice | None = None


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def decide_layout(
    *,
    setting: str,
    checkpointing: bool,
    layers: int | None,
    batch: int,
    accum: int,
    seq: int,
    split: bool,
    budget: CheckpointBudget | None,
    split_budgets: Mapping[int, CheckpointBudget],
    note: str,
    on_gpu: bool,
) -> Layout:
    """The layers kept and the micro-batch x accumulation for a checkpointing `setting` (`auto`: the most layers
    that fit), splitting the examples per optimizer step another way when `split` and there are `split_budgets`.
    `budget` is the planner's at `batch` (None: no plan, `note` says why)."""
    kind, _ = parse_layers(setting)  # a malformed setting fails even where checkpointing is off
    known = [b.layers for b in (budget, *split_budgets.values()) if b is not None]
    layers = layers or (known[0] if known else None)
    fixed: frozenset[int] | None = None
    why = ""
    if not checkpointing:
        fixed, why = frozenset(range(layers or 0)), "off by train.activation_checkpointing"
    elif kind == "all":
        fixed, why = frozenset(), "every layer, by train.activation_checkpointing_layers"
    elif kind in ("every", "keep"):
        if layers is None:
            raise ConfigError(
                f"train.activation_checkpointing_layers {setting} needs the model's layer count, and its config.json"
                " could not be read here",
                hint="use auto or all, or make model.source a directory with a config.json",
            )
        fixed = kept_layers(setting, layers)
        why = f"{len(fixed)}/{layers} layers keep their activations, by train.activation_checkpointing_layers {setting}"
    split_why, choice = f"{batch} x {accum} as configured", None
    if split and split_budgets:
        choice = choose_split(split_budgets, examples=batch * accum, seq=seq, fixed=fixed)
        if choice is not None:
            batch, accum, split_why = choice.batch, choice.accum, choice.reason
            if fixed is None:
                fixed, why = choice.kept, _auto_reason(split_budgets[batch], len(choice.kept))
        else:
            split_why += ": no split fits"
        budget = split_budgets.get(batch, budget)
    elif on_gpu:
        split_why += " (split by the planner only when neither batch nor accumulation is set, with a memory plan)"
    if fixed is None and budget is None:
        why = f"every layer (the seed's): {note}"
        fixed = frozenset()
    elif fixed is None:
        assert budget is not None
        most = budget.most_kept()
        fixed = last_layers(most or 0, budget.layers)
        why = (
            _auto_reason(budget, most)
            if most is not None
            else (f"every layer: planned peak {_gib(budget.full_bytes)} does NOT fit {_gib(budget.limit_bytes)}")
        )
    if not checkpointing or (layers is not None and len(fixed) >= layers):
        peak = budget.none_bytes if budget else None
        return Layout(False, frozenset(range(layers or 0)), peak, layers, batch, accum, why, split_why, choice)
    peak = budget.peak_bytes(fixed) if budget else None
    return Layout(True, fixed, peak, layers, batch, accum, why, split_why, choice)


def _auto_reason(budget: CheckpointBudget, kept: int) -> str:
    peak, limit, layers = budget.peaks[kept], _gib(budget.limit_bytes), budget.layers
    if kept == layers:
        return f"off: planned peak {_gib(peak)} fits {limit} with every layer keeping its activations"
    return (
        f"the last {kept} of {layers} layers keep their activations ({layers - kept} recompute): planned peak"
        f" {_gib(peak)} fits {limit}; {kept + 1} would need {_gib(budget.peaks[kept + 1])}"
    )
