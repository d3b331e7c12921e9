"""End to end: `entrypoint.py train` as a subprocess on the tiny model and the demo task.

One reference run is shared by the assertions (tests/conftest.py); a second identical run checks
bitwise reproducibility.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import DEMO_EVAL, JobProcess, JobResult, cpu_run_args, run_job
from job.data.masking import IGNORE_INDEX, tokenize_examples
from job.data.read import load_dataset
from job.storage.manifest import Manifest, sha256_file

pytestmark = pytest.mark.slow


def answer_loss(model_dir: Path) -> float:
    """Mean cross-entropy on the held-out answers (assistant tokens only), computed independently."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.chat_template is None:  # the base model has none; the job used its shipped default
        from job.data.masking import default_chat_template

        tokenizer.chat_template = default_chat_template()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    examples = load_dataset(DEMO_EVAL).examples
    data = tokenize_examples(examples, tokenizer, max_length=256, train_on="assistant")
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in zip(data.input_ids, data.labels, strict=True):
            logits = model(torch.tensor([ids])).logits[0, :-1]
            target = torch.tensor(labels[1:])
            keep = target != IGNORE_INDEX
            total += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            count += int(keep.sum())
    return total / count


def test_held_out_answer_loss_halves(reference_run, tiny_model_dir) -> None:
    _, run_dir = reference_run
    before, after = answer_loss(tiny_model_dir), answer_loss(run_dir / "final")
    assert after <= before / 2, (before, after)


def test_final_layout_loads_and_manifest_is_true(reference_run) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, run_dir = reference_run
    final = run_dir / "final"
    names = sorted(p.name for p in final.iterdir())
    for required in ("MANIFEST.json", "README.md", "config.json", "generation_config.json", "metrics.json"):
        assert required in names
    assert "model.safetensors" in names or "model.safetensors.index.json" in names
    assert "tokenizer.json" in names and "chat_template.jinja" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    manifest = Manifest.from_json((final / "MANIFEST.json").read_bytes())
    assert sorted(e.name for e in manifest.files) == [n for n in names if n != "MANIFEST.json"]
    for entry in manifest.files:
        assert (final / entry.name).stat().st_size == entry.size
        assert sha256_file(final / entry.name) == entry.sha256
    assert manifest.created >= max((final / e.name).stat().st_mtime for e in manifest.files) - 1
    tokenizer = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    assert tokenizer.chat_template and "[INST]" in tokenizer.chat_template
    assert tokenizer.pad_token == "<unk>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert sum(p.numel() for p in model.parameters()) == 4_292_928
    assert (run_dir / "config.resolved.yaml").is_file()


