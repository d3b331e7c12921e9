"""Chat templates: which one is used, where `data.chat_template` is read from, and rendering within limits.

A value ending in `.jinja`/`.j2`, or written `file:PATH`, names a file (at most 256 KiB, never
under /proc, /sys or /dev once links are resolved); anything else is the template itself. A
template is compiled as transformers compiles it (its sandbox, filters and globals) into an
overlay environment whose loops, calls, operators and output check a deadline and a size cap,
so a template that loops for ever or writes without end stops with exit 65 (docs/data.md).
`ChatRenderer` renders with it, tools included, and refuses a template that drops tool use.
"""

from __future__ import annotations

import functools
import math
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from importlib import resources
from typing import Any

from job.errors import ConfigError, DataError, InputNotFound
from job.logs import get_logger, shorten

log = get_logger(__name__)

DEFAULT_ORIGIN = "default-mistral-v3"
ORIGIN_ATTRIBUTE = "sft_chat_template_origin"
"""Set on the tokenizer by `apply_chat_template_choice`, so errors can say which template it was."""
ORIGIN_TEXT = {
    "config": "data.chat_template",
    "tokenizer": "the tokenizer's own",
    DEFAULT_ORIGIN: "the shipped Mistral v3 template",
}
TEMPLATE_SUFFIXES = (".jinja", ".j2")
FILE_PREFIX = "file:"
MAX_TEMPLATE_BYTES = 256 * 1024
"""Real chat templates are a few KiB (the largest on the Hub are tens); more is a mistake or not a template."""
FORBIDDEN_ROOTS = ("/proc", "/sys", "/dev")
"""Kernel and device files: /proc/self/environ holds the process's credentials."""
RENDER_SECONDS = 5.0
"""Per example, every render of it together. The shipped template renders a conversation in ~50 µs; a
real template never needs seconds, a looping one never finishes."""
RENDER_MAX_CHARS = 32 * 1024 * 1024
"""Output (and any string or list built on the way) per render: 4x the default data.max_record_bytes, room
for a template that repeats a system prompt; far beyond any conversation data.max_length keeps."""
MAX_EXPONENT = 4096
"""`a ** b` with a larger exponent is refused: big-integer powers run inside one C call, past any deadline."""
BOUNDED = "sft_bounded"
"""The filter that checks a stored value's size (a name no template uses)."""
BOUNDED_ITER = "sft_bounded_iter"
"""The filter around what every `{% for %}` loops over."""
SMALL_LOOP = 1024
"""Loops over at most this many items skip the per-item deadline check (the fast path: conversations)."""


class RenderLimit(Exception):
    """A render ran past its deadline or built too much text; `str()` says which limit."""


# ---------------------------------------------------------------- where the template comes from


def names_a_file(configured: str) -> bool:
    """Whether `data.chat_template` names a file rather than being the template text."""
    if configured.startswith(FILE_PREFIX):
        return True
    value = configured.strip()
    return "{" not in value and "\n" not in value and value.lower().endswith(TEMPLATE_SUFFIXES)


def read_configured_template(configured: str) -> str:
    """The template text `data.chat_template` gives: read from its file, or the value itself."""
    if not names_a_file(configured):
        if "{" not in configured:
            raise ConfigError(
                f"data.chat_template {shorten(repr(configured))} is neither a template file nor a Jinja template",
                hint="name a file ending in .jinja or .j2 (or write file:PATH), or give the template text",
            )
        if len(configured.encode("utf-8", "surrogatepass")) > MAX_TEMPLATE_BYTES:
            raise ConfigError(
                f"data.chat_template is over {MAX_TEMPLATE_BYTES} bytes", hint="a chat template is a few KiB"
            )
        return configured
    raw = configured.removeprefix(FILE_PREFIX) if configured.startswith(FILE_PREFIX) else configured.strip()
    return _read_template_file(raw)


