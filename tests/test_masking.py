"""Loss masks from any chat template: exactly the assistant contents plus their end-of-turn token."""

from __future__ import annotations

import copy
import re
import threading
import time
from pathlib import Path

import pytest
import torch

from job.data.masking import (
    IGNORE_INDEX,
    ChatRenderer,
    SpanFinder,
    Tokenize,
    apply_chat_template_choice,
    assistant_spans,
    default_chat_template,
    describe_example,
    examples_to_columns,
    resolve_chat_template,
    tokenize_examples,
    tokenize_one,
)
from job.data.read import Example, load_dataset
from job.errors import ConfigError, DataError, InputNotFound

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


# ---------------------------------------------------------------- every format, two templates

FIXTURES = Path(__file__).parent / "fixtures" / "data"
EXPECTED_TRAINED = {
    "messages.jsonl": [["Strelsau is the capital."], ["Joined.", "Still joined."]],
    "sharegpt.json": [["Teal."], ["One, two.", "One, two, three."]],
    "alpaca.jsonl.gz": [["Bonjour"], ["Seven."]],
    "prompt_completion_chat.jsonl.zst": [["Old pond, frog jumps in."]],  # the prompt's own answer is context
}


@pytest.mark.parametrize(("template", "end"), [(None, "</s>"), (LLAMA3_STYLE, "<|eot_id|>")])
@pytest.mark.parametrize("name", sorted(EXPECTED_TRAINED))
def test_each_chat_format_trains_exactly_the_assistant_contents(chat_tokenizer, template, end, name) -> None:
    chat_tokenizer.chat_template = None
    apply_chat_template_choice(chat_tokenizer, template)
    for example, expected in zip(load_dataset(FIXTURES / name).examples, EXPECTED_TRAINED[name], strict=True):
        assert [r.strip() for r in trained_text(chat_tokenizer, example)] == [f"{c}{end}" for c in expected]


def test_prompt_completion_strings_train_the_completion_and_eos(tokenizer) -> None:
    examples = load_dataset(FIXTURES / "prompt_completion.parquet").examples
    for example, completion in zip(examples, ["Klow.", "4"], strict=True):
        ids, _ = tokenize_one(example, tokenizer, train_on="assistant")
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids) == f"<s> {example.text}{example.completion}</s>"
        assert [r.strip() for r in trained_text(tokenizer, example)] == [f"{completion}</s>"]
        _, all_labels = tokenize_one(example, tokenizer, train_on="all")
        assert all_labels == ids


def test_text_documents_train_every_token(tokenizer) -> None:
    for example in load_dataset(FIXTURES / "text.jsonl").examples:
        ids, labels = tokenize_one(example, tokenizer, train_on="assistant")
        assert labels == ids and tokenizer.decode(ids, skip_special_tokens=True) == example.text


def test_multibyte_characters_at_the_edges_of_a_turn_are_trained_whole(tokenizer) -> None:
    """Byte-fallback pieces of one character share its offsets; none may be cut off the mask."""
    local = copy.deepcopy(tokenizer)
    apply_chat_template_choice(local, None)
    answer = "☕🐸 tea and a frog 🐸☕"
    example = Example(
        "t:1", messages=({"role": "user", "content": "🐸 draw"}, {"role": "assistant", "content": answer})
    )
    assert [r.strip() for r in trained_text(local, example)] == [f"{answer}</s>"]


# ---------------------------------------------------------------- the shortcut equals the prefix method

CONTENT_TRIMMING = (  # a template that alters content: the shortcut cannot find it and must fall back
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[U] ' + m['content'] | trim }}"
    "{% elif m['role'] == 'system' %}{{ '[S] ' + m['content'] }}"
    "{% else %}{{ '[A] ' + m['content'] | trim + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '[A] ' }}{% endif %}"
)


