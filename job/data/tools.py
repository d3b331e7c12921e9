"""Tool calls in records, in both conventions, normalised into one shape (OpenAI's).

OpenAI messages carry a top-level `tools` list, assistant turns with `tool_calls` and `tool` turns
with the results; sharegpt (LLaMA-Factory's convention) has `function_call` and `observation`
turns and `tools` as JSON text. Both become assistant turns with `tool_calls` (arguments parsed to
a JSON object, ids of 9 alphanumeric characters as Mistral v3 needs) and `tool` turns naming the
call they answer. Every check names the record's location and the field at fault.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from job.errors import DataError

CALL_ID = re.compile(r"[A-Za-z0-9]{9}")
"""Mistral v3's call ids (mistral-common, and the Hub template's check): 9 alphanumeric characters."""
ID_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
ORDER_HINT = (
    "after an optional system turn: a user turn, then an assistant turn; an assistant turn with tool calls is "
    "followed by their tool results, then by an assistant turn"
)


def _clip(value: Any, limit: int = 120) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


# ---------------------------------------------------------------- the tool list


def parse_tools(value: Any, where: str) -> str | None:
    """The record's `tools` (a list, or JSON text of one, as LLaMA-Factory writes it) as JSON text of OpenAI
    function tools `[{"type": "function", "function": {name, description, parameters}}]`; None when absent."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: 'tools' is not valid JSON: {exc.msg} (character {exc.pos})") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise DataError(f"{where}: 'tools' must be a list of tools, got {type(value).__name__}")
    tools = [_tool(tool, f"{where}: tools[{index}]") for index, tool in enumerate(value)]
    return _json(tools) if tools else None


def _tool(tool: Any, where: str) -> dict:
    """`{"type": "function", "function": {...}}`, or the bare function (LLaMA-Factory), in OpenAI's form."""
    if isinstance(tool, dict) and tool.get("type", "function") == "function" and isinstance(tool.get("function"), dict):
        function = tool["function"]
    elif isinstance(tool, dict) and "function" not in tool:
        function = tool
    else:
        raise DataError(f"{where} must be a function tool {{'type': 'function', 'function': {{'name': ...}}}}")
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"{where}: the function has no name")
    out = {"name": name}
    if "description" in function:
        out["description"] = function["description"]
    if "parameters" in function:
        if not isinstance(function["parameters"], dict):
            raise DataError(f"{where}: 'parameters' must be a JSON schema object")
        out["parameters"] = function["parameters"]
    out.update({k: v for k, v in function.items() if k not in out})
    return {"type": "function", "function": out}


def tool_names(tools: str | None) -> set[str] | None:
    """Names of the functions in `tools` (JSON text from `parse_tools`); None when there is no list."""
    return None if tools is None else {tool["function"]["name"] for tool in json.loads(tools)}


# ---------------------------------------------------------------- turns


def is_tool_turn(turn: dict) -> bool:
    """Whether a normalised turn belongs to tool use: a `tool` result or an assistant turn with calls."""
    return turn["role"] == "tool" or bool(turn.get("tool_calls"))


def call(name: Any, arguments: Any, where: str, call_id: Any = None) -> dict:
    """One call in OpenAI's form; `arguments` a JSON object or JSON text of one."""
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"{where}: the call has no function name")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{where}: arguments of '{name}' are not valid JSON: {exc.msg} (character {exc.pos}): "
                f"{_clip(arguments)}"
            ) from None
    elif arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise DataError(f"{where}: arguments of '{name}' must be a JSON object, got {_clip(_json(arguments))}")
    out: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if call_id is not None:
        out["id"] = str(call_id)
    return out


def openai_calls(value: Any, where: str) -> list[dict]:
    """An assistant turn's `tool_calls`: `[{"id", "type": "function", "function": {"name", "arguments"}}]`."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: 'tool_calls' must be a non-empty list of calls")
    calls = []
    for index, item in enumerate(value):
        at = f"{where}.tool_calls[{index}]"
        if not isinstance(item, dict):
            raise DataError(f"{at} must be an object with 'function'")
        function = item.get("function", item)  # a bare {"name", "arguments"} is accepted too
        if not isinstance(function, dict):
            raise DataError(f"{at}: 'function' must be an object with 'name' and 'arguments'")
        calls.append(call(function.get("name"), function.get("arguments"), at, item.get("id")))
    return calls


def sharegpt_calls(value: str, where: str) -> list[dict]:
    """A `function_call` turn's value: JSON of `{"name", "arguments"}` or of a list of them."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: function_call is not valid JSON: {exc.msg} (character {exc.pos})") from None
    items = parsed if isinstance(parsed, list) else [parsed]
    if not items or not all(isinstance(item, dict) for item in items):
        raise DataError(f"{where}: function_call must be JSON of {{'name', 'arguments'}} or a list of them")
    return [call(it.get("name"), it.get("arguments"), f"{where}[{i}]", it.get("id")) for i, it in enumerate(items)]


