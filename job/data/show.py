"""What `validate --show N` prints: the first N tokenized examples, decoded, with the trained spans marked.

A token is marked trained when its label is not -100 (the convention of `masking.describe_example`;
the loss shifts labels by one, so position 0 of a sequence never trains). Rows with `seq_lengths`
(packed, or continued-pretraining blocks) are cut back into their pieces. Each example is decoded
once in full; its trained spans and control tokens are located in that text by decoding the
prefixes that end at their edges.
"""

from __future__ import annotations

import os
import sys
import unicodedata
from itertools import pairwise
from typing import Any

from job.data.masking import IGNORE_INDEX

TRAINED_STYLE = "\x1b[1;42m"  # bold on green
CONTROL_STYLE = "\x1b[36m"  # cyan: a control token, not text
TRAINED_CONTROL_STYLE = "\x1b[1;4;42m"  # a trained control token (`</s>`): underlined
RESET = "\x1b[0m"
OPEN, CLOSE = "«", "»"  # without color, as the log's `example_masked`
VISIBLE_WHITESPACE = {"\n", "\t"}


def shown_examples(split: Any, tokenizer: Any, n: int) -> list[dict[str, Any]]:
    """The first `n` examples of `split` (a `DataSplit`) as dicts for `validate --show` and `--json`.

    Keys: `source` (`file:line`; None when packed, for a block's pieces, or unknown), `text` (the whole
    example decoded, control tokens included), `trained` (the decoded text of each trained span, in order),
    `tokens`, `trained_tokens`, and the character ranges [start, end) in `text` of the trained spans
    (`spans`) and control tokens (`control`).
    """
    if n <= 0 or len(split.dataset) == 0:
        return []
    pieces = "seq_lengths" in split.dataset.column_names  # packed rows, or continued-pretraining blocks
    rows = split.dataset.with_format(None)[: min(n, len(split.dataset))]  # such a row holds one example or more
    sources = _sources(split.stats)
    control = _control_ids(tokenizer)
    shown: list[dict[str, Any]] = []
    for row, (ids, labels) in enumerate(zip(rows["input_ids"], rows["labels"], strict=True)):
        start = 0
        for length in rows["seq_lengths"][row] if pieces else [len(ids)]:
            index = len(shown)
            source = sources[index] if index < len(sources) else None
            piece = slice(start, start + length)
            shown.append(describe(tokenizer, ids[piece], labels[piece], source, control))
            start += length
            if len(shown) == n:
                return shown
    return shown


def describe(
    tokenizer: Any, ids: list[int], labels: list[int], source: str | None, control: frozenset[int]
) -> dict[str, Any]:
    """One example as `shown_examples` gives it."""
    text = tokenizer.decode(ids, skip_special_tokens=False)
    runs = _trained_runs(labels)
    edges = {0, len(ids)} | {k for run in runs for k in run}
    edges |= {k + d for k, token in enumerate(ids) if token in control for d in (0, 1)}
    offsets = {k: _offset(tokenizer, ids, k, text) for k in sorted(edges)}
    trained, spans = [], []
    for first, end in runs:
        piece = tokenizer.decode(ids[first:end], skip_special_tokens=False)
        low, high = offsets[first], offsets[end]
        at = text.find(piece, low, high)  # the span alone may decode without the space its first token carries
        trained.append(piece)
        spans.append([at, at + len(piece)] if piece and at >= 0 else [low, high])
    return {
        "source": source,
        "text": text,
        "trained": trained,
        "tokens": len(ids),
        "trained_tokens": sum(label != IGNORE_INDEX for label in labels),
        "spans": spans,
        "control": [[offsets[k], offsets[k + 1]] for k, token in enumerate(ids) if token in control],
    }