def test_metrics_and_card(reference_run) -> None:
    import yaml

    _, run_dir = reference_run
    metrics = json.loads((run_dir / "final" / "metrics.json").read_text())
    assert metrics["steps"] == 24 and metrics["final_step"] == 24
    assert [s for s, _ in metrics["loss_per_step"]] == list(range(1, 25))
    assert math.isfinite(metrics["eval_loss"]) and metrics["trained_tokens"] > 0
    card = (run_dir / "final" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert "base_model" not in front and "sft" in front["tags"]  # a local base model has no Hub id
    assert front["license"] == "other" and front["license_name"] == "base-model-license"
    assert front["model-index"][0]["results"][0]["metrics"][0]["value"] == metrics["eval_loss"]
    assert len(front["datasets"]) == 1 and front["datasets"][0].endswith("examples/demo/train.jsonl")  # as given
    assert "| 100.0% |" in card  # the one source's row in the sources table
    assert sha256_file(Path("examples/demo/train.jsonl")) in card
    assert "learning_rate: 0.003" in card  # the resolved config


def test_card_plot_covers_exactly_the_logged_steps(reference_run) -> None:
    from job.publish.card import PLOT_NAME, plot_curves
    from job.publish.metrics import read_step_metrics
    from job.storage import LocalStore

    _, run_dir = reference_run
    steps = read_step_metrics(LocalStore(run_dir))
    metrics = json.loads((run_dir / "final" / "metrics.json").read_text())
    figure = plot_curves(steps, [(24, metrics["eval_loss"])])
    train_line, eval_line = figure.axes[0].lines
    assert list(train_line.get_xdata()) == list(range(1, 25))
    assert list(train_line.get_ydata()) == [loss for _, loss in metrics["loss_per_step"]]
    assert list(eval_line.get_xdata()) == [24]
    assert list(figure.axes[1].lines[0].get_xdata()) == list(range(1, 25))  # learning rate every step
    manifest = json.loads((run_dir / "final" / "MANIFEST.json").read_text())
    assert PLOT_NAME in [f["name"] for f in manifest["files"]]
    assert (run_dir / "final" / PLOT_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (run_dir / "final" / "README.md").read_text()
    assert f"]({PLOT_NAME})" in card and '"preemptions_survived": 0' in card


def test_logs_are_json_lines_with_run_name_and_step_fields(reference_run) -> None:
    result, _ = reference_run
    lines = result.lines  # every stderr line parses as JSON
    assert lines and all(line.get("run") == "reference" for line in lines[1:])
    steps = result.events("step")
    assert [s["step"] for s in steps] == [4, 8, 12, 16, 20, 24]
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_second", "elapsed_seconds", "eta_seconds"):
        assert all(s[key] is not None for s in steps), key
    assert steps[-1]["eta_seconds"] == 0
    assert "Writing model shards" not in result.stderr  # no progress bars in JSON mode
    masked = result.events("example_masked")[0]["text"]
    assert "«The capital of" in masked and masked.endswith("</s>»")
    assert result.events("chat_template_default_used")


@pytest.fixture(scope="module")
def rerun_and_twin(reference_run, tiny_model_dir) -> tuple[dict, JobResult, JobResult]:
    """The reference run started again (a no-op) and a twin of it, started together: the no-op is mostly
    imports, which take the second core while the twin starts. (mtimes of the reference before, rerun, twin)"""
    _, run_dir = reference_run
    tmp = run_dir.parent.parent
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    # The twin also reports to TensorBoard: the same weights, and its event files must reach the store.
    twin = JobProcess(*cpu_run_args(tmp, tiny_model_dir, "twin", "--set", "train.report_to=[tensorboard]"))
    again = run_job(*cpu_run_args(tmp, tiny_model_dir, "reference"))
    return before, again, twin.result()


def test_rerun_of_a_finished_run_is_a_no_op(reference_run, rerun_and_twin) -> None:
    _, run_dir = reference_run
    before, again, _ = rerun_and_twin
    assert again.returncode == 0
    assert again.events("already_complete") and not again.events("training_started")
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


def test_same_seed_gives_bitwise_identical_weights(reference_run, rerun_and_twin, tiny_model_dir) -> None:
    from safetensors.torch import load_file

    _, run_dir = reference_run
    tmp = run_dir.parent.parent
    twin = rerun_and_twin[2]
    assert twin.returncode == 0, twin.stderr[-3000:]
    first = load_file(run_dir / "final" / "model.safetensors")
    second = load_file(tmp / "outputs" / "twin" / "final" / "model.safetensors")
    base = load_file(tiny_model_dir / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert all(first[k].dtype == torch.float32 for k in first)
    assert not all(torch.equal(first[k], base[k]) for k in first)  # it did train


def test_tensorboard_event_files_of_a_real_run_reach_the_stores_logs(reference_run, rerun_and_twin) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir = reference_run
    twin = rerun_and_twin[2]
    assert twin.returncode == 0, twin.stderr[-3000:]
    starts = sorted((run_dir.parent / "twin" / "logs" / "tensorboard").iterdir())
    assert len(starts) == 1
    events = EventAccumulator(str(starts[0]))
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == [4, 8, 12, 16, 20, 24]
    assert not (run_dir / "logs" / "tensorboard").exists()  # report_to none: nothing


def test_the_card_names_each_source_and_its_token_share() -> None:
    import yaml

    from job.config.load import load_config
    from job.publish.card import render_card

    config = load_config(None, ["data.train=x.jsonl"], environ={})
    sources = [
        {"name": "hf://datasets/org/set@v1/data/*.parquet", "format": "sharegpt", "revision": "c0ffee",
         "examples": 30, "tokens": 300, "token_share": 0.75},
        {"name": "s3://bucket/mine.jsonl", "format": "alpaca", "revision": None, "examples": 10, "tokens": 100,
         "token_share": 0.25},
    ]  # fmt: skip
    card = render_card(config, base_model="m", revision=None, data_files={}, metrics={}, sources=sources, plot=None)
    front = yaml.safe_load(card.split("---")[1])
    assert front["datasets"] == ["org/set", "s3://bucket/mine.jsonl"]
    assert "| `hf://datasets/org/set@v1/data/*.parquet` | sharegpt | `c0ffee` | 30 | 300 | 75.0% |" in card
    assert "| `s3://bucket/mine.jsonl` | alpaca | `-` | 10 | 100 | 25.0% |" in card


def test_every_line_of_a_real_run_carries_severity_message_and_time(reference_run) -> None:
    result, _ = reference_run
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert len(lines) > 20 and all({"severity", "message", "time", "event"} <= line.keys() for line in lines)
    assert {line["severity"] for line in lines} <= {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
    step = next(line for line in lines if line["event"] == "step")
    assert step["message"].startswith(f"step step={step['step']} max_steps=")
    assert f"loss={step['loss']}" in step["message"]


def test_card_metadata_reads_back_through_huggingface_hub() -> None:
    from huggingface_hub import ModelCard

    from job.config.load import load_config
    from job.publish.card import render_card

    config = load_config(None, ["data.train=x.jsonl"], environ={})
    sources = [{"name": "hf://datasets/org/set@v1", "format": "alpaca", "revision": "c0ffee", "examples": 3,
                "tokens": 30, "token_share": 1.0}]  # fmt: skip
    common = {"revision": None, "data_files": {}, "sources": sources, "plot": None}
    hub = ModelCard(render_card(config, base_model="org/base-7b", hub_id="org/base-7b",
                                metrics={"eval_loss": 1.25}, **common))  # fmt: skip
    assert (hub.data.base_model, hub.data.license, hub.data.license_name) == ("org/base-7b", "other",
                                                                              "base-model-license")  # fmt: skip
    assert hub.data.license_link == "https://huggingface.co/org/base-7b" and hub.data.datasets == ["org/set"]
    [result] = hub.data.eval_results
    assert (result.metric_type, result.metric_value, result.dataset_type) == ("loss", 1.25, "org/set")
    local = ModelCard(render_card(config, base_model="s3://bucket/models/base/", metrics={}, **common))
    assert local.data.base_model is None and local.data.eval_results is None  # no Hub id, no eval: none claimed
    assert "s3://bucket/models/base/" in local.text  # the body still names where the base model came from


def test_start_checks_scratch_speed_and_skips_the_driver_check_without_a_gpu(reference_run) -> None:
    result, _ = reference_run
    speed = result.events("scratch_speed")
    assert len(speed) == 1 and speed[0]["mib_per_second"] > 0 and speed[0]["checkpoint_write_seconds"] >= 0
    assert 0 < speed[0]["checkpoint_gib"] < 1 and not result.events("scratch_too_slow")
    assert not result.events("gpu_driver")  # no libcuda here: a CPU run, skipped quietly
    print(json.dumps(speed[0]))
