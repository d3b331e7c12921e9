"""Shared fixtures: tiny model, tiny datasets, and reference runs of the real entrypoint.

S3 fixtures (a moto server on loopback) live in s3_fixtures.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest_plugins = ["s3_fixtures"]

REPO = Path(__file__).resolve().parents[1]
DEMO_TRAIN = REPO / "examples" / "demo" / "train.jsonl"
DEMO_EVAL = REPO / "examples" / "demo" / "eval.jsonl"


# ---------------------------------------------------------------- the two tiers
SLOW_MARK = "slow"
"""Marks every test that starts the job (`entrypoint.py`), a benchmark (`bench/`) or job code in a fresh
interpreter as a subprocess; `make test-fast` (`pytest -m "not slow"`) runs the rest, in-process. A test
that starts one without the mark fails (the guard on `subprocess.Popen` below), in either tier."""

_current_item: pytest.Item | None = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """Remember which test runs (its fixtures included) so the subprocess guard below can check its marks."""
    global _current_item
    _current_item = item
    try:
        yield
    finally:
        _current_item = None


def _argv(args) -> list[str]:
    """Popen's `args` as a list of strings (one string is a shell command line, or a bare program)."""
    if isinstance(args, (str, bytes)):
        try:
            return shlex.split(os.fsdecode(args))
        except ValueError:
            return [os.fsdecode(args)]
    if isinstance(args, os.PathLike):
        return [os.fsdecode(args)]
    return [os.fsdecode(a) if isinstance(a, (bytes, os.PathLike)) else str(a) for a in args]


def _starts_project_code(args) -> str | None:
    """What in this command line is the job, a benchmark or job code in a fresh interpreter; None if nothing."""
    argv = _argv(args)
    for i, arg in enumerate(argv):
        path = Path(arg)
        if path.name == "entrypoint.py" or (path.suffix == ".py" and path.parent.name == "bench"):
            return arg
        following = argv[i + 1] if i + 1 < len(argv) else ""
        if arg == "-m" and following.split(".")[0] in ("job", "bench"):
            return f"-m {following}"
        if arg == "-c" and ("from job" in following or "import job" in following):
            return "-c <code importing job>"
    return None


_original_popen_init = subprocess.Popen.__init__


def _guarded_popen_init(self, args, *rest, **kwargs):
    item = _current_item
    if item is not None and item.get_closest_marker(SLOW_MARK) is None:
        started = _starts_project_code(args)
        if started is not None:
            pytest.fail(
                f"{item.nodeid} starts {started} as a subprocess but is not marked "
                f"@pytest.mark.{SLOW_MARK}: `make test-fast` (-m 'not slow') runs in-process tests only",
                pytrace=False,
            )
    _original_popen_init(self, args, *rest, **kwargs)


def pytest_configure(config: pytest.Config) -> None:
    subprocess.Popen.__init__ = _guarded_popen_init  # type: ignore[method-assign]


def pytest_unconfigure(config: pytest.Config) -> None:
    subprocess.Popen.__init__ = _original_popen_init  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def _restore_logging():
    """Tests that call `job.cli.main` in-process configure logging; give the next test its own."""
    import logging

    from job.logs import THIRD_PARTY_LOGGERS

    names = ["", *THIRD_PARTY_LOGGERS]
    saved = {n: (logging.getLogger(n).level, list(logging.getLogger(n).handlers), logging.getLogger(n).propagate)
             for n in names}  # fmt: skip
    yield
    import structlog

    structlog.reset_defaults()
    for name, (level, handlers, propagate) in saved.items():
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.handlers = handlers
        logger.propagate = propagate


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The builtin tiny Mistral (real Mistral v3 tokenizer), built once per session."""
    from job.model.tiny import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny-mistral")


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def tiny_job_trainer(config, model_dir: Path, output_dir: Path, callbacks: list, *, evaluation: bool = False):
    """A real JobTrainer on the tiny model (CPU, float32) over 16 seeded rows, as job/run.py builds one; with
    `evaluation`, the first 4 rows are its eval set."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM

    from job.model.load import ModelSource, load_tokenizer
    from job.train.fastpath import choose_fast_path, detect_device
    from job.train.trainer import build_trainer

    torch.manual_seed(0)
    rows = [list(range(5 + i, 5 + i + 12 + i % 5)) for i in range(16)]
    dataset = datasets.Dataset.from_dict({"input_ids": rows, "labels": [[-100, *r[1:]] for r in rows]})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = load_tokenizer(ModelSource(str(model_dir), "local", None), config.model)
    fast = choose_fast_path(config, detect_device("cpu"))
    held_out = dataset.select(range(4)) if evaluation else None
    trainer, _ = build_trainer(config, model, tokenizer, dataset, held_out, output_dir, fast, extra_callbacks=callbacks)
    return trainer


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@dataclass
class JobResult:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def lines(self) -> list[dict]:
        """The JSON log lines (stderr); fails the test if any line is not JSON."""
        return [json.loads(line) for line in self.stderr.splitlines() if line.strip()]

    def events(self, name: str) -> list[dict]:
        return [line for line in self.lines if line.get("event") == name]


