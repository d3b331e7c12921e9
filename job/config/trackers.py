"""`train.report_to`: every tracker it names must be one transformers knows and installed here.

Checked when the config loads, so `validate` and `train` refuse it with exit 64 before any download.
Left to the Trainer, a missing tracker raises while the Trainer is built: exit 1, retried six times
by a Kubernetes Job, each after the data and the model were pulled again.
"""

from __future__ import annotations

import netrc
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from job.errors import ConfigError
from job.logs import shorten

AVAILABLE = {
    "tensorboard": ("is_tensorboard_available", "tensorboard"),
    "wandb": ("is_wandb_available", "wandb"),
    "mlflow": ("is_mlflow_available", "mlflow-skinny"),  # the client; the extra `mlflow` installs it
    "comet_ml": ("is_comet_available", "comet_ml"),
    "clearml": ("is_clearml_available", "clearml"),
    "neptune": ("is_neptune_available", "neptune"),
    "azure_ml": ("is_azureml_available", "azureml-core"),
    "dvclive": ("is_dvclive_available", "dvclive"),
    "codecarbon": ("is_codecarbon_available", "codecarbon"),
    "swanlab": ("is_swanlab_available", "swanlab"),
    "trackio": ("is_trackio_available", "trackio"),
    "dagshub": ("is_dagshub_available", "dagshub"),
    "flyte": ("is_flytekit_available", "flytekit"),
    "kubeflow": ("is_kubeflow_available", "kubeflow"),
}
"""Each transformers reporting integration: its availability check in `transformers.integrations`, and the
package that provides it."""


def tracker_names(report_to: Any) -> list[str]:
    """The trackers `report_to` names (a name, a list of names, `none` or `all`), `all` left as it is."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    return [str(name).strip() for name in names if str(name).strip() not in ("", "none")]


def check_trackers(report_to: Any) -> None:
    """ConfigError naming each tracker that transformers does not know or that is not installed."""
    import transformers.integrations as integrations

    names = tracker_names(report_to)
    if names == ["all"]:
        return  # transformers takes the installed ones
    unknown = [name for name in names if name not in AVAILABLE]
    if unknown:
        raise ConfigError(
            f"train.report_to names {shorten(repr(unknown))}: not a tracker transformers reports to",
            hint=f"use none, all, or some of: {', '.join(sorted(AVAILABLE))}",
        )
    missing = [name for name in names if not getattr(integrations, AVAILABLE[name][0])()]
    if missing:
        packages = " ".join(AVAILABLE[name][1] for name in missing)
        verb = "is" if len(missing) == 1 else "are"
        raise ConfigError(
            f"train.report_to names {', '.join(missing)}, which {verb} not installed in this environment",
            hint=f"install it (pip install {packages}; the image ships the extras tensorboard, mlflow and wandb), "
            "or set train.report_to: none",
        )


WANDB_OFFLINE_MODES = ("offline", "disabled", "dryrun")
WANDB_HOST = "https://api.wandb.ai"


def check_tracker_credentials(report_to: Any, environ: Mapping[str, str] = os.environ) -> None:
    """ConfigError (64) for W&B online without credentials: W&B's login would fail when the Trainer starts it, after
    the data and the model were pulled, as exit 1, retried six times by a Kubernetes Job.

    Credentials are `WANDB_API_KEY` or a `~/.netrc` entry for the W&B host (`wandb login`); offline and disabled
    modes need none. Read from the environment at `validate` and at the start of `train`, not at config load."""
    if "wandb" not in tracker_names(report_to):
        return  # `all` takes only what works; TensorBoard and a file MLflow store need no key
    if environ.get("WANDB_MODE", "").strip().lower() in WANDB_OFFLINE_MODES or environ.get("WANDB_API_KEY"):
        return
    host = urlparse(environ.get("WANDB_BASE_URL") or WANDB_HOST).hostname or ""
    path = environ.get("NETRC") or str(Path(environ.get("HOME") or Path.home()) / ".netrc")
    try:
        if netrc.netrc(path).authenticators(host):
            return
    except (OSError, netrc.NetrcParseError):
        pass  # no ~/.netrc, or one W&B could not read either
    raise ConfigError(
        f"train.report_to names wandb, but there are no W&B credentials "
        f"(no WANDB_API_KEY, no ~/.netrc entry for {host})",
        hint="set WANDB_API_KEY (on Kubernetes: the sft-job-trackers Secret), or WANDB_MODE=offline to keep the "
        "run's W&B files on scratch",
    )
