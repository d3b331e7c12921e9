"""Fields no longer dropped: a sharegpt `system` column and an alpaca `history` become turns, as LLaMA-Factory
reads them, and train as its users expect."""

from __future__ import annotations

import copy

import pytest
from test_tools import runs

from job.data.formats import parse_record
from job.data.masking import apply_chat_template_choice, tokenize_one
from job.errors import DataError


def trained(tokenizer, example) -> list[str]:
    return runs(tokenizer, *tokenize_one(example, tokenizer, train_on="assistant"))


def test_a_sharegpt_system_column_becomes_the_system_turn(tokenizer) -> None:
    record = {"system": "Answer in French.", "conversations": [{"from": "human", "value": "Hi"},
                                                               {"from": "gpt", "value": "Salut"}]}  # fmt: skip
    example = parse_record(record, "sharegpt", "s:1")
    assert example.messages[0] == {"role": "system", "content": "Answer in French."}
    local = copy.deepcopy(tokenizer)
    apply_chat_template_choice(local, None)
    ids, _ = tokenize_one(example, local, train_on="assistant")
    assert local.decode(ids) == "<s>[INST] Answer in French.\n\nHi[/INST] Salut</s>"
    same = {**record, "conversations": [{"from": "system", "value": "Answer in French."}, *record["conversations"]]}
    assert parse_record(same, "sharegpt", "s:2").messages == example.messages  # the same prompt twice: kept once


def test_an_alpaca_history_becomes_earlier_turns_that_train(tokenizer) -> None:
    record = {"instruction": "And 3+3?", "output": "6", "system": "Be brief.",
              "history": [["What is 1+1?", "2"], ["And 2+2?", "4"]]}  # fmt: skip
    example = parse_record(record, "alpaca", "a:1")
    assert [t["role"] for t in example.messages] == ["system", "user", "assistant", "user", "assistant", "user",
                                                     "assistant"]  # fmt: skip
    assert [t["content"] for t in example.messages[1:]] == ["What is 1+1?", "2", "And 2+2?", "4", "And 3+3?", "6"]
    local = copy.deepcopy(tokenizer)
    apply_chat_template_choice(local, None)
    assert trained(local, example) == ["2</s>", "4</s>", "6</s>"]
    assert parse_record({**record, "history": []}, "alpaca", "a:2").messages[1]["content"] == "And 3+3?"


@pytest.mark.parametrize(
    ("history", "message"),
    [
        ("What is 1+1?", r"a:1: 'history' must be a list of \[instruction, response\] pairs"),
        ([["only one"]], r"a:1: history\[0\] must be a pair \[instruction, response\] of strings"),
        ([["q", 2]], r"a:1: history\[0\] must be a pair"),
        ([["q", "a"], ["  ", "a"]], r"a:1: history\[1\]: empty instruction"),
    ],
)
def test_a_bad_history_names_the_record_and_pair(history, message) -> None:
    with pytest.raises(DataError, match=message):
        parse_record({"instruction": "i", "output": "o", "history": history}, "alpaca", "a:1")
