"""Tokenize examples with loss masks that work for any chat template.

Mistral v0.3's template has no `{% generation %}` markers, so TRL's `assistant_only_loss` cannot
find the assistant tokens. Instead they are found by rendering: the text an assistant turn adds is
the tail the conversation gains from the turn before it (with the generation prompt) to that turn;
the tokens whose characters fall inside it are trained. A per-layout shortcut renders each real
conversation once and is checked against the full method (docs/data.md, "Loss masks").
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from job.data.formats import ROW_COLUMNS
from job.data.read import Example
from job.data.special import SpecialStrings
from job.data.templates import DEFAULT_ORIGIN as DEFAULT_ORIGIN
from job.data.templates import PROBE_CALL, PROBE_TOOLS, RENDER_MAX_CHARS, RenderGuard
from job.data.templates import ChatRenderer as ChatRenderer
from job.data.templates import RenderLimitError as RenderLimitError
from job.data.templates import apply_chat_template_choice as apply_chat_template_choice
from job.data.templates import default_chat_template as default_chat_template
from job.data.templates import resolve_chat_template as resolve_chat_template
from job.errors import ConfigError, DataError

IGNORE_INDEX = -100
PROBE = "\ue000{}\ue001"  # private-use characters: never part of a template's own text
VERIFIED_PER_LAYOUT = 8
CHARS_PER_TOKEN = 8
"""A long text is first cut to (max_length + 1) x this many characters (+ margin): twice the ~4 of English
text, so one tokenization usually suffices; too few tokens in it and the cut doubles."""
MIN_MARGIN = 1024


@dataclass
class TokenizedSet:
    input_ids: list[list[int]]
    labels: list[list[int]]
    sources: list[str]
    truncated: int = 0
    dropped: list[str] = field(default_factory=list)
    """Sources of examples dropped: no trainable token left, or too long with `truncation: drop`."""

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.input_ids)

    @property
    def trainable_tokens(self) -> int:
        return sum(sum(1 for label in labels[1:] if label != IGNORE_INDEX) for labels in self.labels)


# ---------------------------------------------------------------- assistant spans


def assistant_spans(
    render: ChatRenderer,
    messages: list[dict],
    text: str,
    source: str,
    prompt_turns: int = 0,
    tools: list | None = None,
) -> list[tuple[int, int]]:
    """Character spans of `text` that each trained assistant turn (content or tool calls + end-of-turn) adds."""
    spans = []
    cursor = 0
    last = len(messages) - 1
    for index in range(prompt_turns, len(messages)):
        if messages[index]["role"] != "assistant":
            continue
        before = render(messages[:index], source, add_generation_prompt=True, tools=tools)
        through = text if index == last else render(messages[: index + 1], source, tools=tools)
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
    that occurs implies its own tails occur, so binary search finds the longest;
    the turn's text follows its last occurrence.
    """
    if through.startswith(before):
        return len(before)
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
    return through.rfind(tail) + low  # the last occurrence: an earlier turn may repeat the same text


@dataclass
class Layout:
    """What the template writes around each trained assistant turn's content, for one sequence of roles."""

    pieces: list[tuple[int, str, str]] | None
    """(turn index, text before the content, text after it); None: always use the full method."""
    verified: int = 0


