"""Structured logs: one pipeline for our lines and for transformers/TRL/datasets/accelerate.

JSON lines when stderr is not a terminal (containers, CI), readable console
lines on a terminal. Logs go to stderr so that `--json` results on stdout stay
machine-readable. Every line carries the run name once it is bound. Every line, ours or a
library's, passes `sanitize`: credentials in URLs (`scheme://user:pass@host`) are masked and a
long value is cut, so neither a secret nor a megabyte record ever reaches the log.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import sys
import threading
import time
import warnings
from typing import Any

import structlog

THIRD_PARTY_LOGGERS = ("transformers", "trl", "datasets", "accelerate", "huggingface_hub", "torch", "botocore", "boto3")

_configured = False
# Tracebacks as structured JSON, without local variables: locals can hold credentials.
_JSON_TRACEBACKS = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)


# ---------------------------------------------------------------- redaction and cutting

_WHITESPACE = re.compile(r"\s")
_USER_END = re.compile(r"[\s/?#@:]")
_DANGLING_AUTHORITY = re.compile(r"://[^\s/]*$")
CUT_MARK = "…[cut {} chars]"
VALUE_LIMIT = 1000
"""Longest string value in a log line: enough for a multi-line error message, not for a quoted record."""
TRACEBACK_LIMIT = 20_000
"""Longest string inside exception text and tracebacks, and longest message: a library's line is all
`event` (torch's elastic failure summary quotes a child's traceback)."""
_LONG_KEYS = frozenset({"event", "exception", "exc_info", "stack", "traceback"})


def redact_urls(text: str) -> str:
    """`text` with the user info of every URL in it masked: `scheme://user:pass@host` -> `scheme://***@host`.

    Any scheme (http, s3, postgres...), with or without a password, inside longer text too. A password
    may hold anything but whitespace (unencoded AWS secrets have '/', some passwords '@'), so it runs to
    the last '@' of its whitespace-delimited token; a port followed by an '@' later in the same token
    is masked too: over-masking a rare URL beats leaking a password. Linear time, whatever the text.
    """
    if "://" not in text:
        return text
    pieces: list[str] = []
    copied = 0  # text[:copied] is in pieces
    token_end = last_at = -1
    found = text.find("://")
    while found != -1:
        start = found + 3
        if start > token_end:  # a new token: where it ends and its last '@', once per token
            space = _WHITESPACE.search(text, start)
            token_end = space.start() if space else len(text)
            last_at = text.rfind("@", start, token_end)
        stop = _USER_END.search(text, start, token_end)
        end = -1
        if stop is not None and stop.group() == "@":
            end = stop.start()  # user@host
        elif stop is not None and stop.group() == ":" and last_at > stop.start():
            end = last_at  # user:password@host
        if end == -1:
            found = text.find("://", start)
            continue
        pieces += [text[copied:start], "***"]
        copied = end
        found = text.find("://", end)
    pieces.append(text[copied:])
    return "".join(pieces)


def shorten(text: str, limit: int = 200) -> str:
    """`text` cut to `limit` characters with a marker saying how much was cut; URLs redacted.

    For values quoted in messages (`cannot use {shorten(repr(value))}`): a 1 MB value stays out of logs."""
    if len(text) <= limit:
        return redact_urls(text)
    head = redact_urls(text[:limit])
    # A URL cut before its '@' escaped the pattern above: mask what is left of its authority.
    head = _DANGLING_AUTHORITY.sub("://***", head)
    return head + CUT_MARK.format(len(text) - limit)


def sanitize(value: Any, limit: int = VALUE_LIMIT) -> Any:
    """`value` with every string in it (nested in dicts, lists, tuples) redacted and cut to `limit`."""
    if isinstance(value, str):
        return shorten(value, limit)
    if isinstance(value, dict):
        return {k: sanitize(v, TRACEBACK_LIMIT if k in _LONG_KEYS else limit) for k, v in value.items()}
    if isinstance(value, list):
        return [sanitize(v, limit) for v in value]
    if isinstance(value, tuple) and not (len(value) == 3 and isinstance(value[1], BaseException)):
        return tuple(sanitize(v, limit) for v in value)  # an exc_info triple is left to the renderer
    if isinstance(value, BaseException):
        return shorten(f"{type(value).__name__}: {value}", limit)
    return value


def _sanitize_event(_logger: Any, _name: str, event: dict) -> dict:
    return sanitize(event)


SEVERITY = {"debug": "DEBUG", "info": "INFO", "warning": "WARNING", "error": "ERROR", "critical": "CRITICAL"}
"""Our levels as Cloud Logging's LogSeverity names (also what Azure Monitor and CloudWatch Insights parse)."""
MESSAGE_LIMIT = 300
"""The `message` summary a console shows on one line; every field stays in the JSON beside it."""
_NOT_IN_MESSAGE = frozenset({"event", "level", "logger", "timestamp", "run", "exception", "exc_info", "stack"})


