"""Model sources, Hub error mapping (no network: real exception objects), pad token, safetensors only."""

from __future__ import annotations

import copy
import io
import json
import shutil
from pathlib import Path

import pytest
import requests
from huggingface_hub import errors as hub

from job.config.load import load_config
from job.config.schema import ModelConfig, StorageConfig
from job.errors import AccessDenied, ConfigError, InputNotFound, StorageUnavailable
from job.model.load import ModelSource, hub_errors, load_model, load_tokenizer, resolve_source


def response(status: int) -> requests.Response:
    r = requests.Response()
    r.status_code = status
    r.request = requests.Request("GET", "https://huggingface.co/org/model").prepare()
    return r


def test_sources_resolve_without_network(tmp_path: Path, tiny_model_dir: Path) -> None:
    storage = StorageConfig()
    local = resolve_source(ModelConfig(source=str(tiny_model_dir)), tmp_path, storage)
    assert (local.kind, local.location) == ("local", str(tiny_model_dir))
    hub_source = resolve_source(ModelConfig(source="mistralai/Mistral-7B-v0.3", revision="abc"), tmp_path, storage)
    assert (hub_source.kind, hub_source.revision) == ("hub", "abc")
    with pytest.raises(InputNotFound, match="not a model directory"):
        resolve_source(ModelConfig(source=str(tmp_path / "missing")), tmp_path, storage)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputNotFound, match=r"no config\.json"):
        resolve_source(ModelConfig(source=str(tmp_path / "empty")), tmp_path, storage)
    with pytest.raises(ConfigError, match="unknown builtin"):
        resolve_source(ModelConfig(source="builtin:huge"), tmp_path, storage)


@pytest.mark.parametrize(
    ("error", "expected", "text"),
    [
        (hub.GatedRepoError("gated", response=response(401)), AccessDenied, "gated"),
        (hub.HfHubHTTPError("nope", response=response(403)), AccessDenied, "HTTP 403"),
        (hub.HfHubHTTPError("nope", response=response(401)), AccessDenied, "HF_TOKEN"),
        (hub.RepositoryNotFoundError("missing", response=response(404)), InputNotFound, "not found"),
        (hub.RevisionNotFoundError("missing", response=response(404)), InputNotFound, "revision"),
        (hub.HfHubHTTPError("down", response=response(503)), StorageUnavailable, "HTTP 503"),
    ],
)
def test_hub_errors_map_to_exit_codes_even_when_wrapped(error, expected, text, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_sentinel_token_value")
    source = ModelSource("org/model", "hub", "main")
    with pytest.raises(expected) as info, hub_errors(source):
        try:
            raise error
        except Exception as cause:  # transformers wraps Hub errors in OSError
            raise OSError("We couldn't connect") from cause
    assert text in str(info.value)
    assert "hf_sentinel_token_value" not in str(info.value)


def test_tokenizer_gets_a_pad_token_that_is_not_eos(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(ModelSource(str(tiny_model_dir), "local", None), ModelConfig())
    assert tokenizer.pad_token == "<unk>" and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_pickle_only_weights_are_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    import torch
    from safetensors.torch import load_file

    model_dir = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, model_dir)
    state = load_file(model_dir / "model.safetensors")
    (model_dir / "model.safetensors").unlink()
    torch.save(copy.deepcopy(state), model_dir / "pytorch_model.bin")
    with pytest.raises(InputNotFound, match="no safetensors"):
        load_model(ModelSource(str(model_dir), "local", None), ModelConfig(dtype="float32"), "cpu")


def test_trust_remote_code_is_off_by_default() -> None:
    assert ModelConfig().trust_remote_code is False


@pytest.fixture
def remote_code_model(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """The tiny model re-labelled as a custom architecture whose code ships with it (auto_map)."""
    model_dir = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config.update(model_type="x-custom", architectures=["XModel"])
    config["auto_map"] = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XModel"}
    (model_dir / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "remote-code-ran"
    (model_dir / "configuration_x.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import PretrainedConfig\n"
        "class XConfig(PretrainedConfig):\n    model_type = 'x-custom'\n"
    )
    return model_dir


def test_a_model_that_needs_remote_code_is_a_config_error_that_runs_nothing(
    remote_code_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from job.plan.memory import plan_job
    from job.train.fastpath import _model_config

    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))  # transformers must not ask (and be answered)
    config = load_config(None, [f"model.source={remote_code_model}", "data.train=x.jsonl"], environ={})
    with pytest.raises(ConfigError, match="needs its own Python code") as info:
        plan_job(config)
    assert "trust_remote_code" in str(info.value)
    with pytest.raises(ConfigError, match="needs its own Python code"):
        load_model(ModelSource(str(remote_code_model), "local", None), ModelConfig(dtype="float32"), "cpu")
    assert _model_config(str(remote_code_model), None) is None  # the fast path only falls back
    assert not (tmp_path / "remote-code-ran").exists()


def test_a_model_directory_without_a_tokenizer_is_input_not_found(tmp_path: Path, tiny_model_dir: Path) -> None:
    model_dir = tmp_path / "weights-only"
    model_dir.mkdir()
    shutil.copy(tiny_model_dir / "config.json", model_dir / "config.json")
    with pytest.raises(InputNotFound, match="no usable tokenizer"):
        load_tokenizer(ModelSource(str(model_dir), "local", None), ModelConfig())
