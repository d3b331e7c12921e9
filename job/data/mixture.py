"""Mixtures of sources: which records each source contributes, and how the tokens split between them.

Pure functions on counts and index arrays, no I/O. For one source the order is: `max_examples` (a seeded
sample of its records, kept in file order), then the eval split (the caller's), then `weight` on the
training part: the integer part repeats every example, the fractional part adds a seeded sample of them.
Every draw is seeded by the run's seed mixed with the source's path, so a source keeps its sample when
other sources are added, removed or reordered, and two sources never share a draw.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from job.config.schema import SourceConfig

__all__ = [
    "SourceStats",
    "cap_indices",
    "planned_examples",
    "select",
    "summarize",
    "token_shares",
    "weight_indices",
]

CAP_STREAM, WEIGHT_STREAM = 0, 1


def _rng(source: SourceConfig, seed: int, stream: int) -> np.random.Generator:
    # A stable 64-bit number from the path (Python's hash() is salted per process).
    key = int.from_bytes(hashlib.sha256(source.path.encode()).digest()[:8], "little")
    return np.random.default_rng(np.random.SeedSequence([seed, key, stream]))


def cap_indices(count: int, source: SourceConfig, seed: int) -> np.ndarray:
    """The records `max_examples` keeps, in file order: all of them when there is no cap or it is not reached."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if source.max_examples is None or count <= source.max_examples:
        return np.arange(count, dtype=np.int64)
    chosen = _rng(source, seed, CAP_STREAM).choice(count, size=source.max_examples, replace=False)
    return np.sort(chosen).astype(np.int64)


def weight_indices(indices: np.ndarray, source: SourceConfig, seed: int) -> np.ndarray:
    """`indices` taken `weight` times: whole passes in order, then a seeded sample (in order) for the fraction."""
    indices = np.asarray(indices, dtype=np.int64)
    whole, extra = _split_weight(source.weight, len(indices))
    parts = [np.tile(indices, whole)]
    if extra:
        chosen = _rng(source, seed, WEIGHT_STREAM).choice(len(indices), size=extra, replace=False)
        parts.append(indices[np.sort(chosen)])
    return np.concatenate(parts)


def select(count: int, source: SourceConfig, seed: int) -> np.ndarray:
    """Record indices a source contributes when nothing is held out: cap, then weight."""
    return weight_indices(cap_indices(count, source, seed), source, seed)


def planned_examples(count: int, source: SourceConfig) -> int:
    """`len(select(count, source, seed))` without drawing anything."""
    kept = count if source.max_examples is None else min(count, source.max_examples)
    whole, extra = _split_weight(source.weight, kept)
    return whole * kept + extra


def _split_weight(weight: float, count: int) -> tuple[int, int]:
    """Whole repeats and the extra examples of the fractional part, rounded half up (2.5 x 5 -> 12 + 1)."""
    if not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"weight must be a positive number, got {weight}")
    whole = math.floor(weight)
    extra = math.floor((weight - whole) * count + 0.5)
    return whole, min(extra, count)


def token_shares(tokens_by_source: Mapping[str, int]) -> dict[str, float]:
    """Each source's fraction of all tokens; they sum to 1 (all 0.0 when there are no tokens at all)."""
    total = sum(tokens_by_source.values())
    if total <= 0:
        return dict.fromkeys(tokens_by_source, 0.0)
    return {name: tokens / total for name, tokens in tokens_by_source.items()}


@dataclass(frozen=True)
class SourceStats:
    """What the caller measured for one source; `summarize` turns a list of them into the reported rows."""

    name: str
    format: str
    """The format read (the detected one for `auto`)."""
    records: int
    """Valid records read from the source."""
    examples: int
    """Training examples after the cap and the weight (repeats counted)."""
    weight: float
    max_examples: int | None
    tokens: int
    """Tokens training sees from this source (repeats counted), so shares describe the real mixture."""
    revision: str | None = None
    """The Hub commit, for `hf://` sources."""


def summarize(stats: Sequence[SourceStats]) -> list[dict]:
    """Per-source rows for `validate --json` and the model card, in `data.train` order, with token shares."""
    names = [s.name for s in stats]
    if len(set(names)) != len(names):
        raise ValueError(f"source names repeat: {names}")
    shares = token_shares({s.name: s.tokens for s in stats})
    return [
        {
            "name": s.name,
            "format": s.format,
            "records": s.records,
            "examples": s.examples,
            "weight": s.weight,
            "max_examples": s.max_examples,
            "tokens": s.tokens,
            "token_share": round(shares[s.name], 6),
            "revision": s.revision,
        }
        for s in stats
    ]
