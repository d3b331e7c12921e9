"""The job as a benchmark runs it: `entrypoint.py` in a subprocess, its JSON log lines, and its inputs.

Shared by bench/gpu_job.py and bench/multi_gpu_job.py (and the card facts by bench/gpu_throughput.py):
`Job` starts a command line and collects the JSON lines of its stderr as they come; `build_model`,
`write_data` and `write_config` make a randomly initialised Mistral-architecture model, chat data and a
config file; `environment` and `nvidia_smi` say what machine and packages a figure came from. The bench
scripts import it as a sibling (their own directory is on sys.path when they run).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import signal
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

REPO = Path(__file__).resolve().parents[1]
MiB, GiB = 1 << 20, 1 << 30
CARD_96GB_MIB = 97_887
"""What an RTX PRO 6000 (96 GB) reports; larger cards are capped to it."""

WORDS = (
    "the of and to in is was for on that with as by at from his it an were are which be this has had not but "
    "their its or also first after one new two who they been more other her into time only most some years she "
    "over him when city all up between out during where about later three then than world there used can both "
    "would many such while including under known these made school state war through well part may them before"
)


# ---------------------------------------------------------------- the job in a subprocess


class Interrupted(Exception):
    """SIGTERM to this script (its time limit): stop the job in flight, keep what was measured."""


def entrypoint(*args: str) -> list[str]:
    """The command line of `entrypoint.py ARGS` under this interpreter."""
    return [sys.executable, str(REPO / "entrypoint.py"), *args]


class Job:
    """A command (the job) in the background; the JSON lines of its stderr collected as they come.

    With `new_session` (the default) it runs in its own process group, which `kill` ends as a whole; without
    it, it shares this script's group (a Ctrl-C reaches it too) and `kill` ends the process itself."""

    live: ClassVar[list[Job]] = []
    """Jobs started and not yet waited for: killed (with their process groups) if this script is stopped."""
    stopping: ClassVar[bool] = False
    """Set when this script is stopped: no job starts after that."""

    def __init__(self, argv: list[str], env: dict[str, str], *, new_session: bool = True) -> None:
        if Job.stopping:
            raise Interrupted("stopping")
        self.started = time.monotonic()
        self.new_session = new_session
        self.proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=new_session,
        )  # fmt: skip
        self.lines: list[dict[str, Any]] = []
        self.tail: list[str] = []
        self.signalled: float | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        Job.live.append(self)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.tail = [*self.tail[-40:], raw]
            with contextlib.suppress(json.JSONDecodeError):
                line = json.loads(raw)
                if isinstance(line, dict):
                    line["_t"] = round(time.monotonic() - self.started, 3)
                    self.lines.append(line)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in list(self.lines) if line.get("event") == name]

    def first(self, name: str) -> dict[str, Any]:
        """The first line of event `name` so far ({} if none)."""
        return next(iter(self.events(name)), {})

    def wait_for(self, event: str, timeout: float, count: int = 1, **fields: Any) -> dict[str, Any] | None:
        """The `count`-th line of `event` with `fields`; None if the job ended or time ran out first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.events(event) if all(e.get(k) == v for k, v in fields.items())]
            if len(found) >= count:
                return found[count - 1]
            if self.proc.poll() is not None and not self._reader.is_alive():
                return None
            time.sleep(0.02)
        return None

    def terminate(self) -> None:
        self.signalled = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)  # the job itself; it settles its own workers

    def wait(self, timeout: float) -> int:
        """Exit code; a job past `timeout` is killed (-9)."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.proc.wait()
        self._reader.join(timeout=10)
        with contextlib.suppress(ValueError):
            Job.live.remove(self)
        return code

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self.new_session:
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                self.proc.kill()

    def exit_seconds(self) -> float | None:
        """Seconds from SIGTERM to exit."""
        return None if self.signalled is None else round(time.monotonic() - self.signalled, 2)

    def timeline(self) -> dict[str, float]:
        """Seconds after start of the first line of each phase (where the time of a start goes)."""
        marks = ("data_ready", "model_loaded", "training_started", "step", "preemption_signal", "run_finished")
        seen: dict[str, float] = {}
        for line in list(self.lines):
            if line.get("event") in marks:
                seen.setdefault(line["event"], line["_t"])
        return {**seen, "last_line": self.lines[-1]["_t"] if self.lines else None}

    def compile_lines(self) -> list[dict[str, Any]]:
        return [public(e) for e in self.lines if "compile" in str(e.get("event", ""))]

    def error_tail(self) -> str:
        return "".join(self.tail)[-3000:]