class SpanFinder:
    """Assistant spans by the full method, or by a probed layout where it is known to agree."""

    def __init__(self, render: ChatRenderer) -> None:
        self.render = render
        self.layouts: dict[tuple, Layout] = {}
        self.fallbacks = 0

    def spans(
        self, messages: list[dict], text: str, source: str, prompt_turns: int, tools: list | None = None
    ) -> list[tuple[int, int]]:
        # The layout depends on the roles, on which turns hold calls (and how many) and on a tool list being there.
        shape = tuple(len(m.get("tool_calls") or ()) for m in messages)
        key = (tuple(m["role"] for m in messages), prompt_turns, shape, bool(tools))
        layout = self.layouts.get(key)
        if layout is None:
            layout = self.layouts[key] = self._probe(list(key[0]), prompt_turns, shape, bool(tools))
        fast = _locate(layout.pieces, messages, text) if layout.pieces is not None else None
        if fast is not None and layout.verified >= VERIFIED_PER_LAYOUT:
            return fast
        exact = assistant_spans(self.render, messages, text, source, prompt_turns, tools)
        if fast is None:
            self.fallbacks += 1
        elif fast != exact:
            layout.pieces = None  # this template's layout depends on content: always the full method
        else:
            layout.verified += 1
        return exact

    def _probe(self, roles: list[str], prompt_turns: int, shape: tuple[int, ...], has_tools: bool) -> Layout:
        if any(shape[prompt_turns:]):  # a call's text is the template's own rendering of it: rendered each time
            return Layout(None)
        probe = [_probe_turn(role, i, shape[i]) for i, role in enumerate(roles)]
        tools = PROBE_TOOLS if has_tools else None
        try:
            text = self.render(probe, "probe", tools=tools)
            spans = assistant_spans(self.render, probe, text, "probe", prompt_turns, tools)
        except DataError:
            return Layout(None)
        trained = [i for i in range(prompt_turns, len(roles)) if roles[i] == "assistant"]
        pieces = []
        for index, (low, high) in zip(trained, spans, strict=True):
            added, content = text[low:high], probe[index]["content"]
            at = added.find(content)
            left, right = added[:at], added[at + len(content) :]
            if at < 0 or PROBE[0] in left + right:  # content altered, or other turns' text inside the span
                return Layout(None)
            pieces.append((index, left, right))
        return Layout(pieces)


def _probe_turn(role: str, index: int, calls: int) -> dict:
    turn: dict = {"role": role, "content": PROBE.format(index)}
    if calls:
        turn["tool_calls"] = [{**PROBE_CALL, "id": f"{index:04d}{k:05d}"} for k in range(calls)]
    if role == "tool":
        turn.update(tool_call_id=PROBE_CALL["id"], name=PROBE_CALL["function"]["name"])
    return turn


def _locate(pieces: list[tuple[int, str, str]], messages: list[dict], text: str) -> list[tuple[int, int]] | None:
    spans, cursor = [], 0
    for index, left, right in pieces:
        needle = left + messages[index]["content"] + right
        start = text.find(needle, cursor)
        if start < 0:
            return None
        cursor = start + len(needle)
        spans.append((start, cursor))
    return spans


# ---------------------------------------------------------------- tokenization


