"""The JobError hierarchy: one exception class per exit code.

The exit codes are the contract with Kubernetes `podFailurePolicy` and with CI
pipelines (see README "Exit codes"). Code deep in the job raises one of these;
only `job.cli` turns them into a process exit status.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NoReturn


class JobError(Exception):
    """Base class: a failure the job understands, with a message for humans."""

    exit_code: int = 1
    retryable: bool = True

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and each cause or context under it, once each: a library's wrapped OSError or HTTP error."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def resurface(error: BaseException, where: str) -> NoReturn:
    """Raise a background thread's failure in this thread, keeping its class (and so its exit code)."""
    if not isinstance(error, JobError):
        raise JobError(f"{where}: {type(error).__name__}: {error}") from error
    surfaced = error.__class__.__new__(error.__class__)  # no subclass __init__ to satisfy
    surfaced.__dict__.update(error.__dict__)
    surfaced.message = f"{where}: {error.message}"
    surfaced.args = (surfaced.message,)
    raise surfaced from error


class ConfigError(JobError):
    """Bad configuration: unknown key, wrong type, impossible combination."""

    exit_code = 64
    retryable = False


class DataError(JobError):
    """Bad data; the message names the file and line."""

    exit_code = 65
    retryable = False


class InputNotFound(JobError):
    """A dataset, model, bucket or key that does not exist."""

    exit_code = 66
    retryable = False


class StorageUnavailable(JobError):
    """Storage still unreachable after retries; a later attempt may succeed."""

    exit_code = 69
    retryable = True


class TrainingFailed(JobError):
    """Training failed in a way a retry would repeat (non-finite loss, CUDA OOM)."""

    exit_code = 70
    retryable = False


class Preempted(JobError):
    """Stopped by SIGTERM/SIGINT; the newest durable checkpoint is in the log."""

    exit_code = 75
    retryable = True


class LeaseLost(Preempted):
    """This process can no longer prove it holds the run's lease: it stops writing and exits 75."""


class ScratchFull(JobError):
    """The local scratch disk is full (or too small); the message names the path, free and needed bytes."""

    exit_code = 74
    retryable = False


class DriverIncompatible(JobError):
    """The node's NVIDIA driver cannot run the image's CUDA runtime; the message names both versions."""

    exit_code = 71
    retryable = False


class AccessDenied(JobError):
    """Credentials or token rejected (S3 403, Hub 401/403)."""

    exit_code = 77
    retryable = False


UNEXPECTED_EXIT_CODE = 1

EXIT_CODES: dict[int, str] = {
    0: "finished, or already finished earlier",
    ConfigError.exit_code: "bad configuration",
    DataError.exit_code: "bad data (the message names file and line)",
    InputNotFound.exit_code: "input not found (dataset, model, bucket)",
    StorageUnavailable.exit_code: "storage unreachable after retries",
    DriverIncompatible.exit_code: "the node's NVIDIA driver is too old for the image's CUDA runtime (both named)",
    ScratchFull.exit_code: "local scratch disk full or too small (the message names path, free and needed bytes)",
    TrainingFailed.exit_code: "training failed for a reason a retry repeats",
    Preempted.exit_code: "preempted; the newest durable checkpoint is named in the log",
    AccessDenied.exit_code: "access denied (credentials, Hub token)",
    UNEXPECTED_EXIT_CODE: "unexpected error (traceback logged)",
}

FATAL_EXIT_CODES: tuple[int, ...] = tuple(
    sorted(
        cls.exit_code
        for cls in [
            ConfigError,
            DataError,
            InputNotFound,
            DriverIncompatible,
            ScratchFull,
            TrainingFailed,
            AccessDenied,
        ]
    )
)
"""Codes a retry would repeat: Kubernetes fails the Job on them, the launcher lets them win over others."""
