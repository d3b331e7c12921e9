"""Tool calls: both conventions normalised, rendered with Mistral v3's tool tokens exactly as mistral-common
tokenizes them, masks that train the calls and answers only, and templates that cannot render tools refused."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest

from job.data.formats import parse_record
from job.data.masking import (
    IGNORE_INDEX,
    ChatRenderer,
    SpanFinder,
    Tokenize,
    apply_chat_template_choice,
    assistant_spans,
    examples_to_columns,
    tokenize_one,
)
from job.data.read import Example, load_dataset
from job.errors import ConfigError, DataError

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = json.loads((FIXTURES / "tools-mistral-common-v3.json").read_text())
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {}}},
}


@pytest.fixture
def mistral(tokenizer):
    local = copy.deepcopy(tokenizer)
    local.chat_template = None
    apply_chat_template_choice(local, None)  # the shipped Mistral v3 template
    return local


def tool_examples() -> list[Example]:
    return [
        *load_dataset(FIXTURES / "tools-openai.jsonl").examples,
        *load_dataset(FIXTURES / "tools-sharegpt.json").examples,
    ]


def runs(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """The decoded text of each run of trained tokens."""
    out, current = [], []
    for token, label in [*zip(ids, labels, strict=True), (None, IGNORE_INDEX)]:
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            out.append(tokenizer.decode(current))
            current = []
    return out


def expected_runs(example: Example) -> list[str]:
    """What each assistant turn is in mistral-common's v3 layout: ` text`, `[TOOL_CALLS] [calls]`, then `</s>`
    (decoding drops the one leading space of a run)."""
    out = []
    for turn in example.messages[example.prompt_turns :]:
        if turn["role"] != "assistant":
            continue
        text = f" {turn['content']}" if turn["content"] else ""
        if turn.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"], "id": c["id"]}
                     for c in turn["tool_calls"]]  # fmt: skip
            text += "[TOOL_CALLS] " + json.dumps(calls, ensure_ascii=False)
        out.append(text.removeprefix(" ") + "</s>")
    return out


# ---------------------------------------------------------------- both conventions


def test_openai_and_sharegpt_tool_calls_become_the_same_shape() -> None:
    openai, sharegpt = tool_examples()[0], tool_examples()[3]
    call = openai.messages[2]
    assert call["role"] == "assistant" and call["content"] == ""
    assert call["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert len(call["tool_calls"][0]["id"]) == 9 and call["tool_calls"][0]["id"].isalnum()  # call_8f2a → v3 id
    result = openai.messages[3]
    call_id = call["tool_calls"][0]["id"]
    assert result == {
        "role": "tool",
        "content": '{"temp": 22, "unit": "C"}',
        "tool_call_id": call_id,
        "name": "get_weather",
    }
    assert openai.messages[6]["tool_calls"][0]["id"] == "a1b2c3d4e"  # a v3 id is kept
    assert [t["function"]["name"] for t in json.loads(openai.tools)] == ["get_weather", "get_time"]
    # sharegpt: the system column, function_call → assistant calls, observation → tool, bare functions as tools
    assert [t["role"] for t in sharegpt.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert sharegpt.messages[0]["content"] == "You can use tools."
    assert sharegpt.messages[2]["tool_calls"][0]["function"] == {
        "name": "calculate",
        "arguments": {"expression": "12 * 7"},
    }
    assert json.loads(sharegpt.tools)[0]["type"] == "function"
    assert json.loads(sharegpt.tools)[0]["function"]["name"] == "calculate"
    parallel = tool_examples()[4]
    first, second = parallel.messages[1]["tool_calls"]
    assert [parallel.messages[2]["tool_call_id"], parallel.messages[3]["tool_call_id"]] == [first["id"], second["id"]]
    record = json.loads((FIXTURES / "tools-openai.jsonl").read_text().splitlines()[0])
    assert parse_record(record, "messages", "a:1") == parse_record(record, "messages", "a:1")  # ids: the same each run


CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
Q = {"role": "user", "content": "q"}
CALLS = {"role": "assistant", "tool_calls": [CALL]}
RESULT = {"role": "tool", "content": "r"}


def calling(name: str, arguments) -> dict:
    return {"role": "assistant", "tool_calls": [{**CALL, "function": {"name": name, "arguments": arguments}}]}


@pytest.mark.parametrize(
    ("turns", "tools", "message"),
    [
        ([Q, RESULT], None,
         r"a:1: messages\[1\] is a tool result where 'assistant' or an assistant turn with tool calls was expected"),
        ([Q, calling("get_weather", '{"city": Paris}')], None,
         r"a:1: messages\[1\]\.tool_calls\[0\]: arguments of 'get_weather' are not valid JSON: Expecting value"),
        ([Q, CALLS, RESULT, RESULT], None, r"messages\[3\]: a tool result with no call before it left to answer"),
        ([Q, CALLS, Q], None, r"messages\[2\] is 'user' where a tool result was expected"),
        ([Q, calling("get_time", {})], [WEATHER],
         r"messages\[1\]\.tool_calls\[0\]: calls 'get_time', which is not in the record's tools \(get_weather\)"),
        ([Q, CALLS, {**RESULT, "tool_call_id": "call_2"}], None,
         r"messages\[2\]: tool_call_id call_2 names none of the calls before it \(call_1\)"),
        ([Q, calling("get_weather", "[1]")], None, r"arguments of 'get_weather' must be a JSON object"),
    ],
)  # fmt: skip
def test_bad_tool_use_names_the_record_and_field(turns, tools, message) -> None:
    record = {"messages": turns, **({"tools": tools} if tools else {})}
    with pytest.raises(DataError, match=message) as info:
        parse_record(record, "messages", "a:1")
    assert info.value.exit_code == 65


def test_sharegpt_function_call_that_is_not_json_and_a_conflicting_system_prompt() -> None:
    bad = {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "calc(1)"}]}
    with pytest.raises(DataError, match=r"s:2: conversations\[1\]: function_call is not valid JSON"):
        parse_record(bad, "sharegpt", "s:2")
    both = {"system": "A", "conversations": [{"from": "system", "value": "B"}, {"from": "human", "value": "q"},
                                             {"from": "gpt", "value": "a"}]}  # fmt: skip
    with pytest.raises(DataError, match="both the 'system' field and conversations\\[0\\] are system prompts"):
        parse_record(both, "sharegpt", "s:3")


# ---------------------------------------------------------------- Mistral v3 rendering = mistral-common


def test_the_shipped_template_tokenizes_tool_use_as_mistral_common_v3(mistral) -> None:
    """Reference ids from mistral-common's InstructTokenizerV3 (tests/fixtures/tools-reference.py); content
    special strings are plain text there, so `data.special_strings: text` must give the same ids."""
    examples = tool_examples()
    assert [e.source.rsplit("/", 1)[-1] for e in examples] == [r["source"] for r in REFERENCE["records"]]
    out = Tokenize(mistral, train_on="assistant", max_length=10_000, special_strings="text")(
        examples_to_columns(examples)
    )
    for row, reference in enumerate(REFERENCE["records"]):
        assert out["input_ids"][row] == reference["ids"], reference["source"]
    assert out["special_strings"] == [0, 3, 0, 0, 0]  # "</s>", "[INST]" in the question, "</s>" in the call
    control = Tokenize(mistral, train_on="assistant", max_length=10_000)(examples_to_columns(examples[1:2]))
    assert control["input_ids"][0] != REFERENCE["records"][1]["ids"] and control["special_strings"] == [3]
    ids = out["input_ids"][0]
    for token in ("[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"):
        assert mistral.convert_tokens_to_ids(token) in ids  # each one control token (ids 5 to 9)
    assert ids.count(mistral.convert_tokens_to_ids("[TOOL_RESULTS]")) == 3


def test_masks_decode_to_the_calls_and_answers_with_their_end_token(mistral) -> None:
    for example in tool_examples():
        ids, labels = tokenize_one(example, mistral, train_on="assistant")
        assert runs(mistral, ids, labels) == expected_runs(example), example.source
    text = mistral.decode(tokenize_one(tool_examples()[0], mistral, train_on="assistant")[0])
    assert text.index("[AVAILABLE_TOOLS]") > text.index("It is 22 °C.</s>")  # before the last user turn only
    assert '[TOOL_RESULTS] {"content": "12:00", "call_id": "a1b2c3d4e"}[/TOOL_RESULTS]' in text
    assert '{"content": {"temp": 22, "unit": "C"}, "call_id": ' in text and '{"content": 18, "call_id": ' in text


def tool_conversations(count: int, seed: int) -> list[tuple[list[dict], list | None, int]]:
    rng = random.Random(seed)
    words = ["alpha", "[INST]", "</s>", "ünï", "🐸", "  pad  ", '{"a": 1}', "42"]
    out = []
    for n in range(count):
        turns: list[dict] = [{"role": "system", "content": "sys " + rng.choice(words)}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            turns.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(1, 4)))})
            for _ in range(rng.randint(0, 2)):
                calls = [
                    {
                        "id": f"{n:03d}{len(turns):03d}{k:03d}",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": rng.choice(words)}},
                    }
                    for k in range(rng.randint(1, 2))
                ]
                turns.append({"role": "assistant", "content": "", "tool_calls": calls})
                turns += [{"role": "tool", "content": rng.choice(words), "tool_call_id": c["id"], "name": "get_weather"}
                          for c in calls]  # fmt: skip
            turns.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 4)))})
        prompt = rng.choice([0, 0, 2]) if len(turns) > 4 and turns[0]["role"] != "system" else 0
        out.append((turns, [WEATHER] if rng.random() < 0.7 else None, prompt))
    return out


def test_layout_shortcut_with_tools_gives_the_same_spans_as_rendering_every_prefix(mistral) -> None:
    render = ChatRenderer(mistral)
    finder = SpanFinder(render)
    for index, (messages, tools, prompt) in enumerate(tool_conversations(150, seed=5)):
        text = render(messages, f"r:{index}", tools=tools)
        assert text == mistral.apply_chat_template(messages, tools=tools, tokenize=False)
        exact = assistant_spans(render, messages, text, "r", prompt, tools)
        assert finder.spans(messages, text, f"r:{index}", prompt, tools) == exact
    keys = list(finder.layouts)
    assert {key[3] for key in keys} == {True, False}  # tool list present or not: different layouts
    used = [layout for layout in finder.layouts.values() if layout.pieces is not None]
    assert used and any(layout.verified >= 8 for layout in used)


# ---------------------------------------------------------------- templates that cannot render tools

NO_TOOLS = (  # a Llama-3-style template that never reads `tools` or `tool_calls`
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
    " + m['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CALLS_ONLY = NO_TOOLS.replace(
    "+ m['content'] +", "+ m['content'] + (m['tool_calls'] | tojson if m['tool_calls'] else '') +"
)


@pytest.mark.parametrize(("template", "missing"), [(NO_TOOLS, "it leaves out the tool calls"),
                                                   (CALLS_ONLY, "it leaves out the tool list")])  # fmt: skip
def test_a_template_that_drops_tool_use_is_refused_naming_template_and_record(tokenizer, template, missing) -> None:
    local = copy.deepcopy(tokenizer)
    apply_chat_template_choice(local, template)
    with pytest.raises(ConfigError, match=rf"tools-openai\.jsonl:1: the chat template \(data\.chat_template\) "
                       rf"cannot render this record's tool use: .*{missing}") as info:  # fmt: skip
        tokenize_one(tool_examples()[0], local, train_on="assistant")
    assert info.value.exit_code == 64
    ids, _ = tokenize_one(tool_examples()[2], local, train_on="assistant")  # a plain chat still trains
    assert "Hello!" in local.decode(ids)
