"""Record formats: detect each record's format and normalise it into an `Example`.

Every format (`messages`, `sharegpt`, `prompt_completion`, `alpaca`, `text`; the table in
docs/data.md) becomes one of three shapes: a chat (`messages`, with the number of leading turns
that are context only, and the tools it offers), a plain document (`text`), or a string prompt
with its completion. Tool calls are normalised in `job.data.tools`. Each check names the record's
location (`file:line` or `file:row N`) and the field at fault.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from job.data import tools as tool_use
from job.errors import DataError
from job.logs import shorten

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "function_call": "assistant",  # LLaMA-Factory's tool-call convention: trained, as LLaMA-Factory trains it
    "observation": "tool",
    "tool": "tool",
}

# Checked in this order; the first whose fields are all present names the record's format.
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
EXPECTED = "; ".join(f"{name} ({', '.join(fields)})" for name, fields in FORMAT_FIELDS.items())
ECHO_LIMIT = 300
"""Characters of a record's value quoted in a message: enough to recognise it, never a 1 MB line."""


def clip(text: str, limit: int = ECHO_LIMIT) -> str:
    """`text` cut to `limit` characters, saying how many were cut (`job.logs.shorten`, which also masks URL
    credentials)."""
    return shorten(text, limit)


@dataclass(frozen=True, slots=True)
class Example:
    source: str
    """Where the record came from: `file:line` (or `file:row N` for Parquet)."""
    messages: tuple[dict[str, Any], ...] | None = None
    """Chat turns with `role` and string `content` (parts already joined); assistant turns may carry
    `tool_calls` and `tool` turns `tool_call_id` and `name` (OpenAI's form, `job.data.tools`)."""
    text: str | None = None
    """A plain document (the `text` format), or the prompt of a string prompt/completion pair."""
    completion: str | None = None
    """The completion of a string prompt/completion pair (trained; `text` is its prompt)."""
    prompt_turns: int = 0
    """Chat: leading turns that are context only (a conversational prompt); later assistant turns train."""
    tools: str | None = None
    """Chat: the tools the conversation offers, as JSON text of a list (OpenAI's function schema), or None."""

    def to_row(self) -> dict[str, Any]:
        """This example as one row of `ROW_COLUMNS`: turns as JSON text, so turns of any shape share one column."""
        return {
            "source": self.source,
            "messages": None if self.messages is None else json.dumps(list(self.messages), ensure_ascii=False),
            "prompt_turns": self.prompt_turns,
            "text": self.text,
            "completion": self.completion,
            "tools": self.tools,
        }

    @property
    def kind(self) -> str:
        """`chat`, `text` or `completion`: how the example is tokenized."""
        if self.messages is not None:
            return "chat"
        return "completion" if self.completion is not None else "text"


ROW_COLUMNS = {
    "source": "string",
    "messages": "string",
    "prompt_turns": "int32",
    "text": "string",
    "completion": "string",
    "tools": "string",
}
"""An Example's row (`Example.to_row`): column name and Arrow value type; `messages`/`tools` hold JSON text."""


def row_features() -> Any:
    """`datasets.Features` of `ROW_COLUMNS`."""
    import datasets

    return datasets.Features({name: datasets.Value(kind) for name, kind in ROW_COLUMNS.items()})


def detect_format(record: Any) -> str | None:
    """The format whose fields the record has, or None."""
    if not isinstance(record, dict):
        return None
    for name, fields in FORMAT_FIELDS.items():
        if all(f in record for f in fields):
            return name
    return None


def describe_unknown(record: Any, location: str) -> DataError:
    found = clip(str(sorted(record))) if isinstance(record, dict) else type(record).__name__
    return DataError(
        f"{location}: cannot tell the record's format: found fields {found}; expected one of: {EXPECTED}",
        hint="or set data.format",
    )


