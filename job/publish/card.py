"""The model card (`final/README.md`) in the Hugging Face format, with its training-curve plot.

YAML front matter (base_model, license placeholder, tags, datasets), then the facts an owner
needs afterwards: data fingerprint and statistics, hardware, wall time, tokens, throughput,
eval results, preemptions survived, the full resolved config, and `training_curves.png`
(loss, learning rate and eval loss per step, read from the run's metrics chunks). The card is
public: the credentials of every URL in it (model source, data files, config) are masked.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from job import __version__
from job.config.load import to_yaml
from job.config.schema import JobConfig
from job.logs import redact_urls

PLOT_NAME = "training_curves.png"
HUB_DATASET_PREFIX = "hf://datasets/"


def plot_curves(steps: list[dict[str, Any]], evals: list[tuple[int, float]] | None = None) -> Any:
    """A matplotlib Figure: loss (and eval loss) above, learning rate below, one point per logged step."""
    import matplotlib

    matplotlib.use("Agg")  # no display in a container
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 6), dpi=100)
    loss_axes, lr_axes = figure.subplots(2, 1, sharex=True)
    xs = [s["step"] for s in steps]
    loss_axes.plot(xs, [s["loss"] for s in steps], label="train loss", linewidth=1)
    if evals:
        loss_axes.plot([e[0] for e in evals], [e[1] for e in evals], "o-", label="eval loss")
    loss_axes.set_ylabel("loss")
    loss_axes.legend()
    loss_axes.grid(alpha=0.3)
    lr_steps = [s for s in steps if s.get("learning_rate") is not None]
    lr_axes.plot([s["step"] for s in lr_steps], [s["learning_rate"] for s in lr_steps], color="tab:green")
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_xlabel("optimizer step")
    lr_axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def render_card(
    config: JobConfig,
    *,
    base_model: str,
    revision: str | None,
    data_files: dict[str, str],
    metrics: dict[str, Any],
    facts: dict[str, Any] | None = None,
    plot: str | None = PLOT_NAME,
    sources: list[dict[str, Any]] | None = None,
    hub_id: str | None = None,
) -> str:
    """The card's text. `sources`: the mixture summary (`job.data.mixture`), one entry per `data.train` source;
    `hub_id`: the base model's Hub id when it came from the Hub (the metadata's `base_model` is a Hub id only)."""
    datasets = [dataset_name(source["name"]) for source in sources] if sources else sorted(data_files)
    front = card_metadata(config.run.name, hub_id, datasets, metrics.get("eval_loss"))
    files = "\n".join(f"| `{name}` | `{digest}` |" for name, digest in sorted(data_files.items()))
    mixture = _mixture_table(sources) if sources else ""
    shown = {k: v for k, v in {**metrics, **(facts or {})}.items() if not isinstance(v, (list, dict))}
    curves = f"\n## Training curves\n\n![loss and learning rate]({plot})\n" if plot else ""
    # One pass over the whole text: base_model, data file names and facts can all be URLs.
    return redact_urls(f"""---
{front.strip()}
---

# {config.run.name}

Full-parameter supervised fine-tune of `{base_model}` (revision `{revision or "default"}`),
trained by sft-job {__version__} with TRL's `SFTTrainer`.

## Training data

| file | sha256 |
|---|---|
{files}
{mixture}
Format `{metrics.get("data_format", config.data.format)}`, loss on `{config.data.train_on}` tokens,
max length {config.data.max_length}.

## Results and run facts

```json
{json.dumps(shown, indent=2, sort_keys=True)}
```
{curves}
## Resolved configuration

```yaml
{to_yaml(config).strip()}
```
""")


def card_metadata(name: str, hub_id: str | None, datasets: list[str], eval_loss: Any) -> str:
    """The YAML front matter, built by huggingface_hub's `ModelCardData` so the Hub reads it as written: the
    base model's license applies (`other`, named and linked), and the eval loss is a `model-index` result."""
    from huggingface_hub import EvalResult, ModelCardData

    results = None
    if isinstance(eval_loss, (int, float)) and math.isfinite(eval_loss) and datasets:
        results = [
            EvalResult(task_type="text-generation", dataset_type=datasets[0], dataset_name=datasets[0],
                       metric_type="loss", metric_name="eval loss", metric_value=float(eval_loss))
        ]  # fmt: skip
    data = ModelCardData(
        base_model=hub_id,
        license="other",
        license_name="base-model-license",  # a fine-tune is under its base model's license
        license_link=f"https://huggingface.co/{hub_id}" if hub_id else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["sft", "trl", "full-fine-tune", "sft-job"],
        datasets=datasets,
        model_name=name if results else None,
        eval_results=results,
    )
    return data.to_yaml()


def dataset_name(source: str) -> str:
    """A source as the card's `datasets` names it: a Hub dataset by its id, anything else by its URI or path."""
    if source.startswith(HUB_DATASET_PREFIX):
        repo = source.removeprefix(HUB_DATASET_PREFIX).split("@", 1)[0]
        return "/".join(repo.split("/")[:2])
    return source


def _mixture_table(sources: list[dict[str, Any]]) -> str:
    rows = "\n".join(
        f"| `{s['name']}` | {s.get('format')} | `{s.get('revision') or '-'}` | {s.get('examples')} | "
        f"{s.get('tokens')} | {100 * (s.get('token_share') or 0):.1f}% |"
        for s in sources
    )
    return (
        "\nSources, with the share of the trained tokens each gave:\n\n"
        "| source | format | revision | examples | tokens | token share |\n|---|---|---|---:|---:|---:|\n"
        f"{rows}\n"
    )


def write_plot(figure: Any, directory: Path) -> Path:
    path = directory / PLOT_NAME
    figure.savefig(path, format="png")
    return path


def hardware() -> str:
    """What trained the model, for the card: the GPU and its memory, or the CPU."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB)"
    import platform

    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
