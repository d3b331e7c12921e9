"""Tokenize examples with loss masks that work for any chat template.

Mistral v0.3's template has no `{% generation %}` markers, so TRL's
`assistant_only_loss` cannot find the assistant tokens. Instead we find them
by rendering: the text an assistant turn adds is what follows, in the
conversation rendered up to and including that turn, the longest tail of the
conversation rendered up to the turn before it (with the generation prompt).
That text (the content plus the template's end-of-turn token) is located in
the full rendering, and the tokens whose character offsets fall inside it are
trained. Templates that move earlier parts around (Mistral's puts the system
prompt into the last user turn) are handled, since only a shared tail is
required, not a shared prefix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from job.data import Example
from job.errors import ConfigError, DataError
from job.logs import get_logger

log = get_logger(__name__)

IGNORE_INDEX = -100


@dataclass
class TokenizedSet:
    input_ids: list[list[int]]
    labels: list[list[int]]
    sources: list[str]
    truncated: int = 0
    dropped: list[str] = field(default_factory=list)
    """Sources of examples left with no trainable token after truncation."""

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.input_ids)

    @property
    def trainable_tokens(self) -> int:
        return sum(sum(1 for label in labels if label != IGNORE_INDEX) for labels in self.labels)


def default_chat_template() -> str:
    """The Mistral v3 ([INST] ... [/INST]) template shipped with the job."""
    return resources.files("job.assets").joinpath("mistral-v3-chat-template.jinja").read_text(encoding="utf-8")


def apply_chat_template_choice(tokenizer: Any, configured: str | None) -> str:
    """Install the chat template to use on `tokenizer`; returns where it came from."""
    if configured:
        template = Path(configured).read_text(encoding="utf-8") if os.path.isfile(configured) else configured
        if "{" not in template:
            raise ConfigError(f"data.chat_template {configured!r} is neither a readable file nor a Jinja template")
        tokenizer.chat_template = template
        return "config"
    if getattr(tokenizer, "chat_template", None):
        return "tokenizer"
    tokenizer.chat_template = default_chat_template()
    log.warning("chat_template_default_used", reason="the tokenizer has no chat template", template="mistral-v3")
    return "default-mistral-v3"


def tokenize_examples(examples: list[Example], tokenizer: Any, *, max_length: int, train_on: str) -> TokenizedSet:
    """Token ids and labels (IGNORE_INDEX where no loss is taken) for every example."""
    result = TokenizedSet(input_ids=[], labels=[], sources=[])
    for example in examples:
        ids, labels = tokenize_one(example, tokenizer, train_on=train_on)
        if len(ids) > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
            result.truncated += 1
        if all(label == IGNORE_INDEX for label in labels):
            result.dropped.append(example.source)
            continue
        result.input_ids.append(ids)
        result.labels.append(labels)
        result.sources.append(example.source)
    if result.truncated or result.dropped:
        log.warning(
            "examples_truncated",
            truncated=result.truncated,
            dropped_without_trainable_tokens=len(result.dropped),
            max_length=max_length,
        )
    if not result.input_ids:
        raise DataError(f"no example keeps a trainable token within data.max_length={max_length}")
    return result


def tokenize_one(example: Example, tokenizer: Any, *, train_on: str) -> tuple[list[int], list[int]]:
    if example.text is not None:
        ids = tokenizer(example.text, add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = [*ids, tokenizer.eos_token_id]  # documents end, so the model learns to stop
        return ids, list(ids)
    messages = [dict(turn) for turn in example.messages or ()]
    text = _render(tokenizer, messages, example.source)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = encoded["input_ids"]
    if train_on == "all":
        return ids, list(ids)
    spans = assistant_spans(tokenizer, messages, text, example.source)
    labels = [
        token if any(end > lo and start < hi for lo, hi in spans) else IGNORE_INDEX
        for token, (start, end) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    return ids, labels


def assistant_spans(tokenizer: Any, messages: list[dict], text: str, source: str) -> list[tuple[int, int]]:
    """Character spans of `text` that each assistant turn (content + end-of-turn) contributes."""
    spans = []
    cursor = 0
    for index, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:index], source, add_generation_prompt=True)
        through = _render(tokenizer, messages[: index + 1], source)
        added = through[_end_of_shared_tail(before, through) :]
        start = text.find(added, cursor)
        if not added or start < 0:
            raise DataError(
                f"{source}: the chat template renders assistant turn {index} differently inside the full "
                "conversation, so its tokens cannot be located",
                hint="check data.chat_template, or use data.train_on: all",
            )
        spans.append((start, start + len(added)))
        cursor = start + len(added)
    return spans


def _end_of_shared_tail(before: str, through: str) -> int:
    """Where, in `through`, the longest tail of `before` that it contains ends.

    Usually `before` is a prefix of `through` and this is `len(before)`. A tail
    that occurs implies its own tails occur, so binary search finds the longest.
    """
    low, high = 0, len(before)
    while low < high:
        mid = (low + high + 1) // 2
        if before[len(before) - mid :] in through:
            low = mid
        else:
            high = mid - 1
    if low == 0:
        return 0
    tail = before[len(before) - low :]
    return through.find(tail) + low


def _render(tokenizer: Any, messages: list[dict], source: str, add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja raises TemplateError and plain exceptions from raise_exception()
        raise DataError(f"{source}: the chat template rejected this conversation: {exc}") from None


def describe_example(tokenizer: Any, input_ids: list[int], labels: list[int]) -> str:
    """The example decoded, trained parts between «» so a human can check the mask."""
    pieces, current, trained = [], [], None
    for token, label in zip(input_ids, labels, strict=True):
        is_trained = label != IGNORE_INDEX
        if trained is not None and is_trained != trained:
            pieces.append(_segment(tokenizer, current, trained))
            current = []
        current.append(token)
        trained = is_trained
    if current:
        pieces.append(_segment(tokenizer, current, bool(trained)))
    return "".join(pieces)


def _segment(tokenizer: Any, tokens: list[int], trained: bool) -> str:
    text = tokenizer.decode(tokens, skip_special_tokens=False)
    return f"«{text}»" if trained else text