def public(line: dict[str, Any]) -> dict[str, Any]:
    """A log line without the fields every line has."""
    return {k: v for k, v in line.items() if k not in ("run", "level", "logger", "timestamp")}


def job_env(base: dict[str, str]) -> dict[str, str]:
    """`base` without SFT_ settings, with JSON logs and no network for the hub."""
    env = {k: v for k, v in base.items() if not k.startswith("SFT_")}
    env.update({"SFT_LOG_FORMAT": "json", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    return env


# ---------------------------------------------------------------- inputs: model, data, config


_BUILD = threading.Lock()  # the dry run's parts run side by side; torch's seed is global


def build_model(directory: Path, values: dict[str, Any], *, device: str, dtype: str) -> int:
    """A randomly initialised Mistral-architecture model with the Mistral v3 tokenizer; its parameter count.
    Needs this checkout's root on sys.path (for `job.model.tiny`)."""
    with _BUILD:
        return _build_model(directory, values, device=device, dtype=dtype)


def _build_model(directory: Path, values: dict[str, Any], *, device: str, dtype: str) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from job.model.tiny import write_tokenizer

    write_tokenizer(directory)
    values = {"vocab_size": 32768, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, **values}  # fmt: skip
    values.pop("architectures", None)
    config = AutoConfig.for_model(values.pop("model_type", "mistral"), **values)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = 1, 2
    model.save_pretrained(directory)
    count = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return count


def write_data(path: Path, records: int, words: int) -> Path:
    """Chat records with a short prompt and a long answer: nearly every token is trained (tokens/s counts
    trained tokens), and answers longer than `data.max_length` fill whole rows."""
    rng, vocabulary = random.Random(0), WORDS.split()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for i in range(records):
            answer = " ".join(rng.choice(vocabulary) for _ in range(words))
            messages = [{"role": "user", "content": f"Write passage {i}."}, {"role": "assistant", "content": answer}]
            out.write(json.dumps({"messages": messages}) + "\n")
    return path


def write_config(path: Path, values: dict[str, dict[str, Any]]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def load_weights(directory: Path) -> dict[str, Any]:
    """Every tensor of the `*.safetensors` files in `directory` (a run's `final/`)."""
    from safetensors.torch import load_file

    weights: dict[str, Any] = {}
    for path in sorted(directory.glob("*.safetensors")):
        weights.update(load_file(path))
    return weights


# ---------------------------------------------------------------- the machine


def nvidia_smi(*fields: str) -> list[str] | None:
    """The first GPU's `fields` (`--query-gpu` names) as nvidia-smi prints them; None without a GPU or nvidia-smi."""
    with contextlib.suppress(Exception):
        query = "--query-gpu=" + ",".join(fields)
        out = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        if out.returncode == 0:
            return [part.strip() for part in out.stdout.splitlines()[0].split(",")]
    return None


def environment(dry_run: bool) -> dict[str, Any]:
    """Python, host, the job's packages and, with a GPU, its name, driver and memory."""
    env: dict[str, Any] = {"python": platform.python_version(), "host": platform.node(), "dry_run": dry_run}
    for name in ("torch", "transformers", "trl", "datasets", "accelerate", "safetensors", "flash-attn", "liger-kernel"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            env[name] = metadata.version(name)
    gpu = nvidia_smi("name", "driver_version", "memory.total")
    if gpu is not None and len(gpu) == 3:
        env.update(gpu=gpu[0], driver=gpu[1], gpu_memory=gpu[2])
    return env
