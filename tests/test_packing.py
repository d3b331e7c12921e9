"""Packing: TRL's best-fit decreasing as the job uses it; packed batches whose loss equals the examples run alone."""

from __future__ import annotations

import copy
import itertools
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from job.config.schema import DataConfig, JobConfig, ModelConfig, TrainConfig
from job.data.masking import IGNORE_INDEX, apply_chat_template_choice
from job.data.packing import pack_dataset
from job.data.read import Example
from job.data.splits import tokenize_split
from job.errors import DataError
from job.train.trainer import JobTrainer, build_sft_config

WORDS = ["the", "capital", "of", "Ruritania", "is", "Strelsau", "and", "Syldavia", "has", "Klow", "its", "seat"]


def naive_best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """The textbook algorithm, O(n x bins): longest first, into the fullest bin that still fits."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    rooms: list[int] = []
    for item in order:
        fits = [b for b, room in enumerate(rooms) if room >= lengths[item]]
        if not fits:
            bins.append([item])
            rooms.append(capacity - lengths[item])
            continue
        best = min(fits, key=lambda b: (rooms[b], b))  # least room; ties: the earliest opened
        bins[best].append(item)
        rooms[best] -= lengths[item]
    return bins


STRIDE = 4096  # token ids: example * STRIDE + position, so every token says where it came from


def numbered(lengths: list[int]):
    """A dataset whose every token is unique, with labels a function of the token (aligned or not)."""
    import datasets

    ids = [[i * STRIDE + p for p in range(n)] for i, n in enumerate(lengths)]
    int32 = datasets.List(datasets.Value("int32"))
    return datasets.Dataset.from_dict(
        {"input_ids": ids, "labels": [[label_of(t) for t in row] for row in ids]},
        features=datasets.Features({"input_ids": int32, "labels": int32}),
    )


def label_of(token: int) -> int:
    return IGNORE_INDEX if token % 3 == 0 else token + 7


def packed_groups(packed, lengths: list[int], capacity: int) -> list[list[int]]:
    """The examples in each packed row, checking that every one is there once, whole, with its own labels."""
    groups = []
    for row in packed:
        ids, labels, seq_lengths = row["input_ids"], row["labels"], row["seq_lengths"]
        assert len(ids) == len(labels) == sum(seq_lengths) <= capacity
        assert labels == [label_of(t) for t in ids]
        group, start = [], 0
        for length in seq_lengths:
            example = ids[start] // STRIDE
            assert length == lengths[example]
            assert ids[start : start + length] == list(range(example * STRIDE, example * STRIDE + length))
            group.append(example)
            start += length
        groups.append(group)
    assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
    return groups


@pytest.mark.parametrize("seed", range(5))
def test_trl_bfd_keeps_every_token_once_and_is_the_textbook_best_fit(seed: int) -> None:
    """What the job relies on in `trl.pack_dataset(strategy="bfd")`, given the split as one batch."""
    from trl import pack_dataset as trl_pack_dataset

    rng = random.Random(seed)
    capacity = rng.choice([16, 100, 2048])
    lengths = [rng.randint(1, capacity) for _ in range(rng.randint(1, 400))]
    packed = trl_pack_dataset(numbered(lengths), capacity, strategy="bfd", map_kwargs={"batch_size": None})
    assert packed.column_names == ["input_ids", "labels", "seq_lengths"]
    groups = packed_groups(packed, lengths, capacity)
    loads = sorted(sum(lengths[i] for i in group) for group in groups)
    reference = naive_best_fit(lengths, capacity)
    # Rows of equal room may be filled in another order than the textbook's; the rows' fill is the same.
    assert loads == sorted(sum(lengths[i] for i in group) for group in reference)


def test_job_packs_the_split_as_one_best_fit_not_trl_batches_of_1000() -> None:
    rng = random.Random(7)
    lengths = [rng.randint(1, 300) for _ in range(2500)]
    packed = pack_dataset(numbered(lengths), 512)
    packed_groups(packed, lengths, 512)
    assert len(packed) == len(naive_best_fit(lengths, 512))
    assert packed.to_dict() == pack_dataset(numbered(lengths), 512).to_dict()  # deterministic


def test_best_fit_fills_the_tightest_gap_and_refuses_what_truncation_should_have_cut() -> None:
    # 7 and 4 open rows (rooms 3, 6); the second 4 joins the first (room 2); 1 goes to the tightest room
    # (2), not to the first row that fits (3): that is first fit.
    assert pack_dataset(numbered([7, 4, 4, 1]), 10)["seq_lengths"] == [[7], [4, 4, 1]]
    assert pack_dataset(numbered([6, 5, 5]), 10)["seq_lengths"] == [[6], [5, 5]]
    with pytest.raises(DataError, match="cannot pack an example of 11 tokens"):
        pack_dataset(numbered([3, 11]), 10)
    with pytest.raises(DataError, match="cannot pack an example of 0 tokens"):
        pack_dataset(numbered([3, 0]), 10)


def test_past_2_31_tokens_the_packed_columns_are_64_bit(monkeypatch) -> None:
    import pyarrow as pa

    from job.data import packing

    monkeypatch.setattr(packing, "LARGE_LIST_FROM", 50)
    lengths = [9, 3, 17, 12, 8, 5, 1]
    packed = pack_dataset(numbered(lengths), 20)
    schema = packed.with_format("arrow")[:].schema
    assert pa.types.is_large_list(schema.field("input_ids").type) and pa.types.is_large_list(
        schema.field("labels").type
    )
    packed_groups(packed, lengths, 20)
    small = pack_dataset(numbered(lengths[:3]), 20).with_format("arrow")[:].schema
    assert pa.types.is_list(small.field("input_ids").type)


def chat_examples(count: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for index in range(count):
        turns = []
        for _ in range(rng.randint(1, 2)):
            turns.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(2, 12)))})
            turns.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 20)))})
        out.append(Example(f"gen:{index + 1}", messages=tuple(turns)))
    return out


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    local = copy.deepcopy(tokenizer)
    apply_chat_template_choice(local, None)
    return local


def test_packed_rows_hold_exactly_the_tokenized_examples(chat_tokenizer) -> None:
    examples = chat_examples(60, seed=1)
    data = DataConfig(train="x", max_length=128, num_proc=1)
    plain = tokenize_split(examples, chat_tokenizer, data, "train")
    packed = tokenize_split(examples, chat_tokenizer, DataConfig(train="x", max_length=128, packing=True), "train")
    assert packed.stats["sequences"] == len(packed.dataset) < len(plain.dataset)
    assert packed.stats["tokens"] == plain.stats["tokens"] and packed.stats["packing_efficiency"] > 0.8
    pieces = Counter()
    for row in packed.dataset:
        assert len(row["input_ids"]) == len(row["labels"]) == sum(row["seq_lengths"]) <= 128
        start = 0
        for length in row["seq_lengths"]:
            pieces[(tuple(row["input_ids"][start : start + length]), tuple(row["labels"][start : start + length]))] += 1
            start += length
    assert pieces == Counter((tuple(r["input_ids"]), tuple(r["labels"])) for r in plain.dataset)


def test_pack_dataset_keeps_seq_lengths_in_row_order() -> None:
    import datasets

    rows = {"input_ids": [[1] * 3, [2] * 5, [3] * 2, [4] * 7], "labels": [[-100] * 3, [2] * 5, [3] * 2, [4] * 7]}
    packed = pack_dataset(datasets.Dataset.from_dict(rows), 8)
    assert packed["seq_lengths"] == [[7], [5, 3], [2]]
    assert packed["input_ids"][1] == [2] * 5 + [1] * 3 and packed["labels"][1] == [2] * 5 + [-100] * 3


def per_token_losses(model, batch: dict) -> torch.Tensor:
    """Cross-entropy of every position that has a label, from a forward as the trainer makes it."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits.float()
    labels = batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return losses[labels.reshape(-1) != IGNORE_INDEX]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_batch_loss_equals_its_examples_run_separately(
    tiny_model_dir: Path, chat_tokenizer, attention, tmp_path
):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attention)
    model.eval()
    config = JobConfig(
        model=ModelConfig(dtype="float32"),
        data=DataConfig(train="x", max_length=96, packing=True),
        train=TrainConfig(per_device_train_batch_size=2, gradient_accumulation_steps=1, activation_checkpointing=False),
    )
    split = tokenize_split(chat_examples(40, seed=2), chat_tokenizer, config.data, "train")
    args = build_sft_config(config, tmp_path, "cpu", has_eval=False)
    assert args.packing and args.padding_free and args.dataset_kwargs == {"skip_prepare_dataset": True}
    trainer = JobTrainer(model=model, args=args, train_dataset=split.dataset, processing_class=chat_tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1  # padding-free: one flat row
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) > 2  # several examples share the row
    bounds = [*starts, batch["input_ids"].shape[1]]

    separate = []
    for low, high in itertools.pairwise(bounds):
        one = {"input_ids": batch["input_ids"][:, low:high], "labels": batch["labels"][:, low:high]}
        separate.append(per_token_losses(model, one))
    separate_losses = torch.cat(separate)
    packed_losses = per_token_losses(model, batch)
    assert packed_losses.shape == separate_losses.shape
    torch.testing.assert_close(packed_losses, separate_losses, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_losses.sum(), separate_losses.sum(), rtol=1e-6, atol=1e-4)

    # Control: the same row without restarting positions attends across examples, and the loss shows it.
    leaky = {**batch, "position_ids": torch.arange(batch["input_ids"].shape[1])[None]}
    leaky = {k: v for k, v in leaky.items() if not k.startswith(("cu_seq_lens", "max_length", "seq_idx"))}
    assert (per_token_losses(model, leaky) - separate_losses).abs().max() > 1e-3

    # And the trainer's own loss is the mean of the same per-token losses.
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
    torch.testing.assert_close(loss, separate_losses.mean(), rtol=1e-5, atol=1e-5)
