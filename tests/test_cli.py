"""CLI: exit codes mapped in one place, help text, validate, config reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import DEMO_TRAIN, REPO, JobProcess, run_job, write_jsonl
from job.cli import config_reference_markdown, main


def exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return int(info.value.code)


def test_usage_errors_exit_64_not_2(capsys) -> None:
    assert exit_code(["train", "--no-such-option"]) == 64
    assert exit_code(["no-such-command"]) == 64
    assert "No such option" in capsys.readouterr().err


def test_config_errors_exit_64(capsys) -> None:
    assert exit_code(["config", "--set", "data.train=x", "--set", "train.learning_rat=1"]) == 64
    assert "did you mean 'learning_rate'" in capsys.readouterr().err


def test_help_documents_options_and_environment(capsys) -> None:
    assert exit_code(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for needle in ("--config", "--set", "SFT_CONFIG", "SFT_<SECTION>__<KEY>", "HF_TOKEN", "AWS_ENDPOINT_URL"):
        assert needle in text


def test_docs_config_reference_is_current() -> None:
    page = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    assert page == config_reference_markdown() + "\n", (
        "regenerate with: python entrypoint.py config --reference > docs/config.md"
    )


def test_config_command_prints_resolved_yaml(capsys, monkeypatch) -> None:
    monkeypatch.setenv("SFT_TRAIN__SEED", "9")
    assert exit_code(["config", "--config", str(REPO / "examples/cpu-demo.yaml")]) == 0
    assert "seed: 9" in capsys.readouterr().out


@pytest.mark.slow
def test_exit_codes_for_bad_inputs(tmp_path: Path) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "only a question"}]}])

    def common(scratch: str) -> list[str]:
        return ["--set", f"run.output={tmp_path / 'out'}", "--set", f"run.scratch={tmp_path / scratch}"]

    # Three independent processes that mostly import, started together (2 cores: faster than in turn).
    bad_data = JobProcess("validate", "--set", f"data.train={bad}", *common("s1"))
    missing = JobProcess("validate", "--set", f"data.train={tmp_path / 'missing.jsonl'}", *common("s2"))
    no_model = JobProcess(
        "train", "--set", f"data.train={DEMO_TRAIN}", "--set", "model.source=/nonexistent/model", *common("s3")
    )
    result = bad_data.result()
    assert result.returncode == 65
    failure = result.events("job_failed")[0]
    assert f"{bad}:1" in failure["error"] and failure["exit_code"] == 65 and "exception" not in failure
    result = missing.result()
    assert result.returncode == 66
    result = no_model.result()
    assert result.returncode == 66 and "not a model directory" in result.events("job_failed")[0]["error"]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("MANIFEST.json"))


@pytest.mark.slow
def test_validate_reports_statistics_as_json(tmp_path: Path) -> None:
    result = run_job(
        "validate",
        "--json",
        "--config", str(REPO / "examples/cpu-demo.yaml"),
        "--set", f"run.scratch={tmp_path / 's'}",
        "--set", f"run.output={tmp_path / 'o'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["records"] == 240 and report["examples"] == 240 and report["eval_examples"] == 40
    assert 0 < report["trainable_tokens"] < report["tokens"]
    assert report["optimizer_steps_per_epoch"] == 30
    assert not result.events("model_loaded")  # no weights were loaded
    assert not (tmp_path / "o").exists()  # validate writes nothing to the store


@pytest.mark.slow
def test_sigterm_during_start_up_imports_exits_75_not_minus_15(tmp_path: Path) -> None:
    """The run's own handler comes after seconds of imports; a preemption in them is still a preemption."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "SFT_LOG_FORMAT": "json", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "entrypoint.py"), "validate", "--set", f"data.train={DEMO_TRAIN}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(1.0)  # inside setup_logging's library imports on this machine
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 75


def test_json_commands_print_one_json_document_even_when_they_fail(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": 3}\nnot json\n')  # fmt: skip
    where = ["--set", f"run.scratch={tmp_path / 's'}", "--set", f"run.output={tmp_path / 'o'}"]
    assert exit_code(["validate", "--json", "--set", f"data.train={bad}", *where]) == 65
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["exit_code"] == 65 and report["error_type"] == "DataError"
    assert [(e["file"], e["line"]) for e in report["errors"]] == [(str(bad), 2), (str(bad), 3)]

    assert exit_code(["validate", "--json", "--config", str(tmp_path / "missing.yaml")]) == 64
    report = json.loads(capsys.readouterr().out)
    assert (report["ok"], report["exit_code"]) == (False, 64) and "missing.yaml" in report["errors"][0]["message"]

    no_tokenizer = tmp_path / "weights-only"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_bytes((tiny_model_dir / "config.json").read_bytes())
    argv = [
        "plan",
        "--json",
        "--with-data",
        "--set",
        f"model.source={no_tokenizer}",
        "--set",
        f"data.train={DEMO_TRAIN}",
    ]
    assert exit_code([*argv, *where]) == 66
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["ok"] is False and "no usable tokenizer" in report["message"]
    assert "Traceback" not in captured.err and "unexpected_error" not in captured.err


def test_validate_show_prints_examples_with_the_trained_spans_marked(tmp_path: Path, capsys) -> None:
    fixture = REPO / "tests" / "fixtures" / "data" / "messages.jsonl"
    where = ["--set", f"data.train={fixture}", "--set", "model.source=builtin:tiny-mistral",
             "--set", f"run.scratch={tmp_path / 's'}", "--set", f"run.output={tmp_path / 'o'}"]  # fmt: skip
    assert exit_code(["validate", "--json", "--show", "1", *where]) == 0
    (shown,) = json.loads(capsys.readouterr().out)["shown"]
    assert shown["trained"] == ["Strelsau is the capital.</s>"]  # the assistant turn and its end, nothing else
    assert shown["source"].endswith("messages.jsonl:1")
    assert shown["text"].startswith("<s>[INST]") and shown["text"].endswith("[/INST] Strelsau is the capital.</s>")
    assert "Answer in one sentence." in shown["text"] and "What is the capital of Ruritania?" in shown["text"]

    assert exit_code(["validate", "--show", "2", *where]) == 0
    out = capsys.readouterr().out
    assert "[/INST] «Strelsau is the capital.</s>»" in out and "«Joined.</s>»" in out and "«Still joined.</s>»" in out
    assert "\x1b" not in out and "shown:" not in out  # not a terminal: no color; the examples are not in the summary
    assert exit_code(["validate", "--show", "-1", *where]) == 64
