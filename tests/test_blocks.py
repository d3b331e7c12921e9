"""Continued pretraining in blocks: every token kept, pieces apart, token counts; a mixed text + chat split."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from test_packing import chat_examples, chat_tokenizer, per_token_losses  # noqa: F401 (a fixture)
from test_tokenize_cache import job_config

from job.config.schema import DataConfig, JobConfig, ModelConfig, TrainConfig
from job.data.masking import tokenize_one
from job.data.prepare import validate
from job.data.read import Example, load_dataset
from job.data.splits import tokenize_split
from job.train.trainer import JobTrainer, build_sft_config

WEB = Path(__file__).parent / "fixtures" / "pretrain-web.jsonl"


def documents() -> list[Example]:
    return list(load_dataset(WEB).examples)


def test_blocks_keep_every_token_in_order_and_cut_at_max_length(tokenizer) -> None:
    docs = documents()
    whole = [tokenize_one(doc, tokenizer, train_on="assistant")[0] for doc in docs]
    split = tokenize_split(docs, tokenizer, DataConfig(train="x", max_length=256, num_proc=1), "train")
    rows = split.dataset.with_format(None)[:]
    flat = [token for ids in whole for token in ids]
    assert [t for ids in rows["input_ids"] for t in ids] == flat  # joined in order, nothing lost or added
    assert rows["input_ids"][0][0] == tokenizer.bos_token_id and flat.count(tokenizer.eos_token_id) == len(docs)
    lengths = [len(ids) for ids in rows["input_ids"]]
    assert set(lengths[:-1]) == {256} and 0 < lengths[-1] <= 256  # the last, shorter block is kept
    assert all(sum(pieces) == n for pieces, n in zip(rows["seq_lengths"], lengths, strict=True))
    pieces = [p for row in rows["seq_lengths"] for p in row]
    ends = list(itertools.accumulate(len(ids) for ids in whole))
    cuts = set(itertools.accumulate(pieces))
    assert set(ends) <= cuts and cuts <= set(ends) | set(range(256, len(flat), 256))  # documents and blocks
    stats = split.stats
    assert stats["tokens_total"] == stats["tokens_kept"] == stats["tokens"] == len(flat)
    assert stats["documents"] == stats["examples"] == len(docs) and stats["blocks"] == len(lengths)
    assert stats["trainable_tokens"] == len(flat) - len(pieces)  # each piece's first token predicts nothing
    assert split.packed and stats["truncated"] == 0 and stats["sources_head"][0] == docs[0].source


def test_documents_mode_truncates_as_before_and_counts_what_it_drops(tokenizer) -> None:
    docs = documents()
    data = DataConfig(train="x", max_length=256, num_proc=1, text_mode="documents")
    stats = tokenize_split(docs, tokenizer, data, "train").stats
    blocks = tokenize_split(docs, tokenizer, DataConfig(train="x", max_length=256, num_proc=1), "train").stats
    assert stats["tokens_kept"] < stats["tokens_total"] and stats["truncated"] > 0
    assert stats["tokens_total_at_least"] or stats["tokens_total"] == blocks["tokens_total"]
    assert stats["tokens_kept"] == stats["tokens"] and not stats["blocks"] and stats["examples"] == len(docs)


@pytest.mark.parametrize("packing", [False, True])
def test_a_mixed_split_keeps_chats_whole_and_cuts_text_into_blocks(chat_tokenizer, packing) -> None:  # noqa: F811
    chats, docs = chat_examples(12, seed=5), documents()[:6]
    data = DataConfig(train="x", max_length=128, num_proc=1, packing=packing)
    split = tokenize_split([*chats, *docs], chat_tokenizer, data, "train")
    alone = tokenize_split(chats, chat_tokenizer, DataConfig(train="x", max_length=128, num_proc=1), "train")
    rows = split.dataset.with_format(None)[:]
    chat_rows = len(rows["input_ids"]) - split.stats["blocks"]
    if not packing:  # chats first, one piece each, exactly as tokenized alone
        assert rows["input_ids"][:chat_rows] == alone.input_ids and rows["labels"][:chat_rows] == alone.labels
        assert rows["seq_lengths"][:chat_rows] == [[len(ids)] for ids in alone.input_ids]
    assert split.stats["examples"] == 12 + 6 and split.stats["documents"] == 6 and split.packed
    block_tokens = sum(len(ids) for ids in rows["input_ids"][chat_rows:])
    assert block_tokens == sum(len(tokenize_one(d, chat_tokenizer, train_on="assistant")[0]) for d in docs)
    assert split.stats["sources_head"][:12] == [c.source for c in chats]


@pytest.mark.parametrize("attention", ["sdpa"])
def test_a_block_loss_equals_its_pieces_run_separately(tiny_model_dir, tokenizer, attention, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attention)
    model.eval()
    config = JobConfig(
        model=ModelConfig(dtype="float32"),
        data=DataConfig(train="x", max_length=96, packing=True),  # the trainer runs padding-free
        train=TrainConfig(per_device_train_batch_size=1, gradient_accumulation_steps=1, activation_checkpointing=False),
    )
    short = [Example(f"d:{i}", text=" ".join(["word"] * (5 + 7 * i))) for i in range(6)]
    split = tokenize_split(short, tokenizer, config.data, "train")
    args = build_sft_config(config, tmp_path, "cpu", has_eval=False)
    trainer = JobTrainer(model=model, args=args, train_dataset=split.dataset, processing_class=tokenizer)
    rows = split.dataset.with_format(None)[:]
    index = next(i for i, pieces in enumerate(rows["seq_lengths"]) if len(pieces) > 2)
    batch = trainer.data_collator([{k: rows[k][index] for k in ("input_ids", "labels", "seq_lengths")}])
    bounds = [0, *itertools.accumulate(rows["seq_lengths"][index])]
    separate = torch.cat(
        [
            per_token_losses(model, {"input_ids": batch["input_ids"][:, lo:hi], "labels": batch["labels"][:, lo:hi]})
            for lo, hi in itertools.pairwise(bounds)
        ]
    )
    torch.testing.assert_close(per_token_losses(model, batch), separate, rtol=1e-5, atol=1e-5)
    leaky = {"input_ids": batch["input_ids"], "labels": batch["labels"]}  # one sequence: attends across documents
    assert (per_token_losses(model, leaky) - separate).abs().max() > 1e-3


def test_validate_reports_tokens_before_and_after(tmp_path, tiny_model_dir) -> None:
    blocks = validate(job_config(tmp_path, tiny_model_dir, WEB, "data.max_length=256"))
    documents_mode = validate(
        job_config(tmp_path, tiny_model_dir, WEB, "data.max_length=256", "data.text_mode=documents")
    )
    assert blocks["tokens_total"] == blocks["tokens_kept"] >= documents_mode["tokens_total"]
    assert documents_mode["tokens_kept"] < documents_mode["tokens_total"] and documents_mode["truncated"] > 0
    assert documents_mode["tokens_total_at_least"] and not blocks["tokens_total_at_least"]  # long documents: a prefix
    assert blocks["text_mode"] == "blocks" and blocks["blocks"] == -(-blocks["tokens_total"] // 256)
    assert blocks["special_strings"]["records"] == 0
