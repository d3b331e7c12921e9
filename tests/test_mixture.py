"""job.data.mixture: exact example counts for weights and caps, seeded draws, token shares."""

from __future__ import annotations

import numpy as np
import pytest

from job.config.schema import SourceConfig
from job.data.mixture import (
    SourceStats,
    cap_indices,
    planned_examples,
    select,
    summarize,
    token_shares,
    weight_indices,
)


def source(weight: float = 1.0, cap: int | None = None, path: str = "a.jsonl") -> SourceConfig:
    return SourceConfig(path, "auto", weight, cap)


@pytest.mark.parametrize(
    ("weight", "expected"),
    [(1.0, 10), (2.0, 20), (0.5, 5), (2.5, 25), (0.25, 3), (1.04, 10), (3.0, 30)],  # 0.25 x 10 = 2.5 -> 3
)
def test_weight_gives_exact_counts(weight, expected) -> None:
    picked = select(10, source(weight), seed=0)
    assert len(picked) == expected == planned_examples(10, source(weight))
    counts = np.bincount(picked, minlength=10)
    whole = int(weight)
    # Every record at least `whole` times, none more than once beyond that.
    assert counts.min() >= whole and counts.max() <= whole + 1
    assert counts.sum() - whole * 10 == expected - whole * 10


def test_whole_passes_keep_file_order_and_fraction_is_sorted() -> None:
    picked = select(6, source(2.5), seed=3)
    assert picked[:12].tolist() == [0, 1, 2, 3, 4, 5] * 2
    tail = picked[12:]
    assert len(tail) == 3 and tail.tolist() == sorted(set(tail.tolist()))


def test_cap_takes_a_sample_in_file_order_then_weight_applies() -> None:
    capped = cap_indices(100, source(cap=7), seed=1)
    assert len(capped) == 7 and capped.tolist() == sorted(set(capped.tolist()))
    assert capped.tolist() != list(range(7))  # a sample, not the head of the file
    both = select(100, source(weight=2.0, cap=7), seed=1)
    assert both.tolist() == capped.tolist() * 2
    assert planned_examples(100, source(weight=0.5, cap=7)) == len(select(100, source(0.5, cap=7), seed=1)) == 4


def test_cap_above_the_count_keeps_everything() -> None:
    assert cap_indices(5, source(cap=10), seed=0).tolist() == [0, 1, 2, 3, 4]
    assert select(0, source(2.5, cap=3), seed=0).tolist() == []


def test_same_seed_same_draw_other_seed_other_draw() -> None:
    one = select(1000, source(0.5, cap=400), seed=42)
    assert np.array_equal(one, select(1000, source(0.5, cap=400), seed=42))
    assert not np.array_equal(one, select(1000, source(0.5, cap=400), seed=43))


def test_each_source_draws_its_own_sample() -> None:
    first = select(1000, source(0.5, path="a.jsonl"), seed=42)
    second = select(1000, source(0.5, path="b.jsonl"), seed=42)
    assert len(first) == len(second) == 500
    assert not np.array_equal(first, second)


def test_weight_applies_to_given_indices_such_as_the_training_part() -> None:
    train_part = np.array([3, 8, 9, 15])
    out = weight_indices(train_part, source(1.5), seed=0)
    assert out[:4].tolist() == [3, 8, 9, 15]
    assert len(out) == 6 and set(out[4:].tolist()) <= {3, 8, 9, 15}


def test_bad_weight_is_refused() -> None:
    with pytest.raises(ValueError, match="weight"):
        select(3, source(0.0), seed=0)


def test_token_shares_sum_to_one() -> None:
    shares = token_shares({"a": 300, "b": 100, "hf://datasets/o/n": 600})
    assert shares == {"a": 0.3, "b": 0.1, "hf://datasets/o/n": 0.6}
    assert sum(token_shares({"x": 1, "y": 2, "z": 4}).values()) == pytest.approx(1.0)
    assert token_shares({"a": 0, "b": 0}) == {"a": 0.0, "b": 0.0}


def test_summary_rows_carry_every_field_in_order() -> None:
    rows = summarize(
        [
            SourceStats("chat.jsonl", "messages", 100, 200, 2.0, None, 30_000),
            SourceStats("hf://datasets/o/n@v1", "alpaca", 5000, 50, 1.0, 50, 10_000, revision="a" * 40),
        ]
    )
    assert [row["name"] for row in rows] == ["chat.jsonl", "hf://datasets/o/n@v1"]
    assert set(rows[0]) == {
        "name",
        "format",
        "records",
        "examples",
        "weight",
        "max_examples",
        "tokens",
        "token_share",
        "revision",
    }
    assert (rows[0]["token_share"], rows[1]["token_share"]) == (0.75, 0.25)
    assert (rows[1]["examples"], rows[1]["max_examples"], rows[1]["revision"]) == (50, 50, "a" * 40)
    with pytest.raises(ValueError, match="repeat"):
        summarize([rows_stats := SourceStats("x", "text", 1, 1, 1.0, None, 1), rows_stats])
