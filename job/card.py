"""The model card (`final/README.md`) in the Hugging Face format: YAML front matter, then facts."""

from __future__ import annotations

import json
from typing import Any

import yaml

from job import __version__
from job.config import JobConfig, to_yaml


def render_card(
    config: JobConfig,
    *,
    base_model: str,
    revision: str | None,
    data_files: dict[str, str],
    metrics: dict[str, Any],
) -> str:
    front = {
        "base_model": base_model,
        "license": "other",  # placeholder: the base model's license applies; set it before publishing
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["sft", "trl", "full-fine-tune", "sft-job"],
        "datasets": sorted(data_files),
    }
    files = "\n".join(f"| `{name}` | `{digest}` |" for name, digest in sorted(data_files.items()))
    shown = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}
    return f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---

# {config.run.name}

Full-parameter supervised fine-tune of `{base_model}` (revision `{revision or "default"}`),
trained by sft-job {__version__} with TRL's `SFTTrainer`.

## Training data

| file | sha256 |
|---|---|
{files}

Format `{metrics.get("data_format", config.data.format)}`, loss on `{config.data.train_on}` tokens,
max length {config.data.max_length}.

## Results

```json
{json.dumps(shown, indent=2, sort_keys=True)}
```

## Resolved configuration

```yaml
{to_yaml(config).strip()}
```
"""
