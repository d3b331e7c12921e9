"""Structured logs: one pipeline for our lines and for transformers/TRL/datasets/accelerate.

JSON lines when stderr is not a terminal (containers, CI), readable console
lines on a terminal. Logs go to stderr so that `--json` results on stdout stay
machine-readable. Every line carries the run name once it is bound.
"""

from __future__ import annotations

import contextvars
import logging
import os
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
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _JSON_TRACEBACKS if json_mode else _identity,
            renderer,
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
