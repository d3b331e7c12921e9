"""The push of final/ to the Hub, through huggingface_hub itself against a local stand-in for the Hub's API
(tests/hub_standin.py): the bytes that arrive, the repo's visibility, the record that makes a restart skip the
push, and the exit codes of a refused, failing or unreachable Hub, with the token never shown."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hub_standin import HubStandIn, Repo, Token, serve_hub
from safetensors.torch import save_file

from job.config.load import load_config
from job.errors import AccessDenied, ConfigError, StorageUnavailable
from job.publish.card import card_metadata
from job.publish.export import publish_final
from job.publish.hub_push import REPORT_KEY, check_hub_push, hub_push_pending, push_final_to_hub
from job.storage import LocalStore

TOKEN = "hf_standin_write_token_never_logged"
READ_TOKEN = "hf_standin_read_token_never_logged"
REPO = "me/tiny-sft"


@pytest.fixture
def hub(hub_env, monkeypatch) -> Iterator[HubStandIn]:
    tokens = {TOKEN: Token("write", frozenset({"me"})), READ_TOKEN: Token("read", frozenset({"me"}))}
    with serve_hub(HubStandIn(tokens=tokens)) as stand_in:
        monkeypatch.setenv("HF_ENDPOINT", stand_in.endpoint)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield stand_in


def config_for(repo: str | None = REPO, *extra: str):
    hub_repo = [f"publish.hub_repo={repo}"] if repo else []
    return load_config(None, ["data.train=x.jsonl", "run.name=tiny", *hub_repo, *extra], environ={})


@pytest.fixture
def published(tmp_path) -> tuple[LocalStore, Path]:
    """A run store whose final/ is committed (two safetensors shards, index, config, tokenizer, card, curves)."""
    staging = tmp_path / "scratch" / "final-staging"
    staging.mkdir(parents=True)
    torch.manual_seed(0)
    save_file({"embed.weight": torch.randn(64, 32)}, staging / "model-00001-of-00002.safetensors")
    save_file({"lm_head.weight": torch.randn(64, 32)}, staging / "model-00002-of-00002.safetensors")
    index = {"weight_map": {"embed.weight": "model-00001-of-00002.safetensors"}}
    (staging / "model.safetensors.index.json").write_text(json.dumps(index))
    (staging / "config.json").write_text('{"model_type": "mistral"}')
    (staging / "tokenizer.json").write_text('{"version": "1.0"}')
    (staging / "metrics.json").write_text('{"final_loss": 1.25}')
    (staging / "training_curves.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    front = card_metadata("tiny", "mistralai/Mistral-7B-v0.3", ["o/chat"], 1.5)
    (staging / "README.md").write_text(f"---\n{front.strip()}\n---\n\n# tiny\n")
    store = LocalStore(tmp_path / "outputs" / "tiny")
    publish_final(store, staging)
    # What an uploader could leave beside the files: bookkeeping, never weights to push.
    (staging / ".cache" / "huggingface" / "upload").mkdir(parents=True)
    (staging / ".cache" / "huggingface" / "upload" / "model-00001-of-00002.safetensors.metadata").write_text("x")
    return store, staging


def manifest_files(store: LocalStore) -> dict[str, bytes]:
    names = [entry.name for entry in store.read_manifest("final").files]
    return {name: store.read_bytes(f"final/{name}") for name in names}


def test_push_sends_exactly_final_to_a_private_repo_and_records_it(hub, published, tmp_path, capsys) -> None:
    store, staging = published
    config = config_for()
    assert hub_push_pending(config, store)
    report = push_final_to_hub(config, store, staging, tmp_path / "scratch")
    expected = manifest_files(store)
    assert hub.repos[REPO].files == expected  # byte for byte; no MANIFEST.json, no .cache/huggingface
    assert hub.created == [{"name": "tiny-sft", "organization": "me", "visibility": "private", "type": "model"}]
    assert hub.repos[REPO].private and report["private"] is True
    assert hub.validated == [expected["README.md"].decode()]  # the card's metadata went through validate-yaml
    assert report["commit"] == hub.repos[REPO].sha and report["files"] == sorted(expected)
    assert report["bytes"] == sum(len(data) for data in expected.values())
    assert json.loads(store.read_bytes(REPORT_KEY)) == report
    assert not hub_push_pending(config, store)
    logged = capsys.readouterr()
    assert "hub_push_started" in logged.out + logged.err and "hub_push_done" in logged.out + logged.err
    assert f"{hub.endpoint}/{REPO}" in logged.out + logged.err


def test_a_second_start_does_not_push_again(hub, published, tmp_path) -> None:
    store, staging = published
    first = push_final_to_hub(config_for(), store, staging, tmp_path / "scratch")
    before = len(hub.requests)
    assert push_final_to_hub(config_for(), store, None, tmp_path / "scratch") == first
    assert len(hub.requests) == before  # reports/hub-push.json answered: the Hub was not asked


def test_a_lost_record_pushes_again_without_a_new_commit(hub, published, tmp_path) -> None:
    store, staging = published
    first = push_final_to_hub(config_for(), store, staging, tmp_path / "scratch")
    store.delete([REPORT_KEY])  # e.g. the pod died between the Hub's commit and the record
    again = push_final_to_hub(config_for(), store, staging, tmp_path / "scratch")
    assert hub.commit_count(REPO) == 1 and again["commit"] == first["commit"]  # unchanged files: no empty commit
    assert store.exists(REPORT_KEY)


def test_another_repo_gets_its_own_push(hub, published, tmp_path) -> None:
    store, staging = published
    push_final_to_hub(config_for(), store, staging, tmp_path / "scratch")
    assert hub_push_pending(config_for("me/other"), store)
    push_final_to_hub(config_for("me/other"), store, staging, tmp_path / "scratch")
    assert hub.repos["me/other"].files == hub.repos[REPO].files


def test_hub_private_false_creates_a_public_repo(hub, published, tmp_path) -> None:
    store, staging = published
    report = push_final_to_hub(config_for(REPO, "publish.hub_private=false"), store, staging, tmp_path / "scratch")
    assert hub.created[0]["visibility"] == "public"
    assert not hub.repos[REPO].private and report["private"] is False


def test_an_existing_public_repo_keeps_its_visibility_with_a_warning(hub, published, tmp_path, capsys) -> None:
    store, staging = published
    hub.repos[REPO] = Repo("me", private=False)
    report = push_final_to_hub(config_for(), store, staging, tmp_path / "scratch")
    assert report["private"] is False and "hub_repo_is_public" in "".join(capsys.readouterr())


def test_an_already_complete_run_pulls_final_from_the_store(hub, published, tmp_path) -> None:
    store, _ = published
    scratch = tmp_path / "fresh-scratch"
    push_final_to_hub(config_for(), store, None, scratch)
    assert hub.repos[REPO].files == manifest_files(store)
    assert not (scratch / "hub-push" / "final").exists()  # the pulled copy is not left on scratch


def test_the_lfs_path_without_xet(hub, published, tmp_path, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    hub.upload_mode = "lfs"
    store, staging = published
    push_final_to_hub(config_for(), store, staging, tmp_path / "scratch")
    assert hub.repos[REPO].files == manifest_files(store)
    assert hub.repos[REPO].lfs == set(manifest_files(store))
    assert sum(" lfs-upload" in line for line in hub.requests) == len(manifest_files(store))


def test_no_token_is_a_config_error_before_any_request(hub, published, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("HF_TOKEN")
    store, staging = published
    for call in (
        lambda: check_hub_push(config_for()),
        lambda: push_final_to_hub(config_for(), store, staging, tmp_path),
    ):
        with pytest.raises(ConfigError, match="HF_TOKEN is not set") as info:
            call()
        assert info.value.exit_code == 64 and REPO in str(info.value) and "write" in str(info.value)
    assert hub.requests == []
    check_hub_push(config_for(None))  # no repo: nothing to check
    assert push_final_to_hub(config_for(None), store, staging, tmp_path) is None
    assert not hub_push_pending(config_for(None), store)


def test_offline_is_a_config_error(hub, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
        check_hub_push(config_for())


@pytest.mark.parametrize(
    ("token", "repo", "fail", "error", "code", "text"),
    [
        ("hf_unknown_token_never_logged", REPO, {}, AccessDenied, 77, "rejected HF_TOKEN"),
        (READ_TOKEN, REPO, {}, AccessDenied, 77, "HTTP 403"),
        (TOKEN, "someone/their-model", {}, AccessDenied, 77, "HTTP 403"),
        (TOKEN, REPO, {"create": 503}, StorageUnavailable, 69, "HTTP 503"),
        (TOKEN, REPO, {"*": 500}, StorageUnavailable, 69, "HTTP 500"),
    ],
)
def test_hub_answers_map_to_exit_codes_and_never_show_the_token(
    hub, published, tmp_path, monkeypatch, capsys, caplog, token, repo, fail, error, code, text
) -> None:
    hub.repos["someone/their-model"] = Repo("someone", private=False)  # public, owned by another account
    hub.fail.update(fail)
    monkeypatch.setenv("HF_TOKEN", token)
    store, staging = published
    with pytest.raises(error, match=text) as info:
        push_final_to_hub(config_for(repo), store, staging, tmp_path / "scratch")
    assert info.value.exit_code == code and info.value.retryable == (code == 69)
    assert repo in str(info.value)
    if code == 77:
        assert "write access" in str(info.value)
    assert not store.exists(REPORT_KEY) and hub_push_pending(config_for(repo), store)  # the next start pushes
    captured = capsys.readouterr()
    assert token not in str(info.value) + captured.out + captured.err + caplog.text
    assert f"Bearer {token}" in hub.auth_seen  # it was sent, only never shown


def test_an_unreachable_hub_is_retryable(hub_env, published, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    store, staging = published
    with pytest.raises(StorageUnavailable, match="cannot reach the Hub") as info:
        push_final_to_hub(config_for(), store, staging, tmp_path / "scratch")
    assert info.value.exit_code == 69 and TOKEN not in str(info.value)


@pytest.mark.slow
def test_the_job_pushes_after_its_store_commit_and_a_later_start_does_not_push_again(
    hub, tiny_model_dir, tmp_path
) -> None:
    """Through the entrypoint: validate refuses a push it could not make; train commits final/ to the store, then
    pushes exactly it; a start that finds the run complete leaves the Hub alone."""
    from conftest import cpu_run_args, run_job

    online = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.endpoint}
    args = cpu_run_args(
        tmp_path, tiny_model_dir, "pushed", "--set", f"publish.hub_repo={REPO}", "--set", "train.max_steps=4"
    )
    refused = run_job("validate", *args[1:], env={**online, "HF_TOKEN": ""})
    assert refused.returncode == 64, refused.stderr[-2000:]
    assert "HF_TOKEN" in refused.stderr

    first = run_job(*args, env={**online, "HF_TOKEN": TOKEN})
    assert first.returncode == 0, first.stderr[-3000:]
    store = LocalStore(tmp_path / "outputs" / "pushed")
    assert hub.repos[REPO].files == manifest_files(store) and hub.repos[REPO].private
    assert json.loads(store.read_bytes(REPORT_KEY))["commit"] == hub.repos[REPO].sha
    events = [line.get("event") for line in first.lines]
    assert events.index("final_published") < events.index("hub_push_done")
    assert TOKEN not in first.stderr + first.stdout

    commits = hub.commit_count(REPO)
    again = run_job(*args, env={**online, "HF_TOKEN": TOKEN})
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.events("already_complete") and not again.events("hub_push_started")
    assert hub.commit_count(REPO) == commits
