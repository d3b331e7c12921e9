"""Loss masks from any chat template: exactly the assistant contents plus their end-of-turn token."""

from __future__ import annotations

import copy

import pytest
import torch

from job.data import Example
from job.errors import DataError
from job.masking import (
    IGNORE_INDEX,
    apply_chat_template_choice,
    default_chat_template,
    describe_example,
    tokenize_examples,
    tokenize_one,
)

CONVERSATION = (
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
)

LLAMA3_STYLE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
    " + m['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# The Hub's Mistral v0.3 template puts the system prompt into the *last* message only (`loop.last`),
# so rendering a prefix moves it: masks must still come out right.
HUB_MISTRAL = default_chat_template().replace("loop.index0 == ns.last_user", "loop.last")


def trained_text(tokenizer, example: Example) -> list[str]:
    ids, labels = tokenize_one(example, tokenizer, train_on="assistant")
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label == IGNORE_INDEX:
            if current:
                runs.append(tokenizer.decode(current))
                current = []
        else:
            current.append(token)
    if current:
        runs.append(tokenizer.decode(current))
    return runs


@pytest.fixture
def chat_tokenizer(tokenizer):
    local = copy.deepcopy(tokenizer)
    local.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    return local


@pytest.mark.parametrize(("template", "end"), [(None, "</s>"), (HUB_MISTRAL, "</s>"), (LLAMA3_STYLE, "<|eot_id|>")])
def test_masks_decode_to_assistant_contents_plus_end_token(chat_tokenizer, template, end) -> None:
    chat_tokenizer.chat_template = None
    apply_chat_template_choice(chat_tokenizer, template)
    runs = trained_text(chat_tokenizer, Example("t:1", messages=CONVERSATION))
    assert [r.strip() for r in runs] == [f"Hello! How can I help?{end}", f"It is 4.{end}"]


def test_default_template_is_used_and_keeps_the_system_prompt(chat_tokenizer) -> None:
    chat_tokenizer.chat_template = None
    assert apply_chat_template_choice(chat_tokenizer, None) == "default-mistral-v3"
    ids, labels = tokenize_one(Example("t:1", messages=CONVERSATION), chat_tokenizer, train_on="assistant")
    text = chat_tokenizer.decode(ids)
    assert text.startswith("<s>[INST] Hi there[/INST]")
    assert "[INST] Be brief.\n\nWhat is 2+2?[/INST]" in text
    shown = describe_example(chat_tokenizer, ids, labels)
    assert "«Hello! How can I help?</s>»" in shown and "«It is 4.</s>»" in shown


def test_configured_template_beats_the_tokenizers(chat_tokenizer, tmp_path) -> None:
    chat_tokenizer.chat_template = HUB_MISTRAL
    path = tmp_path / "t.jinja"
    path.write_text(LLAMA3_STYLE)
    assert apply_chat_template_choice(chat_tokenizer, str(path)) == "config"
    assert chat_tokenizer.chat_template == LLAMA3_STYLE
    assert apply_chat_template_choice(chat_tokenizer, None) == "tokenizer"


def test_train_on_all_and_text_documents(tokenizer) -> None:
    local = copy.deepcopy(tokenizer)
    apply_chat_template_choice(local, None)
    ids, labels = tokenize_one(Example("t:1", messages=CONVERSATION), local, train_on="all")
    assert labels == ids
    ids, labels = tokenize_one(Example("t:2", text="plain document"), local, train_on="assistant")
    assert labels == ids and ids[0] == local.bos_token_id and ids[-1] == local.eos_token_id


def test_truncation_counts_and_drops_examples_without_trainable_tokens(tokenizer) -> None:
    local = copy.deepcopy(tokenizer)
    apply_chat_template_choice(local, None)
    long_prompt = Example(
        "t:1", messages=({"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "ok"})
    )
    short = Example("t:2", messages=({"role": "user", "content": "q"}, {"role": "assistant", "content": "a b c d e f"}))
    result = tokenize_examples([long_prompt, short], local, max_length=12, train_on="assistant")
    assert result.dropped == ["t:1"] and result.sources == ["t:2"]
    assert result.truncated == 1 + (len(tokenize_one(short, local, train_on="assistant")[0]) > 12)
    assert all(len(ids) <= 12 for ids in result.input_ids)
    with pytest.raises(DataError, match="no example keeps a trainable token"):
        tokenize_examples([long_prompt], local, max_length=12, train_on="assistant")


def test_template_that_rejects_a_conversation_names_the_record(tokenizer) -> None:
    local = copy.deepcopy(tokenizer)
    local.chat_template = "{{ raise_exception('nope') }}"
    with pytest.raises(DataError, match="t:9: the chat template rejected"):
        tokenize_one(Example("t:9", messages=CONVERSATION), local, train_on="assistant")


def test_padding_never_trains_and_eos_is_never_masked(tokenizer) -> None:
    """TRL's collator, as the trainer uses it: padding is masked by length, not by token id."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    local = copy.deepcopy(tokenizer)
    local.pad_token = local.eos_token  # the worst case: pad id == EOS id
    apply_chat_template_choice(local, None)
    short = Example("t:1", messages=({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}))
    long = Example("t:2", messages=({"role": "user", "content": "q q q q"}, {"role": "assistant", "content": "b c d"}))
    features = []
    for example in (short, long):
        ids, labels = tokenize_one(example, local, train_on="assistant")
        features.append({"input_ids": ids, "labels": labels})
    batch = DataCollatorForLanguageModeling(pad_token_id=local.pad_token_id)(features)
    n_short = len(features[0]["input_ids"])
    assert (batch["labels"][0, n_short:] == IGNORE_INDEX).all()  # padding is not trained
    assert (batch["attention_mask"][0, n_short:] == 0).all()
    eos_positions = batch["input_ids"][:, :] == local.eos_token_id
    real = torch.zeros_like(eos_positions)
    real[0, :n_short] = True
    real[1, :] = True
    assert (batch["labels"][eos_positions & real] == local.eos_token_id).all()  # every real EOS trains