def random_conversations(count: int, seed: int) -> list[list[dict]]:
    import random

    rng = random.Random(seed)
    words = ["alpha", "beta", "[INST]", "</s>", "gamma", "  padded  ", "ünï", "🐸", "delta\n", "eos"]
    out = []
    for _ in range(count):
        turns = [{"role": "system", "content": " ".join(rng.choices(words, k=3))}] if rng.random() < 0.4 else []
        for _ in range(rng.randint(1, 3)):
            turns.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(1, 6)))})
            turns.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 6)))})
        out.append(turns)
    return out


@pytest.mark.parametrize("template", [None, HUB_MISTRAL, LLAMA3_STYLE, CONTENT_TRIMMING])
def test_layout_shortcut_gives_the_same_spans_as_rendering_every_prefix(chat_tokenizer, template) -> None:
    chat_tokenizer.chat_template = None
    apply_chat_template_choice(chat_tokenizer, template)
    render = ChatRenderer(chat_tokenizer)
    # transformers' private `_compile_jinja_template` (docs/design.md): still there, and rendering exactly as
    # apply_chat_template does (below), or this fails on an upgrade instead of silently slowing down.
    assert render.compiled is not None
    finder = SpanFinder(render)
    for index, messages in enumerate(random_conversations(120, seed=7)):
        text = render(messages, f"r:{index}")
        assert text == chat_tokenizer.apply_chat_template(messages, tokenize=False)  # the renderer is exact
        assert finder.spans(messages, text, f"r:{index}", 0) == assistant_spans(render, messages, text, "r", 0)
    used = [layout for layout in finder.layouts.values() if layout.pieces is not None]
    if template is CONTENT_TRIMMING:
        assert finder.fallbacks > 0  # padded contents were not found as such
    else:
        assert used and all(layout.verified >= 8 for layout in used)  # the shortcut served the rest


def test_batch_tokenization_equals_the_tokenizer(tokenizer) -> None:
    local = copy.deepcopy(tokenizer)
    apply_chat_template_choice(local, None)
    messages = [tuple(m) for m in random_conversations(20, seed=3)]
    examples = [Example(f"x:{i}", messages=m) for i, m in enumerate(messages)]
    out = Tokenize(local, train_on="assistant", max_length=10_000)(examples_to_columns(examples))
    for ids, conversation in zip(out["input_ids"], messages, strict=True):
        assert ids == local.apply_chat_template(list(conversation), tokenize=True, return_dict=True)["input_ids"]


def test_truncation_modes(tokenizer) -> None:
    local = copy.deepcopy(tokenizer)
    apply_chat_template_choice(local, None)
    long = Example("t:1", messages=({"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 40}))
    short = Example("t:2", messages=({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}))
    kept = tokenize_examples([long, short], local, max_length=16, train_on="assistant", truncation="truncate")
    assert kept.sources == ["t:1", "t:2"] and kept.truncated == 1 and len(kept.input_ids[0]) == 16
    dropped = tokenize_examples([long, short], local, max_length=16, train_on="assistant", truncation="drop")
    assert dropped.sources == ["t:2"] and dropped.dropped == ["t:1"]
    with pytest.raises(DataError, match=r"t:1: \d+ tokens, over data.max_length=16"):
        tokenize_examples([long, short], local, max_length=16, train_on="assistant", truncation="error")


# ---------------------------------------------------------------- where a configured template comes from


def test_a_template_file_is_named_by_its_suffix_or_file_prefix(tmp_path) -> None:
    named = tmp_path / "t.jinja"
    named.write_text(LLAMA3_STYLE)
    assert resolve_chat_template(None, str(named)) == (LLAMA3_STYLE, "config")
    other = tmp_path / "template.txt"
    other.write_text(LLAMA3_STYLE)
    assert resolve_chat_template(None, f"file:{other}") == (LLAMA3_STYLE, "config")
    assert resolve_chat_template(None, LLAMA3_STYLE) == (LLAMA3_STYLE, "config")  # inline text
    with pytest.raises(ConfigError, match="neither a template file nor a Jinja template") as info:
        resolve_chat_template(None, str(other))  # any other path is not read: it is (bad) template text
    assert info.value.exit_code == 64
    with pytest.raises(InputNotFound, match=r"data\.chat_template file .*missing\.j2 does not exist") as missing:
        resolve_chat_template(None, str(tmp_path / "missing.j2"))
    assert missing.value.exit_code == 66


@pytest.mark.parametrize("how", ["jinja link", "file: prefix", "device"])
def test_templates_are_never_read_from_proc_sys_or_dev(tmp_path, how: str) -> None:
    """/proc/self/environ holds the credentials; it once became final/chat_template.jinja."""
    if how == "jinja link":
        (tmp_path / "t.jinja").symlink_to("/proc/self/environ")
        value, root = str(tmp_path / "t.jinja"), "/proc"
    elif how == "file: prefix":
        value, root = "file:/proc/self/environ", "/proc"
    else:
        value, root = "file:/dev/zero", "/dev"
    with pytest.raises(ConfigError, match=rf"resolves to {root}/\S+, under {root}: templates are never read") as info:
        resolve_chat_template(None, value)
    assert info.value.exit_code == 64


def test_a_template_file_over_256_kib_is_refused(tmp_path) -> None:
    path = tmp_path / "huge.jinja"
    path.write_text("{{ bos_token }}" + " " * (300 * 1024))
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))} is {300 * 1024 + 15} bytes, over the 262144-byte"):
        resolve_chat_template(None, str(path))