def tool_result(content: Any) -> str:
    """A tool turn's content: text, or a JSON value written as JSON text."""
    if content is None:
        return ""
    return content if isinstance(content, str) else _json(content)


# ---------------------------------------------------------------- a conversation with tools


def finish_tool_chat(
    turns: list[dict], location: str, key: str, tools: str | None, *, trained_from: int = 0
) -> tuple[dict, ...]:
    """Check the order of a conversation that uses tools, give every call a Mistral v3 id and every result the
    id and name of the call it answers; calls must name a tool of `tools` when the record has a list."""
    names = tool_names(tools)
    pending: list[dict] = []
    ids: set[str] = set()
    previous = None
    offset = 1 if turns[0]["role"] == "system" else 0
    out = list(turns[:offset])
    for index in range(offset, len(turns)):
        turn, at = dict(turns[index]), f"{location}: {key}[{index}]"
        role = "call" if turn.get("tool_calls") else turn["role"]
        allowed = _NEXT[previous]
        if role not in allowed:
            wanted = " or ".join(_NAMES[r] for r in allowed)
            raise DataError(f"{at} is {_NAMES[role]} where {wanted} was expected", hint=ORDER_HINT)
        if role == "call":
            turn["tool_calls"] = [_named(c, names, f"{at}.tool_calls[{k}]") for k, c in enumerate(turn["tool_calls"])]
            pending = [_with_id(c, index, k, ids) for k, c in enumerate(turn["tool_calls"])]
            turn["tool_calls"] = [c for c, _ in pending]
        elif role == "tool":
            turn.update(_answer(turn, pending, at))
        previous = role
        out.append(turn)
    if not any(t["role"] == "assistant" for t in out[trained_from:]):
        where = "the completion" if trained_from else "conversation"
        raise DataError(f"{location}: {where} has no assistant turn, so nothing would be trained")
    return tuple(out)


_NEXT: dict[str | None, tuple[str, ...]] = {
    None: ("user",),
    "user": ("assistant", "call"),
    "assistant": ("user",),
    "call": ("tool",),
    "tool": ("tool", "assistant", "call"),
}
_NAMES = {
    "user": "'user'",
    "assistant": "'assistant'",
    "call": "an assistant turn with tool calls",
    "tool": "a tool result",
    "system": "'system'",
}


def _named(item: dict, names: set[str] | None, where: str) -> dict:
    """A call to a tool the record does not offer teaches the model to call tools it was not given: refused."""
    name = item["function"]["name"]
    if names is not None and name not in names:
        offered = ", ".join(sorted(names)) or "none"
        raise DataError(
            f"{where}: calls '{_clip(name)}', which is not in the record's tools ({_clip(offered)})",
            hint="fix the call or the tools list, or raise data.max_invalid to skip such records",
        )
    return item


def _with_id(item: dict, turn: int, index: int, taken: set[str]) -> tuple[dict, str | None]:
    """The call with a Mistral v3 id: its own when it has that form, else one derived from it (stable across
    runs, so the tokens are too); and its original id, which results may name."""
    original = item.get("id")
    new = original if original is not None and CALL_ID.fullmatch(original) and original not in taken else None
    salt = 0
    while new is None or new in taken:
        seed = _json([turn, index, original, item["function"], salt]).encode("utf-8")
        number = int.from_bytes(hashlib.sha256(seed).digest()[:8], "big")
        new = "".join(ID_ALPHABET[(number // 62**i) % 62] for i in range(9))
        salt += 1
    taken.add(new)
    return {"id": new, **{k: v for k, v in item.items() if k != "id"}}, original


def _answer(turn: dict, pending: list[tuple[dict, str | None]], at: str) -> dict:
    """The id and name of the call this result answers: the one its `tool_call_id` names, else the next one."""
    if not pending:
        raise DataError(f"{at}: a tool result with no call before it left to answer", hint=ORDER_HINT)
    wanted = turn.get("tool_call_id")
    chosen = 0
    if wanted is not None:
        matches = [i for i, (item, original) in enumerate(pending) if wanted in (item["id"], original)]
        if not matches:
            known = ", ".join(str(original or item["id"]) for item, original in pending)
            raise DataError(f"{at}: tool_call_id {_clip(str(wanted))} names none of the calls before it ({known})")
        chosen = matches[0]
    item, _ = pending.pop(chosen)
    name = item["function"]["name"]
    if turn.get("name") not in (None, name):
        raise DataError(f"{at}: the result is named '{_clip(str(turn['name']))}' but answers a call to '{name}'")
    return {"tool_call_id": item["id"], "name": name}