def parse_record(record: Any, fmt: str, location: str) -> Example:
    """The record as an Example, or DataError naming the location and what is wrong."""
    if not isinstance(record, dict):
        raise DataError(f"{location}: expected a JSON object, got {type(record).__name__}")
    missing = [f for f in FORMAT_FIELDS.get(fmt, ()) if f not in record]
    if missing:
        other = detect_format(record)
        found = f"; it looks like `{other}`" if other else f"; found fields {clip(str(sorted(record)))}"
        raise DataError(f"{location}: format `{fmt}` needs field(s) {missing}{found}")
    if fmt == "text":
        return Example(source=location, text=_string(record, "text", location))
    if fmt == "messages":
        tools = tool_use.parse_tools(record.get("tools"), location)
        turns = _turns(record["messages"], "messages", location, "role", "content", None)
        return Example(source=location, messages=_check_chat(turns, location, "messages", tools), tools=tools)
    if fmt == "sharegpt":
        tools = tool_use.parse_tools(record.get("tools"), location)
        turns = _turns(record["conversations"], "conversations", location, "from", "value", SHAREGPT_ROLES)
        turns = _system_column(record, turns, location)
        return Example(source=location, messages=_check_chat(turns, location, "conversations", tools), tools=tools)
    if fmt == "alpaca":
        return _alpaca(record, location)
    if fmt == "prompt_completion":
        return _prompt_completion(record, location)
    raise DataError(f"{location}: unsupported format {fmt!r}")


def _string(record: dict, key: str, location: str, *, optional: bool = False) -> str:
    value = record.get(key)
    if optional and value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{location}: field '{key}' must be a string, got {type(value).__name__}")
    if not optional and not value.strip():
        raise DataError(f"{location}: field '{key}' is empty")
    return _utf8(value, f"{location}: field '{key}'")


def _utf8(text: str, where: str) -> str:
    """JSON's \\ud800-style escapes can smuggle lone surrogates, which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        surrogate = text[exc.start]
        raise DataError(f"{where}: invalid UTF-8 (lone surrogate {surrogate!r} at character {exc.start})") from None
    return text


def _turns(
    turns: Any, key: str, location: str, role_key: str, content_key: str, role_map: dict[str, str] | None
) -> list[dict[str, Any]]:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{location}: '{key}' must be a non-empty list of turns")
    out = []
    for index, turn in enumerate(turns):
        where = f"{location}: {key}[{index}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where} must be an object with {role_key} and {content_key}")
        role = turn.get(role_key)
        allowed = role_map or dict.fromkeys(ROLES)
        if not isinstance(role, str) or role not in allowed:
            raise DataError(f"{where}: {role_key} {clip(repr(role))} is not one of {', '.join(allowed)}")
        out.append(_turn(turn, role, role_map[role] if role_map else role, where, content_key))
    return out


def _turn(turn: dict, role: str, mapped: str, where: str, content_key: str) -> dict[str, Any]:
    """One turn normalised: `role`, `content`, and the tool fields of tool use (`job.data.tools`)."""
    if role == "function_call":
        value = _utf8(_content_text(turn.get(content_key), where, content_key), where)
        return {"role": "assistant", "content": "", "tool_calls": tool_use.sharegpt_calls(value, where)}
    if mapped == "tool":
        raw = turn.get(content_key)
        is_parts = isinstance(raw, list) and raw and all(isinstance(p, dict) and "text" in p for p in raw)
        content = _content_text(raw, where, content_key) if is_parts else tool_use.tool_result(raw)
        out = {"role": "tool", "content": _utf8(content, where)}  # a result may be empty: the call returned nothing
        out.update({k: turn[k] for k in ("tool_call_id", "name") if turn.get(k) is not None})
        return out
    calls = turn.get("tool_calls") if mapped == "assistant" else None
    if calls is not None:  # OpenAI: content may be empty or null beside the calls
        raw = turn.get(content_key)
        content = "" if raw is None else _content_text(raw, where, content_key)
        calls = tool_use.openai_calls(calls, where)
        return {"role": "assistant", "content": _utf8(content, where), "tool_calls": calls}
    content = _content_text(turn.get(content_key), where, content_key)
    if not content.strip():
        raise DataError(f"{where}: empty content")
    return {"role": mapped, "content": _utf8(content, where)}


def _content_text(content: Any, where: str, key: str) -> str:
    """A string, or a list of `{"type": "text", "text": ...}` parts joined together."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise DataError(f"{where}: content parts must be {{'type': 'text', 'text': str}}, got {part!r:.60}")
        return "".join(texts)
    raise DataError(f"{where}: {key} must be a string or a list of text parts, got {type(content).__name__}")