# ---------------------------------------------------------------- rendering within limits

RUNAWAY = {
    "loops writing": "{% for a in range(99999) %}{% for b in range(99999) %}x{% endfor %}{% endfor %}",
    "loops silent": "{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}",
    "content repeated": "{% for a in range(99999) %}{{ messages[0]['content'] }}{% endfor %}",
    "doubling": "{% set ns = namespace(s='xy') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "doubling with ~": "{% set ns = namespace(s='xy') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}",
    "wide filter": "{{ 'x' | center(2 ** 40) }}",
    "huge power": "{{ 2 ** 99999999 }}",
    "string times": "{{ messages[0]['content'] * 10 ** 8 }}",
}
LIMITS = "(ran longer than 0.5 s|wrote more than|built a value of|was given the number|raised a number|multiplied)"


def finishes(seconds: float, function):
    """function()'s result, failing the test (not hanging it) when it runs longer than `seconds`."""
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["value"] = function()
        except BaseException as exc:  # handed to the test below
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.mark.parametrize("name", sorted(RUNAWAY))
def test_a_runaway_template_stops_with_a_data_error_naming_the_record(tokenizer, monkeypatch, name: str) -> None:
    monkeypatch.setattr("job.data.templates.RENDER_SECONDS", 0.5)
    local = copy.deepcopy(tokenizer)
    local.chat_template = RUNAWAY[name]
    example = Example(
        "t.jsonl:7", messages=({"role": "user", "content": "q" * 1000}, {"role": "assistant", "content": "a"})
    )
    started = time.monotonic()
    with pytest.raises(DataError, match=rf"t\.jsonl:7: the chat template {LIMITS}") as info:
        finishes(30, lambda: tokenize_one(example, local, train_on="assistant"))
    assert info.value.exit_code == 65 and "data.chat_template" in str(info.value)
    assert time.monotonic() - started < 10


def test_render_limits_count_against_max_invalid(tokenizer, monkeypatch) -> None:
    monkeypatch.setattr("job.data.templates.RENDER_SECONDS", 0.3)
    local = copy.deepcopy(tokenizer)
    local.chat_template = (
        "{% if messages[0]['content'] == 'boom' %}" + RUNAWAY["loops silent"] + "{% endif %}" + LLAMA3_STYLE
    )
    examples = [Example(f"t:{i}", messages=({"role": "user", "content": c}, {"role": "assistant", "content": "a"}))
                for i, c in enumerate(["boom", "fine", "boom"])]  # fmt: skip
    columns = examples_to_columns(examples)
    out = finishes(30, lambda: Tokenize(local, train_on="assistant", max_length=64, max_invalid=2)(columns))
    assert [bool(e) for e in out["error"]] == [True, False, True] and out["input_ids"][1]
    with pytest.raises(DataError, match=r"t:2: the chat template ran longer than 0\.3 s"):  # the second is one too many
        finishes(30, lambda: Tokenize(local, train_on="assistant", max_length=64, max_invalid=1)(columns))