def _read_template_file(raw: str) -> str:
    real = os.path.realpath(raw)  # links first: a .jinja link to /proc/self/environ is that file
    for root in FORBIDDEN_ROOTS:
        if real == root or real.startswith(root + "/"):
            raise ConfigError(
                f"data.chat_template {raw} resolves to {real}, under {root}: templates are never read from there",
                hint="point it at a template file",
            )
    try:
        info = os.stat(real)
    except FileNotFoundError:
        raise InputNotFound(f"data.chat_template file {raw} does not exist", hint="check the path") from None
    except OSError as exc:
        raise ConfigError(f"data.chat_template file {raw} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"data.chat_template {raw} is not a regular file")
    too_big = ConfigError(
        f"data.chat_template file {raw} is {info.st_size} bytes, over the {MAX_TEMPLATE_BYTES}-byte limit",
        hint="a chat template is a few KiB; check the path",
    )
    if info.st_size > MAX_TEMPLATE_BYTES:
        raise too_big
    try:
        with open(real, "rb") as handle:
            data = handle.read(MAX_TEMPLATE_BYTES + 1)  # bounded even if the file grew since stat()
    except OSError as exc:
        raise ConfigError(f"data.chat_template file {raw} cannot be read: {exc.strerror}") from None
    if len(data) > MAX_TEMPLATE_BYTES:
        raise too_big
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"data.chat_template file {raw} is not UTF-8 text (byte {exc.start})") from None
    if "{" not in text:
        raise ConfigError(f"data.chat_template file {raw} holds no Jinja template (no '{{' in it)")
    return text


# ---------------------------------------------------------------- bounded rendering


class RenderGuard:
    """The deadline and size cap that the guarded environment's hooks check."""

    def __init__(self, seconds: float | None = None, max_chars: int = RENDER_MAX_CHARS) -> None:
        self.seconds = RENDER_SECONDS if seconds is None else seconds
        self.max_chars = max_chars
        self.deadline = math.inf

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise RenderLimit(f"ran longer than {self.seconds:g} s")

    def check_size(self, value: Any) -> Any:
        if isinstance(value, (str, list, tuple)) and len(value) > self.max_chars:
            raise RenderLimit(f"built a value of {len(value)} items, over {self.max_chars}")
        return value

    def check_args(self, args: tuple, kwargs: dict) -> None:
        """Refuse int arguments past the size cap (`center(10**9)`): the allocation would happen in one C call."""
        for arg in (*args, *kwargs.values()):
            if type(arg) is int and abs(arg) > self.max_chars:
                raise RenderLimit(f"was given the number {arg}, over {self.max_chars}")

    def bounded_iter(self, iterable: Iterable) -> Iterable:
        """What a `{% for %}` loops over: a small collection as it is (each loop start is a checked call, so
        nested small loops check often), anything longer or of unknown length checked at every item."""
        self.check_time()
        if isinstance(iterable, (list, tuple, dict, str)) and len(iterable) <= SMALL_LOOP:
            return iterable
        return self._checked(iterable)

    def _checked(self, iterable: Iterable) -> Iterator:
        for item in iterable:
            self.check_time()
            yield item


