"""Resolve the base model's source and load its tokenizer and weights safely.

Sources: a Hub id (pinned by `model.revision`, token from `HF_TOKEN`), an
`s3://` prefix (pulled into scratch), a local directory, or the builtin tiny
model. Weights load from safetensors only; `trust_remote_code` stays off
unless the config turns it on.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from job.config.schema import ModelConfig, StorageConfig
from job.errors import AccessDenied, ConfigError, InputNotFound, StorageUnavailable, exception_chain
from job.logs import get_logger
from job.model.tiny import BUILTIN_PREFIX, TINY_MISTRAL, ensure_tiny_model
from job.storage import fetch_input, is_remote

log = get_logger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    location: str
    """What `from_pretrained` receives: a local directory or a Hub id."""
    kind: str
    """`hub`, `s3`, `local` or `builtin`."""
    revision: str | None

    @property
    def is_hub(self) -> bool:
        return self.kind == "hub"


def resolve_source(model: ModelConfig, scratch: Path, storage: StorageConfig) -> ModelSource:
    """Turn `model.source` into something `from_pretrained` can load, pulling remote files first."""
    source = model.source
    if source.startswith(BUILTIN_PREFIX):
        name = source.removeprefix(BUILTIN_PREFIX)
        if name != TINY_MISTRAL:
            raise ConfigError(
                f"unknown builtin model {source!r}", hint=f"the builtin model is {BUILTIN_PREFIX}{TINY_MISTRAL}"
            )
        return ModelSource(str(ensure_tiny_model(scratch / "models" / TINY_MISTRAL)), "builtin", None)
    if is_remote(source):
        path = fetch_input(source.rstrip("/") + "/", scratch, storage)
        return ModelSource(str(path), "s3", None)
    local = Path(source.removeprefix("file://"))
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise InputNotFound(f"model directory {local} has no config.json")
        return ModelSource(str(local), "local", None)
    if local.exists() or source.startswith(("/", "./", "../", "file://")) or not HUB_ID.match(source):
        raise InputNotFound(
            f"model source {source!r} is not a model directory",
            hint="use a Hub id (org/name), s3://bucket/prefix/ or a directory with config.json",
        )
    return ModelSource(source, "hub", model.revision)


@contextlib.contextmanager
def hub_errors(source: ModelSource) -> Iterator[None]:
    """Map Hub and filesystem failures to the job's exit codes; never echo the token."""
    try:
        yield
    except Exception as exc:
        mapped = _map_hub_error(exc, source)
        if mapped is None:
            raise
        raise mapped from None


def _map_hub_error(exc: BaseException, source: ModelSource) -> Exception | None:
    from huggingface_hub import errors as hub

    where = source.location + (f"@{source.revision}" if source.revision else "")
    for cause in exception_chain(exc):
        if isinstance(cause, hub.GatedRepoError):
            return AccessDenied(f"model {where} is gated", hint="accept its terms on the Hub and set HF_TOKEN")
        if isinstance(cause, hub.RevisionNotFoundError):
            return InputNotFound(f"model revision {where} not found", hint="check model.revision")
        if isinstance(cause, hub.RepositoryNotFoundError):
            return InputNotFound(f"model {where} not found on the Hub (or HF_TOKEN may not see it)")
        if isinstance(cause, hub.HfHubHTTPError):
            status = getattr(getattr(cause, "response", None), "status_code", None)
            if status in (401, 403):
                return AccessDenied(f"the Hub refused access to {where} (HTTP {status})", hint="check HF_TOKEN")
            if status == 404:
                return InputNotFound(f"model {where} not found on the Hub")
            return StorageUnavailable(f"the Hub failed for {where} (HTTP {status})")
        if isinstance(cause, (hub.LocalEntryNotFoundError, ConnectionError, TimeoutError)):
            return StorageUnavailable(f"cannot reach the Hub for {where}", hint="check the network or HF_HUB_OFFLINE")
    text = str(exc)
    if "trust_remote_code" in text:
        return ConfigError(
            f"model {where} needs its own Python code to load (custom architecture); model.trust_remote_code is off",
            hint="use a model that transformers supports natively, or set model.trust_remote_code: true only if"
            " you have read that code: it runs inside the job with its credentials",
        )
    if "Unrecognized model" in text or "does not recognize this architecture" in text:
        return ConfigError(
            f"model {where}: this transformers cannot build its architecture ({_first_line(text)})",
            hint="check config.json's model_type, or use an image with a newer transformers",
        )
    if "Validation error for field" in text or type(exc).__name__ == "StrictDataclassFieldValidationError":
        return ConfigError(
            f"model {where}: config.json has a value of the wrong type ({_first_line(text)})",
            hint="repair the model directory's config.json or point model.source elsewhere",
        )
    if "not a valid JSON file" in text:
        return ConfigError(
            f"model {where}: a configuration file is not valid JSON ({_first_line(text)})",
            hint="repair the model directory (config.json, tokenizer_config.json) or point model.source elsewhere",
        )
    if "backend tokenizer" in text or "Can't load tokenizer" in text:
        return InputNotFound(
            f"model {where} has no usable tokenizer (tokenizer.json or tokenizer.model)",
            hint="copy the base model's tokenizer files into the model directory",
        )
    if "safetensors" in text.lower() and ("does not appear to have" in text or "no file named" in text.lower()):
        return InputNotFound(
            f"model {where} has no safetensors weights",
            hint="convert it to safetensors; pickle weights are refused for safety",
        )
    return None


def _first_line(text: str, limit: int = 200) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[:limit] + "…"


def _hub_kwargs(source: ModelSource, model: ModelConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": model.trust_remote_code}
    if source.is_hub:
        kwargs["revision"] = source.revision
        kwargs["token"] = os.environ.get("HF_TOKEN") or None
    return kwargs


def load_tokenizer(source: ModelSource, model: ModelConfig) -> Any:
    """The tokenizer, with a pad token that is never a real end-of-sequence token when avoidable."""
    from transformers import AutoTokenizer

    with hub_errors(source):
        tokenizer = AutoTokenizer.from_pretrained(source.location, **_hub_kwargs(source, model))
    if tokenizer.pad_token is None:
        # Padding is masked by length, not by id, so EOS keeps training either way; a distinct pad id
        # keeps downstream batched inference from confusing padding with end of text.
        substitute = tokenizer.unk_token if tokenizer.unk_token not in (None, tokenizer.eos_token) else None
        tokenizer.pad_token = substitute or tokenizer.eos_token
        log.info("pad_token_set", pad_token=tokenizer.pad_token, reason="the tokenizer has none")
    return tokenizer


def load_model(source: ModelSource, model: ModelConfig, device: str, *, attention: str | None = None) -> Any:
    """The causal LM in `model.dtype`, loaded from safetensors only, on `device`.

    `attention` is the kernel the fast path chose (`job.train.fastpath`); None lets transformers choose.
    """
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = _hub_kwargs(source, model)
    kwargs["dtype"] = getattr(torch, model.dtype)
    kwargs["use_safetensors"] = True
    kwargs["attn_implementation"] = attention or model.attn_implementation
    with hub_errors(source):
        loaded = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
    loaded.to(device)
    for parameter in loaded.parameters():
        parameter.requires_grad_(True)  # full-parameter fine-tune: nothing frozen
    log.info(
        "model_loaded",
        source=source.location,
        kind=source.kind,
        revision=source.revision,
        dtype=str(loaded.dtype).removeprefix("torch."),
        parameters=sum(p.numel() for p in loaded.parameters()),
        device=device,
    )
    return loaded