def _console_fields(_logger: Any, _name: str, event: dict) -> dict:
    """`severity`, `message` and `time` (RFC 3339, UTC) for cloud consoles, beside our `event`, `level` and
    `timestamp`: Cloud Logging reads a stderr line without `severity` as an ERROR, and shows `message` as the
    line's summary."""
    level = str(event.get("level", "info")).lower()
    event["severity"] = SEVERITY.get(level, "ERROR" if level == "exception" else "DEFAULT")
    scalars = " ".join(
        f"{key}={value}"
        for key, value in event.items()
        if key not in _NOT_IN_MESSAGE and key != "severity" and isinstance(value, (str, int, float, bool))
    )
    text = f"{event.get('event', '')} {scalars}".strip()
    event["message"] = text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 1] + "…"
    if "timestamp" in event:
        event["time"] = event["timestamp"]
    return event


def _redacting(renderer: Any) -> Any:
    """The renderer, then a last pass over the rendered line: values rendered late (an object's str(),
    the console renderer's tracebacks) have not been through `sanitize`."""

    def render(logger: Any, name: str, event: dict) -> str:
        return redact_urls(renderer(logger, name, event))

    return render


# ---------------------------------------------------------------- setup


def setup_logging(*, json_mode: bool | None = None, level: str | None = None) -> None:
    """Configure structlog and route the standard library's loggers through it (idempotent)."""
    global _configured
    json_mode = (not sys.stderr.isatty()) if json_mode is None else json_mode
    level_name = (level or os.environ.get("SFT_LOG_LEVEL") or "INFO").upper()

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer(default=str)
        if json_mode
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty(), exception_formatter=_console_tracebacks())
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _JSON_TRACEBACKS if json_mode else _identity,
            _sanitize_event,
            _console_fields if json_mode else _identity,  # from sanitized values: no credential, no 1 MB value
            _redacting(renderer),
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level_name)

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    logging.captureWarnings(True)
    warnings.filterwarnings("default", category=DeprecationWarning, module="job")
    _bridge_third_party(json_mode, level_name)
    _configured = True


def _console_tracebacks() -> Any:
    """Console tracebacks without local variables (rich shows them by default): locals can hold credentials."""
    if getattr(structlog.dev, "rich", None) is not None:
        return structlog.dev.RichTracebackFormatter(show_locals=False)
    return structlog.dev.plain_traceback


def _identity(_logger: Any, _name: str, event: dict) -> dict:
    return event


def _bridge_third_party(json_mode: bool, level_name: str) -> None:
    """Make library loggers propagate to our root handler instead of printing their own way."""
    # Library INFO lines are chatty; keep them at WARNING unless we debug.
    library_level = logging.DEBUG if level_name == "DEBUG" else logging.WARNING
    try:
        import transformers

        transformers.utils.logging.disable_default_handler()
        transformers.utils.logging.enable_propagation()
        transformers.utils.logging.set_verbosity(library_level)
        if json_mode:
            transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        pass
    try:
        import datasets

        datasets.utils.logging.disable_propagation()  # reset, then route through root
        datasets.utils.logging.get_logger().handlers = []
        datasets.utils.logging.enable_propagation()
        datasets.utils.logging.set_verbosity(library_level)
        if json_mode:
            datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass
    # After the imports above: huggingface_hub and torch add their own stderr handlers when imported,
    # which would print every library line twice (once plain, once ours).
    for name in THIRD_PARTY_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
        logger.setLevel(library_level)
    if json_mode:
        os.environ.setdefault("TQDM_DISABLE", "1")


def adopt_torch_loggers() -> None:
    """torch installs its own stderr handlers when torch.distributed loads: route them through ours."""
    for name in ("torch", "torch.distributed"):
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
        if logger.level < logging.WARNING:
            logger.setLevel(logging.WARNING)


def bind_run(**fields: Any) -> None:
    """Fields (e.g. run=name) carried by every following line, ours and the libraries'."""
    structlog.contextvars.bind_contextvars(**fields)


def quiet_unless_main(rank: int, distributed: bool) -> None:
    """With several ranks: every line names its rank, and only rank 0 logs progress (the others
    log warnings and errors), so N ranks do not print N copies of each step line."""
    if not distributed:
        return
    bind_run(rank=rank)
    if rank != 0:
        logging.getLogger("job").setLevel(logging.WARNING)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)


class Heartbeat:
    """A `heartbeat` line every `interval` seconds while a long phase runs, so a silent pod is never a mystery."""

    def __init__(self, phase: str, interval: float | None = None, **fields: Any) -> None:
        self.phase, self.fields = phase, fields
        self.interval = interval if interval is not None else float(os.environ.get("SFT_HEARTBEAT_SECONDS", "30"))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started = 0.0

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Heartbeat:
        self.started = time.monotonic()
        self._stop.clear()
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._beat,), name=f"heartbeat-{self.phase}")
        self._thread.daemon = True
        self._thread.start()
        return self

    def _beat(self) -> None:
        import time

        log = get_logger("job.heartbeat")
        while not self._stop.wait(self.interval):
            log.info(
                "heartbeat", phase=self.phase, elapsed_seconds=round(time.monotonic() - self.started, 1), **self.fields
            )

    def stop(self) -> float:
        """Stop beating; returns the phase's seconds."""
        self._stop.set()
        return time.monotonic() - self.started