def compile_guarded(template: str, guard: RenderGuard) -> Any | None:
    """`template` compiled as transformers compiles it, in an overlay of that environment whose hooks call
    `guard`; None with a transformers that no longer has its private compiler.

    transformers' environment is left as it is (apply_chat_template keeps using it); the overlay
    shares its configuration, so rendering is unchanged while within the limits.
    """
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:
        return None
    from jinja2 import TemplateError, nodes

    # transformers' environment, from an empty template: compiling the real one there would fold its
    # constants (`9 ** 99999999`) outside every limit.
    env = _compile_jinja_template("").environment.overlay()
    sandbox_call = env.call
    sandbox_binop = env.call_binop

    def call(context: Any, obj: Any, *args: Any, **kwargs: Any) -> Any:
        guard.check_time()
        guard.check_args(args, kwargs)
        return guard.check_size(sandbox_call(context, obj, *args, **kwargs))

    def call_binop(context: Any, operator: str, left: Any, right: Any) -> Any:
        guard.check_time()
        if operator == "**" and isinstance(right, int) and abs(right) > MAX_EXPONENT:
            raise RenderLimit(f"raised a number to the power {right}, over {MAX_EXPONENT}")
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if (
                    isinstance(seq, (str, list, tuple))
                    and isinstance(count, int)
                    and len(seq) * count > guard.max_chars
                ):
                    raise RenderLimit(f"multiplied a value to {len(seq) * count} items, over {guard.max_chars}")
        return guard.check_size(sandbox_binop(context, operator, left, right))

    env.call = call
    env.call_binop = call_binop
    env.intercepted_binops = frozenset({"*", "**"})  # `+` is common and cheap to grow with: checked on `set`
    env.filters = {name: _guarded_filter(f, guard) for name, f in env.filters.items()}
    env.filters[BOUNDED] = guard.check_size
    env.filters[BOUNDED_ITER] = guard.bounded_iter
    try:
        source = env.parse(template)
    except TemplateError as exc:
        raise ConfigError(f"the chat template does not compile: {exc}", hint="check data.chat_template") from None
    # Filters, not calls: jinja calls a filter directly, a call goes through the sandbox (10 µs a render).
    for loop in source.find_all(nodes.For):  # every loop iteration checks the deadline, output or not
        loop.iter = nodes.Filter(loop.iter, BOUNDED_ITER, [], [], None, None)
    # A value grows without bound only by being stored and reused: a `set` that builds (`+`, `~`, a literal)
    # checks what it stores; calls and filters are checked already, and lookups build nothing.
    growing = (nodes.BinExpr, nodes.Concat, nodes.List, nodes.Tuple, nodes.Dict)
    for assign in source.find_all(nodes.Assign):
        if isinstance(assign.node, growing) or any(True for _ in assign.node.find_all(growing)):
            assign.node = nodes.Filter(assign.node, BOUNDED, [], [], None, None)
    for block in source.find_all(nodes.AssignBlock):
        block.filter = nodes.Filter(block.filter, BOUNDED, [], [], None, None) if block.filter else _bounded_filter()
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise ConfigError(f"the chat template does not compile: {exc}", hint="check data.chat_template") from None


def _bounded_filter() -> Any:
    from jinja2 import nodes

    return nodes.Filter(None, BOUNDED, [], [], None, None)


def _guarded_filter(function: Callable, guard: RenderGuard) -> Callable:
    @functools.wraps(function)  # keeps jinja's pass_context/pass_environment marker
    def guarded(*args: Any, **kwargs: Any) -> Any:
        guard.check_time()
        guard.check_args(args, kwargs)
        return guard.check_size(function(*args, **kwargs))

    return guarded


def render_bounded(template: Any, guard: RenderGuard, variables: dict[str, Any]) -> str:
    """`template.render(**variables)`, stopping at the guard's deadline or size cap between output chunks."""
    chunks: list[str] = []
    size = 0
    for chunk in template.generate(**variables):  # the time is checked in loops and calls: output comes from them
        size += len(chunk)
        if size > guard.max_chars:
            raise RenderLimit(f"wrote more than {guard.max_chars} characters")
        chunks.append(chunk)
    return "".join(chunks)


# ---------------------------------------------------------------- which template, and rendering with it


def default_chat_template() -> str:
    """The Mistral v3 ([INST] ... [/INST], tool tokens) template shipped with the job."""
    return resources.files("job.assets").joinpath("mistral-v3-chat-template.jinja").read_text(encoding="utf-8")


def resolve_chat_template(tokenizer: Any, configured: str | None) -> tuple[str, str]:
    """(template, origin) that chat data would use: the config's, else the tokenizer's, else the shipped one."""
    if configured:
        return read_configured_template(configured), "config"
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # named templates: training uses the default one
        own = own.get("default")
    if own:
        return own, "tokenizer"
    return default_chat_template(), DEFAULT_ORIGIN


def apply_chat_template_choice(tokenizer: Any, configured: str | None) -> str:
    """Install the chat template to use on `tokenizer`; returns where it came from."""
    template, origin = resolve_chat_template(tokenizer, configured)
    if origin != "tokenizer":
        tokenizer.chat_template = template
    setattr(tokenizer, ORIGIN_ATTRIBUTE, origin)
    if origin == DEFAULT_ORIGIN:
        log.warning("chat_template_default_used", reason="the tokenizer has no chat template", template="mistral-v3")
    return origin


class RenderLimitError(DataError):
    """A render hit its time or size limit: a template problem more than a record's."""