class Tokenize:
    """Batch function for `datasets.map(batched=True)`: columns `messages`/`prompt_turns` (chat), `text`
    (document, or the prompt of a `completion`), `source` → `input_ids`, `labels`, lengths and errors.

    Picklable for worker processes: the renderer, span layouts and tokenizer copy are rebuilt in each.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        train_on: str,
        max_length: int,
        max_invalid: int = 0,
        render_chars: int = RENDER_MAX_CHARS,
        special_strings: str = "control",
    ) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError("the tokenizer has no fast (Rust) implementation, needed for character offsets")
        self.tokenizer = tokenizer
        self.train_on = train_on
        self.max_length = max_length
        self.max_invalid = max_invalid
        self.render_chars = render_chars
        self.special_strings = special_strings
        """`control`: special-token strings in content stay control tokens (counted); `text`: plain text."""
        self.eos = tokenizer.eos_token_id
        self.limit_hits = 0
        self.margin = MIN_MARGIN
        self._state: tuple[Any, ChatRenderer, SpanFinder, int] | None = None
        self._specials: SpecialStrings | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_state": None, "_specials": None}

    def state(self) -> tuple[Any, ChatRenderer, SpanFinder, int]:
        """(backend tokenizer, renderer, span finder, characters a text is first cut to before tokenizing)."""
        if self._state is None:
            from tokenizers import Tokenizer

            backend = self.tokenizer.backend_tokenizer
            if backend.truncation is not None or backend.padding is not None:
                backend = Tokenizer.from_str(backend.to_str())  # a copy: truncation is ours, after the masks
                backend.no_truncation()
                backend.no_padding()
            render = ChatRenderer(self.tokenizer, RenderGuard(max_chars=self.render_chars))
            self.margin = stable_margin(backend)
            budget = (self.max_length + 1) * CHARS_PER_TOKEN + self.margin
            self._state = (backend, render, SpanFinder(render), budget)
            self._specials = SpecialStrings(backend)
        return self._state

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        backend, render, finder, budget = self.state()
        specials = self._specials
        assert specials is not None
        count = len(batch["source"])
        out: dict[str, list] = {k: [None] * count for k in ("input_ids", "labels", "full_length", "error")}
        out["partial"] = [False] * count
        out["special_strings"] = [0] * count
        chats, plain = [], []
        texts: dict[int, str] = {}
        spans: dict[int, list[tuple[int, int]] | None] = {}
        as_text: dict[int, list[tuple[int, int]]] = {}
        conversations = batch.get("messages") or [None] * count
        completions = batch.get("completion") or [None] * count
        tool_lists = batch.get("tools") or [None] * count
        for row in range(count):
            source, messages, tools = batch["source"][row], conversations[row], tool_lists[row]
            if isinstance(messages, str):  # Example.to_row keeps turns (and tools) as JSON text
                messages = json.loads(messages)
            if isinstance(tools, str):
                tools = json.loads(tools)
            try:
                if messages is not None:
                    render.example_deadline = time.monotonic() + render.guard.seconds  # every render of it
                    render.check_tools(messages, tools, source)
                    text = texts[row] = render(messages, source, tools=tools)
                    turns = batch["prompt_turns"][row]
                    keep = self.train_on != "all"
                    spans[row] = finder.spans(messages, text, source, turns, tools) if keep else None
                    found = out["special_strings"][row] = specials.count(messages) + specials.count(tools)
                    if found and self.special_strings == "text":
                        as_text[row] = specials.content_spans(render, messages, tools, text, source)
                    chats.append(row)
                else:
                    completion = completions[row]
                    prompt = batch["text"][row]
                    texts[row] = prompt + (completion or "")
                    trained = completion is not None and self.train_on != "all"
                    spans[row] = [(len(prompt), len(texts[row]))] if trained else None
                    found = out["special_strings"][row] = specials.count(texts[row])
                    if found and self.special_strings == "text":
                        as_text[row] = specials.find(texts[row])
                    plain.append(row)
            except RenderLimitError as exc:
                self.limit_hits += 1
                if self.limit_hits > self.max_invalid:  # the job fails anyway: stop now, not one deadline per record
                    raise
                out["error"][row] = str(exc)
            except DataError as exc:
                out["error"][row] = str(exc)
            finally:
                render.example_deadline = None
        for rows, special in ((chats, False), (plain, True)):
            if rows:
                encoded = self._encode(backend, [texts[r] for r in rows], special, budget)
                for row, (encoding, covered) in zip(rows, encoded, strict=True):
                    if row in as_text:
                        encoding = specials.as_text(encoding, texts[row], covered, as_text[row])
                    kept = spans[row] if covered == len(texts[row]) else _clip_spans(spans[row], covered)
                    ids, labels = _labels(encoding, kept, self.eos if special else None)
                    out["full_length"][row] = len(ids)
                    out["partial"][row] = covered < len(texts[row])
                    out["input_ids"][row], out["labels"][row] = ids[: self.max_length], labels[: self.max_length]
        out["trainable"] = [_trainable(labels) for labels in out["labels"]]
        return out

    def _encode(self, backend: Any, texts: list[str], special: bool, budget: int) -> list[tuple[Any, int]]:
        """(encoding, characters it covers) per text: the whole text, or a prefix holding max_length tokens.

        A text longer than `budget` is tokenized only as far as truncation needs: a prefix, doubled
        until its first max_length + 1 tokens end `margin` characters before the cut, where text after
        the cut cannot change them (docs/data.md, "Truncation"). Shorter texts are tokenized whole.
        """
        pieces = [text if len(text) <= budget else text[:budget] for text in texts]
        encodings = backend.encode_batch(pieces, add_special_tokens=special)
        out = []
        for text, piece, encoding in zip(texts, pieces, encodings, strict=True):
            size = len(piece)
            while size < len(text) and not _holds(encoding, self.max_length + 1, size - self.margin):
                size = min(len(text), size * 2)
                encoding = backend.encode(text[:size], add_special_tokens=special)
            out.append((encoding, size))
        return out


def stable_margin(backend: Any) -> int:
    """Characters before a cut where tokens are taken as final: several times the longest token, at least 1024."""
    longest = max((len(token) for token in backend.get_vocab(with_added_tokens=True)), default=0)
    return max(MIN_MARGIN, 4 * longest)


def _holds(encoding: Any, tokens: int, end: int) -> bool:
    """Whether the encoding's first `tokens` tokens all end by character `end`."""
    offsets = encoding.offsets
    return len(offsets) >= tokens and max(stop for _, stop in offsets[:tokens]) <= end


