"""Special-token strings inside record content (`</s>`, `[INST]`, any added special token of the tokenizer).

A tokenizer turns such a string into its control token wherever it occurs, so a record that quotes
`</s>` would teach the model to stop there. `Tokenize` counts them per record (content only, not
the template's own control tokens). With `data.special_strings: text` they are tokenized as the
plain characters they are, as mistral-common does, while the template's control tokens stay: the
text between two control tokens that holds one is tokenized again with special tokens read as text.
"""

from __future__ import annotations

import bisect
import itertools
import json
import re
from typing import Any

from job.errors import DataError

MARK = "\ue020{}\ue021"  # private-use characters around an index: stands for a content string while rendering
MARKED = re.compile("\ue020(\\d+)\ue021")
Span = tuple[int, int]
NOT_CONTENT = frozenset({"role", "id", "type", "tool_call_id"})
"""Turn fields that are structure, not text the record's author wrote."""


class SpecialStrings:
    """Finds the tokenizer's special-token strings in text, and re-tokenizes content ones as plain text."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        specials = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special and t.content}
        self.ids = frozenset(specials.values())
        self.pattern = re.compile(_trie_pattern(specials)) if specials else None
        self._plain: tuple[Any, Any] | None = None

    def find(self, text: str) -> list[Span]:
        """Character spans of the special-token strings in `text`, left to right, longest match first (as the
        tokenizer matches them)."""
        return [] if self.pattern is None else [m.span() for m in self.pattern.finditer(text)]

    def count(self, value: Any) -> int:
        """Occurrences in every text of a record's content: turn contents, calls, results, the tool list."""
        if isinstance(value, str):
            return len(self.find(value))
        if isinstance(value, dict):
            return sum(self.count(v) for k, v in value.items() if k not in NOT_CONTENT)
        if isinstance(value, (list, tuple)):
            return sum(self.count(v) for v in value)
        return 0

    def mark(self, value: Any, strings: list[str]) -> Any:
        """`value` with each special string in content replaced by a marker; `strings` collects them in order."""
        if isinstance(value, str):
            out, last = [], 0
            for low, high in self.find(value):
                out += [value[last:low], MARK.format(len(strings))]
                strings.append(value[low:high])
                last = high
            return "".join(out) + value[last:] if out else value
        if isinstance(value, dict):
            return {k: v if k in NOT_CONTENT else self.mark(v, strings) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.mark(v, strings) for v in value]
        return value

    def content_spans(self, render: Any, messages: list, tools: list | None, text: str, source: str) -> list[Span]:
        """Where `text` (the conversation as `render`, a `ChatRenderer`, wrote it) holds special strings from
        content: found by rendering it once more with markers in their place."""
        strings: list[str] = []
        marked_text = render(self.mark(messages, strings), source, tools=self.mark(tools, strings) if tools else None)
        spans, pieces, shift, last = [], [], 0, 0
        for match in MARKED.finditer(marked_text):
            index = int(match.group(1))
            if index >= len(strings):
                break
            low = match.start() + shift
            pieces += [marked_text[last : match.start()], strings[index]]
            spans.append((low, low + len(strings[index])))
            shift += len(strings[index]) - (match.end() - match.start())
            last = match.end()
        pieces.append(marked_text[last:])
        if "".join(pieces) != text:
            raise DataError(
                f"{source}: the chat template alters the special-token strings in this record's content, so they "
                "cannot be told from its own control tokens",
                hint="set data.special_strings: control, or fix the record",
            )
        return spans

    # ------------------------------------------------------------ tokenizing them as text

    def plain_backends(self) -> tuple[Any, Any]:
        """Copies of the tokenizer reading special strings as text: for the text's first segment, and for a
        segment after a control token (where a Metaspace `first` scheme prepends nothing)."""
        if self._plain is None:
            from tokenizers import Tokenizer

            raw = json.loads(self.backend.to_str())
            first = Tokenizer.from_str(json.dumps(raw))
            later = Tokenizer.from_str(json.dumps(_never_prepend(raw)))
            for backend in (first, later):
                backend.encode_special_tokens = True
                backend.no_truncation()
                backend.no_padding()
            self._plain = (first, later)
        return self._plain

    def as_text(self, encoding: Any, text: str, covered: int, content: list[Span]) -> Encoded:
        """`encoding` (of `text[:covered]`) with every control token that spells content re-tokenized as text:
        each segment between the remaining control tokens that holds one is tokenized again, in its place."""
        first, later = self.plain_backends()
        inside = {span for span in content if span[1] <= covered}
        ids, offsets = list(encoding.ids), list(encoding.offsets)
        kept = [j for j, (i, o) in enumerate(zip(ids, offsets, strict=True)) if i in self.ids and o not in inside]
        out_ids: list[int] = []
        out_offsets: list[tuple[int, int]] = []
        bounds = [-1, *kept, len(ids)]
        for left, right in itertools.pairwise(bounds):
            low = offsets[left][1] if left >= 0 else 0
            high = offsets[right][0] if right < len(ids) else covered
            if any(low <= a and b <= high for a, b in inside):
                backend = first if low == 0 else later
                again = backend.encode(text[low:high], add_special_tokens=False)
                out_ids += again.ids
                out_offsets += [(a + low, b + low) for a, b in again.offsets]
            else:
                out_ids += ids[left + 1 : right]
                out_offsets += offsets[left + 1 : right]
            if right < len(ids):
                out_ids.append(ids[right])
                out_offsets.append(offsets[right])
        return Encoded(out_ids, out_offsets)


def _trie_pattern(strings: Any) -> str:
    """A regex matching any of `strings`, longest first, as a trie: one pass whatever their number (a plain
    alternation of the ~750 special tokens of Mistral v3 tries each one at every candidate position)."""
    trie: dict = {}
    for string in strings:
        node = trie
        for char in string:
            node = node.setdefault(char, {})
        node[""] = {}

    def build(node: dict) -> str:
        branches = [re.escape(char) + build(child) for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        if "" in node:  # a string ends here: the longer ones are tried first, greedily
            return f"(?:{body})?"
        return body

    return build(trie)


def _never_prepend(raw: Any) -> Any:
    """The tokenizer's JSON with every Metaspace `prepend_scheme: first` set to `never`."""
    if isinstance(raw, dict):
        out = {k: _never_prepend(v) for k, v in raw.items()}
        if out.get("type") == "Metaspace" and out.get("prepend_scheme") == "first":
            out["prepend_scheme"] = "never"
        return out
    if isinstance(raw, list):
        return [_never_prepend(v) for v in raw]
    return raw


class Encoded:
    """The parts of a `tokenizers.Encoding` that masking reads, for a spliced token sequence."""

    def __init__(self, ids: list[int], offsets: list[Span]) -> None:
        self.ids = ids
        self.offsets = offsets
        self._starts = [low for low, _ in offsets]

    def char_to_token(self, char: int) -> int | None:
        """The first token whose characters hold `char` (bisect: a long document costs no per-character map)."""
        index = bisect.bisect_right(self._starts, char) - 1
        while index > 0 and self.offsets[index][0] > char:  # offsets out of order: never in practice, but safe
            index -= 1
        if index < 0 or not self.offsets[index][0] <= char < self.offsets[index][1]:
            return None
        while index > 0 and self.offsets[index - 1][0] == self.offsets[index][0] and self.offsets[index - 1][1] > char:
            index -= 1  # byte-fallback pieces of one character share its offsets
        return index

    def token_to_chars(self, index: int) -> Span | None:
        return self.offsets[index]