def _check_chat(
    turns: list[dict[str, Any]], location: str, key: str, tools: str | None = None, *, trained_from: int = 0
) -> tuple[dict[str, Any], ...]:
    """Optional system turn first, then user and assistant alternating from user (with tool calls and their
    results between, `job.data.tools`); some assistant turn trains."""
    if any(tool_use.is_tool_turn(t) for t in turns):
        return tool_use.finish_tool_chat(turns, location, key, tools, trained_from=trained_from)
    offset = 1 if turns[0]["role"] == "system" else 0
    for index in range(offset, len(turns)):
        expected = "user" if (index - offset) % 2 == 0 else "assistant"
        if turns[index]["role"] != expected:
            raise DataError(
                f"{location}: {key}[{index}] is '{turns[index]['role']}' where '{expected}' was expected",
                hint="after an optional system turn, turns alternate user/assistant",
            )
    if not any(t["role"] == "assistant" for t in turns[trained_from:]):
        where = "the completion" if trained_from else "conversation"
        raise DataError(f"{location}: {where} has no assistant turn, so nothing would be trained")
    return tuple(turns)


def _system_column(record: dict, turns: list[dict[str, Any]], location: str) -> list[dict[str, Any]]:
    """sharegpt's `system` field (LLaMA-Factory) becomes the system turn; a conversation that has its own
    system turn as well must not have a different one, since one of them would be dropped."""
    system = _string(record, "system", location, optional=True)
    if not system.strip():
        return turns
    if turns[0]["role"] == "system":
        if turns[0]["content"] != system:
            raise DataError(
                f"{location}: both the 'system' field and conversations[0] are system prompts, and they differ",
                hint="keep one of them",
            )
        return turns
    return [{"role": "system", "content": system}, *turns]


def _alpaca(record: dict, location: str) -> Example:
    instruction = _string(record, "instruction", location)
    extra = _string(record, "input", location, optional=True)
    output = _string(record, "output", location)
    system = _string(record, "system", location, optional=True)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    turns = ({"role": "system", "content": system},) if system.strip() else ()
    turns += _history(record.get("history"), location)
    turns += ({"role": "user", "content": user}, {"role": "assistant", "content": output})
    return Example(source=location, messages=turns)


def _history(history: Any, location: str) -> tuple[dict[str, str], ...]:
    """alpaca's `history`: earlier [instruction, response] pairs (LLaMA-Factory), turns before the record's own;
    their responses train too, as LLaMA-Factory trains them by default."""
    if history is None or history == []:
        return ()
    if not isinstance(history, list):
        raise DataError(f"{location}: 'history' must be a list of [instruction, response] pairs")
    turns: tuple[dict[str, str], ...] = ()
    for index, pair in enumerate(history):
        where = f"{location}: history[{index}]"
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise DataError(f"{where} must be a pair [instruction, response] of strings, got {clip(repr(pair))}")
        if not pair[0].strip() or not pair[1].strip():
            raise DataError(f"{where}: empty {'instruction' if not pair[0].strip() else 'response'}")
        turns += ({"role": "user", "content": _utf8(pair[0], where)},)
        turns += ({"role": "assistant", "content": _utf8(pair[1], where)},)
    return turns


def _prompt_completion(record: dict, location: str) -> Example:
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        return Example(
            source=location,
            text=_string(record, "prompt", location),
            completion=_string(record, "completion", location),
        )
    if isinstance(prompt, list) and isinstance(completion, list):
        tools = tool_use.parse_tools(record.get("tools"), location)
        head = _turns(prompt, "prompt", location, "role", "content", None)
        tail = _turns(completion, "completion", location, "role", "content", None)
        if tail[0]["role"] != "assistant":
            raise DataError(f"{location}: completion[0] is '{tail[0]['role']}' where 'assistant' was expected")
        turns = _check_chat(head + tail, location, "prompt+completion", tools, trained_from=len(head))
        return Example(source=location, messages=turns, prompt_turns=len(head), tools=tools)
    raise DataError(
        f"{location}: 'prompt' and 'completion' must both be strings or both be lists of turns, "
        f"got {type(prompt).__name__} and {type(completion).__name__}"
    )