def _clip_spans(spans: list[tuple[int, int]] | None, size: int) -> list[tuple[int, int]] | None:
    """Trained spans within the first `size` characters (the part tokenized)."""
    if spans is None:
        return None
    return [(low, min(high, size)) for low, high in spans if low < size]


def _labels(encoding: Any, spans: list[tuple[int, int]] | None, eos: int | None) -> tuple[list[int], list[int]]:
    """Token ids and labels: the tokens overlapping `spans` (every token when None); plus a trained EOS."""
    ids: list[int] = encoding.ids
    if spans is None:
        labels = list(ids)
    else:
        labels = [IGNORE_INDEX] * len(ids)
        for low, high in spans:
            first, last = _token_range(encoding, low, high, len(ids))
            labels[first : last + 1] = ids[first : last + 1]
    if eos is not None and (not ids or ids[-1] != eos):  # documents and completions end, so the model learns to stop
        ids, labels = [*ids, eos], [*labels, eos]
    return ids, labels


def _token_range(encoding: Any, low: int, high: int, count: int) -> tuple[int, int]:
    """First and last token overlapping characters [low, high); (0, -1) when none does."""
    first = next((t for p in range(low, high) if (t := encoding.char_to_token(p)) is not None), None)
    last = next((t for p in range(high - 1, low - 1, -1) if (t := encoding.char_to_token(p)) is not None), None)
    if first is None or last is None:
        return 0, -1
    # Byte-fallback pieces of one character share its offsets: widen over them at both edges.
    while first > 0 and (chars := encoding.token_to_chars(first - 1)) is not None and chars[1] > low:
        first -= 1
    while last + 1 < count and (chars := encoding.token_to_chars(last + 1)) is not None and chars[0] < high:
        last += 1
    return first, last


def _trainable(labels: list[int] | None) -> int:
    """Labels that take a loss: the first position predicts nothing (labels shift by one)."""
    if not labels:
        return 0
    return len(labels) - labels.count(IGNORE_INDEX) - (labels[0] != IGNORE_INDEX)


def examples_to_columns(examples: list[Example]) -> dict[str, list]:
    """Columns for `Tokenize` (and an Arrow table of `ROW_COLUMNS`): each example's `to_row()`."""
    rows = [e.to_row() for e in examples]
    return {name: [row[name] for row in rows] for name in ROW_COLUMNS}


def tokenize_one(example: Example, tokenizer: Any, *, train_on: str) -> tuple[list[int], list[int]]:
    """Token ids and labels of one example, untruncated (DataError if the template rejects it)."""
    result = Tokenize(tokenizer, train_on=train_on, max_length=1 << 62)(examples_to_columns([example]))
    if result["error"][0]:
        raise DataError(result["error"][0])
    return result["input_ids"][0], result["labels"][0]


def tokenize_examples(
    examples: list[Example], tokenizer: Any, *, max_length: int, train_on: str, truncation: str = "truncate"
) -> TokenizedSet:
    """Token ids and labels (IGNORE_INDEX where no loss is taken) for every example, in this process."""
    out = Tokenize(tokenizer, train_on=train_on, max_length=max_length)(examples_to_columns(examples))
    result = TokenizedSet(input_ids=[], labels=[], sources=[])
    for row, example in enumerate(examples):
        if out["error"][row]:
            raise DataError(out["error"][row])
        too_long = out["full_length"][row] > max_length
        if too_long and truncation == "error":
            raise DataError(f"{example.source}: {length_text(out, row)}, over data.max_length={max_length}")
        result.truncated += too_long
        if (too_long and truncation == "drop") or not out["trainable"][row]:
            result.dropped.append(example.source)
            continue
        result.input_ids.append(out["input_ids"][row])
        result.labels.append(out["labels"][row])
        result.sources.append(example.source)
    if not result.input_ids:
        raise DataError(f"no example keeps a trainable token within data.max_length={max_length}")
    return result


def length_text(out: dict[str, list], row: int) -> str:
    """`N tokens`, or `more than N tokens` where only a prefix of the example was tokenized."""
    return f"{'more than ' if out['partial'][row] else ''}{out['full_length'][row]} tokens"


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
