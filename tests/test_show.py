"""validate --show: the first examples of a split decoded, with exactly the trained spans marked."""

from __future__ import annotations

import copy

import pytest

from job.config.schema import DataConfig
from job.data.formats import Example
from job.data.masking import IGNORE_INDEX, apply_chat_template_choice
from job.data.show import CLOSE, OPEN, RESET, TRAINED_STYLE, describe, render_terminal, shown_examples, use_color
from job.data.splits import tokenize_split

CAPITAL = ({"role": "user", "content": "What is the capital of Ruritania?"},
           {"role": "assistant", "content": "Strelsau is the capital."})  # fmt: skip
TWO_TURNS = ({"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Two plus two?"},
             {"role": "assistant", "content": "Four."}, {"role": "user", "content": "And\nthree?"},
             {"role": "assistant", "content": "Five,\nno: six."})  # fmt: skip
EXAMPLES = [
    Example("chat.jsonl:1", messages=CAPITAL),
    Example("chat.jsonl:2", messages=TWO_TURNS),
    Example("doc.jsonl:1", text="A whole document trains, every token of it."),
    Example("pc.jsonl:1", text="Question: sky colour?\nAnswer:", completion=" Blue."),
]


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    local = copy.deepcopy(tokenizer)
    apply_chat_template_choice(local, None)
    return local


@pytest.fixture(scope="module")
def plain(chat_tokenizer):
    data = DataConfig(train="x", max_length=256, text_mode="documents", num_proc=1)  # the document: one example
    split = tokenize_split(EXAMPLES, chat_tokenizer, data, "train")
    assert split.stats["sources_head"] == [e.source for e in EXAMPLES]
    return split


def test_trained_spans_decode_to_the_assistant_turns_plus_end_of_turn(plain, chat_tokenizer) -> None:
    shown = shown_examples(plain, chat_tokenizer, 4)
    assert [e["source"] for e in shown] == [e.source for e in EXAMPLES]
    capital, two, document, completion = shown
    assert capital["text"] == "<s>[INST] What is the capital of Ruritania?[/INST] Strelsau is the capital.</s>"
    assert capital["trained"] == ["Strelsau is the capital.</s>"]
    assert two["trained"] == ["Four.</s>", "Five,\nno: six.</s>"]
    assert document["trained"] == [document["text"]] == ["<s> A whole document trains, every token of it.</s>"]
    assert (
        completion["trained"] == ["Blue.</s>"] and completion["text"] == "<s> Question: sky colour?\nAnswer: Blue.</s>"
    )
    for example in shown:
        assert [example["text"][a:b] for a, b in example["spans"]] == example["trained"]
        assert all(example["text"][a:b] in ("<s>", "</s>", "[INST]", "[/INST]") for a, b in example["control"])
        assert 0 < example["trained_tokens"] <= example["tokens"]
    assert capital["tokens"] == len(plain.dataset[0]["input_ids"])
    assert capital["trained_tokens"] == sum(label != IGNORE_INDEX for label in plain.dataset[0]["labels"])


def test_n_bounds_what_is_shown(plain, chat_tokenizer) -> None:
    assert shown_examples(plain, chat_tokenizer, 0) == []
    assert len(shown_examples(plain, chat_tokenizer, 1)) == 1
    assert len(shown_examples(plain, chat_tokenizer, 50)) == len(EXAMPLES)
    head = plain.stats.pop("sources_head")
    try:
        assert shown_examples(plain, chat_tokenizer, 1)[0]["source"] is None
    finally:
        plain.stats["sources_head"] = head


def test_packed_rows_are_cut_back_into_their_examples(plain, chat_tokenizer) -> None:
    data = DataConfig(train="x", max_length=256, packing=True, text_mode="documents", num_proc=1)
    packed = tokenize_split(EXAMPLES, chat_tokenizer, data, "train")
    assert len(packed.dataset) < len(EXAMPLES)  # several examples share a row
    shown = shown_examples(packed, chat_tokenizer, len(EXAMPLES))
    expected = shown_examples(plain, chat_tokenizer, len(EXAMPLES))
    key = lambda e: (e["text"], tuple(e["trained"]))  # noqa: E731
    assert sorted(map(key, shown)) == sorted(map(key, expected))
    assert all(e["source"] is None for e in shown)