def test_the_guarded_renderer_renders_exactly_what_transformers_does(chat_tokenizer) -> None:
    """Every template feature the guards touch: loops with loop vars, namespaces, set blocks, filters, `~`, `*`."""
    chat_tokenizer.chat_template = (
        "{% set ns = namespace(n=0, t='') %}{% set sep = '-' * 3 %}{% set head %}{{ bos_token }}{% endset %}"
        "{{ head }}{% for m in messages if m['role'] != 'system' %}{% set ns.n = ns.n + 1 %}"
        "{% set ns.t = ns.t ~ m['role'][0] %}"
        "{{ loop.index }}/{{ loop.length }}{{ sep }}{{ m['role'] | upper }}: {{ m['content'] | trim }}"
        "{% if loop.last %}{{ eos_token }}{% endif %}{% endfor %}{{ ns.n }}{{ ns.t }}{{ messages | length * 2 }}"
        "{% for k, v in {'a': 1}.items() %}{{ k }}={{ v }}{% else %}none{% endfor %}{{ (messages | tojson)[:20] }}"
    )
    render = ChatRenderer(chat_tokenizer)
    for messages in random_conversations(30, seed=11):
        assert render(messages, "r") == chat_tokenizer.apply_chat_template(messages, tokenize=False)


# ---------------------------------------------------------------- tokenizing only what truncation keeps


def long_text(seed: int, chars: int) -> str:
    import random

    rng = random.Random(seed)
    pieces = ["word", " ", "\n", "\n\n\n", "    ", "🐸", "ünï", "[INST]", "</s>", "1234567", "...", "\t", "ab" * 30]
    out, size = [], 0
    while size < chars:
        piece = rng.choice(pieces)
        out.append(piece)
        size += len(piece)
    return "".join(out)


@pytest.mark.parametrize("max_length", [16, 64, 300])
def test_a_long_example_is_tokenized_only_as_far_as_truncation_needs(tokenizer, max_length: int) -> None:
    local = copy.deepcopy(tokenizer)
    apply_chat_template_choice(local, None)
    for seed in range(6):
        text = long_text(seed, 200_000 if seed % 2 else 60_000)
        if seed == 5:
            text = " " * 40_000 + text  # the first cut holds too few tokens: it doubles
        examples = [
            Example("t:doc", text=text),
            Example(
                "t:chat", messages=({"role": "user", "content": text[:50]}, {"role": "assistant", "content": text})
            ),
            Example("t:completion", text="Prompt: ", completion=text),
        ]
        out = Tokenize(local, train_on="assistant", max_length=max_length)(examples_to_columns(examples))
        for row, example in enumerate(examples):
            ids, labels = tokenize_one(example, local, train_on="assistant")
            assert out["partial"][row] and max_length < out["full_length"][row] < len(ids) / 4, example.source
            assert out["input_ids"][row] == ids[:max_length] and out["labels"][row] == labels[:max_length]