def _sources(stats: dict[str, Any]) -> list[str]:
    """`file:line` of the examples shown first, where known: packing reorders examples, and a block's pieces
    are documents cut at block edges (they come after the other examples of the split)."""
    if stats.get("packed"):
        return []
    head = stats.get("sources_head") or []
    return head[: max(0, stats.get("examples", len(head)) - stats.get("documents", 0))]


def _control_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of special (control) tokens: `<s>`, `</s>`, `[INST]`, ... whatever their text."""
    ids = set(getattr(tokenizer, "all_special_ids", []))
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids.update(index for index, token in decoder.items() if getattr(token, "special", False))
    return frozenset(ids)


def _trained_runs(labels: list[int]) -> list[tuple[int, int]]:
    """Maximal runs [first, end) of positions whose label is not IGNORE_INDEX."""
    runs, first = [], None
    for k, label in enumerate(labels):
        if label != IGNORE_INDEX and first is None:
            first = k
        elif label == IGNORE_INDEX and first is not None:
            runs.append((first, k))
            first = None
    if first is not None:
        runs.append((first, len(labels)))
    return runs


def _offset(tokenizer: Any, ids: list[int], k: int, text: str) -> int:
    """Where in `text` the first `k` tokens end: their decoded prefix, or as much of it as `text` shares
    (a cut inside a multi-byte character decodes as U+FFFD in the prefix alone)."""
    if k >= len(ids):
        return len(text)
    prefix = tokenizer.decode(ids[:k], skip_special_tokens=False) if k else ""
    return len(prefix) if text.startswith(prefix) else _shared(prefix, text)


def _shared(a: str, b: str) -> int:
    """Characters `a` and `b` share at their start."""
    return next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


# ---------------------------------------------------------------- terminal


def use_color(stream: Any = None) -> bool:
    """Color on a terminal, unless NO_COLOR is set (https://no-color.org)."""
    stream = stream or sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get("NO_COLOR")


def render_terminal(example: dict[str, Any], color: bool) -> str:
    """A header line, then the example's text with its trained spans marked: green and bold with `color`,
    else between « and »; control tokens in cyan with `color`; other non-printing characters escaped."""
    text = example["text"]
    spans = example.get("spans") or _locate(text, example["trained"])
    control = example.get("control") or []
    source = example.get("source") or "(source not recorded)"
    header = f"── {source} · {example['tokens']} tokens, {example['trained_tokens']} trained ──"
    cuts = sorted({0, len(text), *(p for span in (*spans, *control) for p in span)})
    out = [header, "\n"]
    trained_before = False
    for low, high in pairwise(cuts):
        trained = any(a <= low and high <= b for a, b in spans)
        is_control = any(a <= low and high <= b for a, b in control)
        piece = _visible(text[low:high])
        if not color:
            out.append(piece if trained == trained_before else (OPEN if trained else CLOSE) + piece)
        elif trained or is_control:
            style = (TRAINED_CONTROL_STYLE if is_control else TRAINED_STYLE) if trained else CONTROL_STYLE
            # a background color must not run on past the end of a line
            out.append("\n".join(f"{style}{line}{RESET}" if line else "" for line in piece.split("\n")))
        else:
            out.append(piece)
        trained_before = trained
    if trained_before and not color:
        out.append(CLOSE)
    return "".join(out)


def _locate(text: str, trained: list[str]) -> list[list[int]]:
    """Spans of the trained pieces found in order in `text` (an example without `spans`)."""
    spans, cursor = [], 0
    for piece in trained:
        at = text.find(piece, cursor)
        if piece and at >= 0:
            spans.append([at, at + len(piece)])
            cursor = at + len(piece)
    return spans


def _visible(text: str) -> str:
    """`text` with control characters other than newline and tab escaped: data must not drive the terminal."""
    if text.isprintable() or all(c.isprintable() or c in VISIBLE_WHITESPACE for c in text):
        return text
    return "".join(
        c if c.isprintable() or c in VISIBLE_WHITESPACE or unicodedata.category(c) != "Cc" else repr(c)[1:-1]
        for c in text
    )