def test_blocks_are_shown_piece_by_piece(chat_tokenizer) -> None:
    documents = [Example(f"doc.jsonl:{i}", text=f"Document {i} is long enough to cross a block edge.") for i in (1, 2)]
    data = DataConfig(train="x", max_length=16, num_proc=1)  # text_mode: blocks
    blocks = tokenize_split(documents, chat_tokenizer, data, "train")
    shown = shown_examples(blocks, chat_tokenizer, 100)
    assert len(shown) > len(blocks.dataset) and all(e["tokens"] <= 16 and e["source"] is None for e in shown)
    assert all(e["trained"] == [e["text"]] for e in shown)  # a document trains every token
    assert sum(e["tokens"] for e in shown) == blocks.stats["tokens"]
    assert shown[0]["text"].startswith("<s> Document 1")


def test_render_marks_trained_spans_with_and_without_color(plain, chat_tokenizer) -> None:
    capital, two = shown_examples(plain, chat_tokenizer, 2)
    text = render_terminal(capital, color=False)
    assert (
        text.splitlines()[0] == f"── chat.jsonl:1 · {capital['tokens']} tokens, {capital['trained_tokens']} trained ──"
    )
    assert (
        text.splitlines()[1]
        == f"<s>[INST] What is the capital of Ruritania?[/INST] {OPEN}Strelsau is the capital.</s>{CLOSE}"
    )
    assert "\x1b" not in text
    # In color, no «»; the trained text in green, control tokens styled, no background past a line's end.
    colored = render_terminal(two, color=True)
    assert OPEN not in colored and f"{TRAINED_STYLE}Four.{RESET}" in colored
    assert f"{TRAINED_STYLE}Five,{RESET}\n{TRAINED_STYLE}no: six.{RESET}" in colored
    assert "\x1b[36m<s>" + RESET in colored
    # Without spans (an example read back from JSON), the trained pieces are found in order.
    bare = {k: v for k, v in two.items() if k not in ("spans", "control")}
    assert f"{OPEN}Four.</s>{CLOSE}" in render_terminal(bare, color=False)


def test_control_characters_in_data_cannot_drive_the_terminal(chat_tokenizer) -> None:
    ids = chat_tokenizer("red \x1b[31m text\r\n", add_special_tokens=False)["input_ids"]
    example = describe(chat_tokenizer, ids, [IGNORE_INDEX] * len(ids), "f:1", frozenset())
    shown = render_terminal(example, color=True)
    assert "\x1b[31m" not in shown and "\\x1b[31m" in shown and "\\r\n" in shown


def test_a_span_edge_inside_a_multibyte_character(chat_tokenizer) -> None:
    ids = chat_tokenizer("ab 🦙 cd", add_special_tokens=False)["input_ids"]
    pieces = [chat_tokenizer.convert_ids_to_tokens(i) for i in ids]
    first_byte = next(k for k, piece in enumerate(pieces) if piece.startswith("<0x"))
    labels = [IGNORE_INDEX] * (first_byte + 1) + ids[first_byte + 1 :]  # trained from the emoji's second byte
    example = describe(chat_tokenizer, ids, labels, None, frozenset())
    (low, high), text = example["spans"][0], example["text"]
    assert text == "ab 🦙 cd" and 0 <= low < high == len(text) and text[low:].endswith(" cd")


def test_color_only_on_a_terminal_without_no_color(monkeypatch) -> None:
    class Terminal:
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert use_color(Terminal()) is True
    monkeypatch.setenv("NO_COLOR", "1")
    assert use_color(Terminal()) is False
    monkeypatch.delenv("NO_COLOR")
    assert use_color(object()) is False