# A probe conversation using every part of tool use, each with a private-use marker a template never writes.
PROBE_NAME = "probe_tool_\ue010"
PROBE_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": PROBE_NAME,
            "description": "\ue011",
            "parameters": {"type": "object", "properties": {"probe": {"type": "string"}}},
        },
    }
]
PROBE_CALL = {"id": "a1b2c3d4e", "type": "function", "function": {"name": PROBE_NAME, "arguments": {"probe": "\ue012"}}}
PROBE_TURNS = [
    {"role": "user", "content": "\ue013"},
    {"role": "assistant", "content": "", "tool_calls": [PROBE_CALL]},
    {"role": "tool", "content": "\ue014", "tool_call_id": "a1b2c3d4e", "name": PROBE_NAME},
    {"role": "assistant", "content": "\ue015"},
]
TOOL_PARTS = {
    "tools": ("the tool list", "\ue011"),
    "calls": ("the tool calls", "\ue012"),
    "results": ("the tool results", "\ue014"),
}


class ChatRenderer:
    """`apply_chat_template(tokenize=False)` without its per-call overhead: the same compiled template
    (transformers' sandboxed Jinja environment) with the tokenizer's special tokens as variables, in an
    overlay that stops a render past `guard`'s deadline or size cap."""

    def __init__(self, tokenizer: Any, guard: RenderGuard | None = None) -> None:
        self.tokenizer = tokenizer
        self.template, _ = resolve_chat_template(tokenizer, None)
        self.origin = ORIGIN_TEXT.get(getattr(tokenizer, ORIGIN_ATTRIBUTE, "tokenizer"), "the tokenizer's own")
        self.variables = dict(tokenizer.special_tokens_map)  # what apply_chat_template passes
        self.guard = guard or RenderGuard()
        self.example_deadline: float | None = None
        """Set per example by `Tokenize`: all its renders share one deadline; else each render has its own."""
        self.compiled = compile_guarded(self.template, self.guard)  # None: the public, slower, unguarded path
        self._tool_support: dict[str, str] | None = None

    def __call__(
        self, messages: list[dict], source: str, add_generation_prompt: bool = False, tools: list | None = None
    ) -> str:
        try:
            if self.compiled is None:
                return self.tokenizer.apply_chat_template(
                    messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
                )
            self.guard.deadline = self.example_deadline or time.monotonic() + self.guard.seconds
            return render_bounded(
                self.compiled, self.guard, {"messages": messages, "tools": tools, "documents": None,
                "add_generation_prompt": add_generation_prompt, **self.variables},
            )  # fmt: skip
        except RenderLimit as exc:
            raise RenderLimitError(
                f"{source}: the chat template {exc} on this conversation, and was stopped",
                hint="fix the template (data.chat_template): it loops or writes far more than the conversation",
            ) from None
        except Exception as exc:  # jinja raises TemplateError and plain exceptions from raise_exception()
            raise DataError(f"{source}: the chat template rejected this conversation: {shorten(str(exc))}") from None

    def check_tools(self, messages: list[dict], tools: list | None, source: str) -> None:
        """ConfigError (64) when this conversation uses a part of tool use that the template leaves out: calls
        that vanish would train the answer without the call, a list that vanishes trains calls to unseen tools.
        A template problem, not the record's, so it stops the job (skipping would drop every tool record)."""
        used = {"tools"} if tools else set()
        used |= {"calls" for m in messages if m.get("tool_calls")} | {
            "results" for m in messages if m["role"] == "tool"
        }
        if not used:
            return
        support = self.tool_support()
        missing = [support[part] for part in sorted(used) if part in support]
        if missing:
            raise ConfigError(
                f"{source}: the chat template ({self.origin}) cannot render this record's tool use: "
                + "; ".join(missing),
                hint="set data.chat_template to a template that renders `tools`, `tool_calls` and `tool` turns "
                "(the model's own with tool support, or the shipped Mistral v3 one)",
            )

    def tool_support(self) -> dict[str, str]:
        """What the template does not render, per part of tool use (`TOOL_PARTS`), probed once."""
        if self._tool_support is None:
            self._tool_support = {}
            try:
                text = self(PROBE_TURNS, "probe", tools=PROBE_TOOLS)
            except DataError as exc:
                reason = f"it rejects a conversation with tools ({shorten(str(exc).removeprefix('probe: '), 200)})"
                self._tool_support = dict.fromkeys(TOOL_PARTS, reason)
                return self._tool_support
            for part, (name, marker) in TOOL_PARTS.items():
                if marker not in text:
                    self._tool_support[part] = f"it leaves out {name}"
        return self._tool_support