def test_short_examples_are_tokenized_whole_and_too_long_ones_say_so(tokenizer) -> None:
    local = copy.deepcopy(tokenizer)
    apply_chat_template_choice(local, None)
    short = Example("t:1", messages=({"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 40}))
    out = Tokenize(local, train_on="assistant", max_length=16)(examples_to_columns([short]))
    assert out["partial"] == [False] and out["full_length"][0] == len(tokenize_one(short, local, train_on="all")[0])
    huge = Example("t:2", text=long_text(1, 100_000))
    with pytest.raises(DataError, match=r"t:2: more than \d+ tokens, over data\.max_length=16"):
        tokenize_examples([huge], local, max_length=16, train_on="assistant", truncation="error")
    kept = tokenize_examples([huge, short], local, max_length=64, train_on="assistant", truncation="drop")
    assert kept.dropped == ["t:2"] and kept.sources == ["t:1"]


# ---------------------------------------------------------------- special-token strings inside content

QUOTING = (
    {"role": "system", "content": "Never write [INST] yourself."},
    {"role": "user", "content": "What does </s> mean in [INST] tags?"},
    {"role": "assistant", "content": "</s> ends a turn; [INST] opens one."},
)


def special_ids(tokenizer, ids: list[int]) -> list[str]:
    specials = set(tokenizer.all_special_ids) | {tokenizer.convert_tokens_to_ids(t) for t in ("[INST]", "[/INST]")}
    return [tokenizer.convert_ids_to_tokens(i) for i in ids if i in specials]


def quoting_columns(tokenizer) -> tuple:
    """A tokenizer with the chat template installed, and columns of a chat and a document quoting `</s>` and
    `[INST]` in their content, then a plain chat."""
    local = copy.deepcopy(tokenizer)
    apply_chat_template_choice(local, None)
    examples = [
        Example("q:1", messages=QUOTING),
        Example("q:2", text="a </s> b"),
        Example("q:3", messages=CONVERSATION),
    ]
    return local, examples_to_columns(examples)


def test_special_strings_in_content_are_counted_and_become_control_tokens_by_default(tokenizer) -> None:
    local, columns = quoting_columns(tokenizer)
    out = Tokenize(local, train_on="assistant", max_length=512)(columns)
    assert out["special_strings"] == [5, 1, 0]
    assert special_ids(local, out["input_ids"][0]) == ["<s>", "[INST]", "[INST]", "</s>", "[INST]", "[/INST]",
                                                      "</s>", "[INST]", "</s>"]  # fmt: skip
    assert special_ids(local, out["input_ids"][1]) == ["<s>", "</s>", "</s>"]


def test_with_special_strings_text_no_control_token_comes_from_content(tokenizer) -> None:
    local, columns = quoting_columns(tokenizer)
    text = Tokenize(local, train_on="assistant", max_length=512, special_strings="text")(columns)
    control = Tokenize(local, train_on="assistant", max_length=512)(columns)
    assert text["special_strings"] == [5, 1, 0]  # counted in both modes
    assert special_ids(local, text["input_ids"][0]) == ["<s>", "[INST]", "[/INST]", "</s>"]  # the template's only
    assert special_ids(local, text["input_ids"][1]) == ["<s>", "</s>"]  # BOS and the document's own EOS
    assert text["input_ids"][2] == control["input_ids"][2] and text["labels"][2] == control["labels"][2]
    for row in (0, 1):  # the same characters either way
        assert local.decode(text["input_ids"][row]) == local.decode(control["input_ids"][row])
    ids, labels = text["input_ids"][0], text["labels"][0]
    trained = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    assert local.decode(trained) == "</s> ends a turn; [INST] opens one.</s>"  # the mask moved with the tokens
    assert trained.count(local.eos_token_id) == 1
    # Each content string is tokenized as text would be anywhere: what the tokenizer gives with specials as text.
    plain = copy.deepcopy(local.backend_tokenizer)
    plain.encode_special_tokens = True
    assert plain.encode(" a </s> b", add_special_tokens=False).ids == text["input_ids"][1][1:-1]


def test_special_strings_as_text_keep_truncation_exact(tokenizer) -> None:
    local = copy.deepcopy(tokenizer)
    apply_chat_template_choice(local, None)
    document = Example("t:doc", text=long_text(3, 60_000))
    whole = Tokenize(local, train_on="assistant", max_length=1 << 40, special_strings="text")(
        examples_to_columns([document])
    )
    cut = Tokenize(local, train_on="assistant", max_length=300, special_strings="text")(examples_to_columns([document]))
    assert cut["partial"] == [True] and cut["input_ids"][0] == whole["input_ids"][0][:300]
    assert local.eos_token_id not in whole["input_ids"][0][1:-1] and whole["special_strings"][0] > 100