def run_job(*args: str, env: dict | None = None, timeout: float = 300, cwd: Path = REPO) -> JobResult:
    """Run `python entrypoint.py ARGS` as a subprocess with JSON logs, like a container does."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SFT_")}
    full_env.update({"SFT_LOG_FORMAT": "json", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    full_env.update(env or {})
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(REPO / "entrypoint.py"), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return JobResult(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)


def cpu_run_args(tmp: Path, model_dir: Path, name: str, *extra: str) -> list[str]:
    """A small, exact (float32, CPU) training run on the demo task."""
    return [
        "train",
        "--config",
        str(REPO / "examples" / "cpu-demo.yaml"),
        "--set", f"run.name={name}",
        "--set", f"run.output={tmp / 'outputs'}",
        "--set", f"run.scratch={tmp / 'scratch'}",
        "--set", f"model.source={model_dir}",
        "--set", "train.max_steps=24",
        "--set", "train.logging_steps=4",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[JobResult, Path]:
    """One uninterrupted local run, shared by every assertion about a finished run."""
    tmp = tmp_path_factory.mktemp("reference")
    result = run_job(*cpu_run_args(tmp, tiny_model_dir, "reference"))
    assert result.returncode == 0, result.stderr[-4000:]
    return result, tmp / "outputs" / "reference"


def free_port() -> int:
    """A TCP port free on loopback now (for a rendezvous or a process group)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class JobProcess:
    """`entrypoint.py` running in the background, its JSON log lines collected as they arrive."""

    def __init__(self, *args: str, env: dict | None = None) -> None:
        import threading

        full_env = {k: v for k, v in os.environ.items() if not k.startswith("SFT_")}
        full_env.update({"SFT_LOG_FORMAT": "json", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
        full_env.update(env or {})
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "entrypoint.py"), *args],
            cwd=REPO,
            env=full_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[dict] = []
        self.raw: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.raw.append(line)
            with contextlib.suppress(json.JSONDecodeError):
                self.lines.append(json.loads(line))

    def wait_for(self, event: str, timeout: float = 180, **fields) -> dict:
        """The first log line with this event (and these field values), waiting for it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if line.get("event") == event and all(line.get(k) == v for k, v in fields.items()):
                    return line
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(
            f"no {event} {fields} within {timeout}s; exit={self.proc.poll()}\n{''.join(self.raw[-30:])}"
        )

    def events(self, name: str) -> list[dict]:
        return [line for line in self.lines if line.get("event") == name]

    def wait(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(timeout=10)
        return code

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def result(self, timeout: float = 300) -> JobResult:
        """Wait for the exit: the run as `run_job` reports it (every stderr line must be JSON; stdout not kept)."""
        code = self.wait(timeout)
        return JobResult(code, "", "".join(self.raw), time.monotonic() - self.started)


# ---------------------------------------------------------------- the Hub, offline


@pytest.fixture
def hub_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No ambient token, cache or offline switch: the cache is `<scratch>/hub`; returns the scratch dir."""
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HF_HOME", "HF_HUB_CACHE", "HF_ENDPOINT", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    return tmp_path / "scratch"


def go_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # Anything that still tried the network would hit the discard port and fail loudly.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")


def write_cache(cache: Path, repo: str, refs: dict[str, str], files: dict[str, bytes]) -> Path:
    """The layout huggingface_hub writes: blobs by hash, snapshots/<commit>/ of links, refs/<name> -> commit."""
    folder = cache / f"datasets--{repo.replace('/', '--')}"
    for name, commit in refs.items():
        (folder / "refs" / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / "refs" / name).write_text(commit)
    for commit in set(refs.values()):
        for relative, data in files.items():
            blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = folder / "snapshots" / commit / relative
            link.parent.mkdir(parents=True, exist_ok=True)
            link.unlink(missing_ok=True)
            link.symlink_to(blob)
    return folder
