"""The trackers `train.report_to` names: their files under scratch, their runs continued after preemption,
and their local files pushed to the run's `logs/` in the store.

transformers builds the tracker callbacks from `report_to` and environment variables read when the Trainer
is built, so `configure_trackers` sets those (only where the user has not) before it is: TensorBoard, W&B
and a default MLflow store write under the run's scratch directory (never the read-only image or the working
directory), and W&B and MLflow runs get an id derived from the run, so a restart logs into the same run.
Rank 0 pushes TensorBoard's event files (and a local MLflow store) at each checkpoint and at the end.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from job.config.schema import JobConfig
from job.config.trackers import tracker_names
from job.logs import get_logger
from job.storage import Store
from job.storage.base import join_key

log = get_logger(__name__)

TRACKERS_DIR = "trackers"
"""Below the run's scratch work directory."""
TENSORBOARD_PREFIX = "logs/tensorboard"
MLFLOW_PREFIX = "logs/mlflow"
DEFAULT_PROJECT = "sft-job"
"""W&B project and MLflow experiment when WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME are unset."""
RUN_ID_TAG = "sft_job.run_id"
"""MLflow tag holding `tracker_run_id`: how a restart finds the run an earlier start created."""
CONFIGURED = ("tensorboard", "mlflow", "wandb")
SMALL_FILE = 64 * 1024
"""Files up to this size are compared by content before a push (MLflow rewrites its params on every start)."""

WANDB_DIRS = {
    "WANDB_DIR": "",  # the run directories: <dir>/wandb/run-... (offline-run-... in offline mode)
    "WANDB_CACHE_DIR": "cache",
    "WANDB_CONFIG_DIR": "config",
    "WANDB_DATA_DIR": "data",
    "WANDB_ARTIFACT_DIR": "artifacts",  # else ./artifacts: the working directory, read-only in the image
}
ENV_VARS = (
    "TENSORBOARD_LOGGING_DIR",
    *WANDB_DIRS,
    "WANDB_RUN_ID",
    "WANDB_RESUME",
    "WANDB_PROJECT",
    "WANDB_NAME",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_ALLOW_FILE_STORE",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_RUN_ID",
)
"""Every variable `configure_trackers` may set (never one the user set)."""


def enabled_trackers(report_to: Any) -> list[str]:
    """Which of TensorBoard, MLflow and W&B `report_to` turns on (`all`: those installed, as transformers does)."""
    names = tracker_names(report_to)
    if names == ["all"]:
        from transformers.integrations import get_available_reporting_integrations

        names = get_available_reporting_integrations()
    return [name for name in CONFIGURED if name in names]


def tracker_run_id(run_uri: str, name: str) -> str:
    """A W&B / MLflow-tag id for the run at `run_uri`: the same on every start, another for another run.

    W&B ids may not hold `:;,#?/'`; this keeps letters, digits, `-` and `_`: the run name (its dots as dashes,
    at most 48 characters) and 10 hex digits of the run's store URI (two runs of one name in two buckets differ).
    """
    stem = re.sub(r"[^A-Za-z0-9_-]", "-", name)[:48]
    return f"{stem}-{hashlib.sha256(run_uri.encode()).hexdigest()[:10]}"


def configure_trackers(
    config: JobConfig,
    work_dir: Path,
    store: Store,
    *,
    is_main: bool = True,
    fence: Callable[[], None] | None = None,
) -> list[TrainerCallback]:
    """Set the trackers' environment for the Trainer about to be built; the callbacks to add to it (rank 0:
    the push of local tracker files to `logs/`, each push behind `fence`, the run's lease). Sets only variables
    the user has not set."""
    trackers = enabled_trackers(config.train.extra.get("report_to"))
    if not trackers:
        return []
    root = work_dir / TRACKERS_DIR
    run_id = tracker_run_id(store.uri, config.run.name)
    pushes: list[PushedDir] = []
    facts: dict[str, Any] = {"trackers": trackers}
    if "tensorboard" in trackers:
        # One TensorBoard run per start: a resumed start logs again the steps after its checkpoint, which
        # TensorBoard would draw over the earlier start's in one run (it purges such steps only for TF's own logs).
        now = time.time()
        start = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
        tensorboard = _default_dir("TENSORBOARD_LOGGING_DIR", root / "tensorboard" / start)
        facts["tensorboard_dir"] = str(tensorboard)
        pushes.append(PushedDir(tensorboard, f"{TENSORBOARD_PREFIX}/{start}", replace=False))
    if "wandb" in trackers:
        for variable, sub in WANDB_DIRS.items():
            _default_dir(variable, root / "wandb" / sub)
        os.environ.setdefault("WANDB_RUN_ID", run_id)
        os.environ.setdefault("WANDB_RESUME", "allow")  # the id's run if it exists, else a new one
        os.environ.setdefault("WANDB_PROJECT", DEFAULT_PROJECT)
        os.environ.setdefault("WANDB_NAME", config.run.name)
        facts |= {"wandb_run_id": os.environ.get("WANDB_RUN_ID"), "wandb_dir": os.environ.get("WANDB_DIR")}
    if "mlflow" in trackers:
        local = configure_mlflow(root / "mlruns", store, run_id, config.run.name, is_main=is_main)
        if local is not None:
            pushes.append(PushedDir(local, MLFLOW_PREFIX, replace=True))
        facts["mlflow_tracking_uri"] = os.environ["MLFLOW_TRACKING_URI"]
        facts["mlflow_run_id"] = os.environ.get("MLFLOW_RUN_ID")
    if not is_main:
        return []
    log.info("trackers_configured", **facts)
    mlflow_run_id = facts.get("mlflow_run_id")
    if not (pushes or mlflow_run_id):
        return []
    return [PushTrackerFiles(store, pushes, mlflow_run_id=mlflow_run_id, fence=fence)]


def _default_dir(variable: str, default: Path) -> Path:
    """The directory `variable` names, set to `default` (and created) when the user has not set it."""
    if not os.environ.get(variable):
        default.mkdir(parents=True, exist_ok=True)
        os.environ[variable] = str(default)
    return Path(os.environ[variable]).expanduser()


def configure_mlflow(local: Path, store: Store, run_id: str, name: str, *, is_main: bool) -> Path | None:
    """MLflow's tracking URI (a file store at `local` unless MLFLOW_TRACKING_URI is set), experiment, and on
    rank 0 MLFLOW_RUN_ID: the run tagged with `run_id`, created by the first start. The local store, if it is
    the one used (to push), else None. A fresh scratch first gets the store's `logs/mlflow/` back, so the run
    an earlier start created is found there."""
    ours = not os.environ.get("MLFLOW_TRACKING_URI")
    if ours:
        local.mkdir(parents=True, exist_ok=True)
        os.environ["MLFLOW_TRACKING_URI"] = local.as_uri()
        # MLflow 3.17 refuses a file store unless told to (its sqlite store needs the full `mlflow` package).
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", DEFAULT_PROJECT)
    if not is_main:
        return None
    if ours and not any(local.iterdir()):
        try:
            pulled = store.pull(local, MLFLOW_PREFIX)
        except Exception as exc:  # the earlier starts' metrics are lost to the new run, training is not
            log.warning("mlflow_store_not_restored", prefix=MLFLOW_PREFIX, error=str(exc))
        else:
            if pulled:
                complete_file_store(local)
                log.info("mlflow_store_restored", files=len(pulled), prefix=MLFLOW_PREFIX)
    if not os.environ.get("MLFLOW_RUN_ID"):
        try:
            os.environ["MLFLOW_RUN_ID"] = find_or_create_mlflow_run(
                os.environ["MLFLOW_TRACKING_URI"], os.environ["MLFLOW_EXPERIMENT_NAME"], run_id, name
            )
        except Exception as exc:  # transformers' callback then starts a new run, or fails as it would have
            log.warning("mlflow_run_not_resumed", run_id=run_id, error=str(exc))
    return local if ours else None


def complete_file_store(root: Path) -> None:
    """Recreate the run directories an object store drops when empty (`artifacts/`, often): MLflow's file store
    does not know a run without all of them."""
    for meta in root.glob("*/*/meta.yaml"):
        for sub in ("artifacts", "metrics", "params", "tags"):
            (meta.parent / sub).mkdir(exist_ok=True)


def find_or_create_mlflow_run(tracking_uri: str, experiment: str, run_id: str, name: str) -> str:
    """The MLflow run id of the run tagged `run_id` in `experiment` (the oldest, if several), created when none.

    MLflow's process-wide tracking URI is set too: transformers' callback keeps one already set over the
    environment's."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    if runs:
        log.info("mlflow_run_resumed", mlflow_run_id=runs[0].info.run_id, experiment=experiment)
        return runs[0].info.run_id
    run = client.create_run(experiment_id, run_name=name, tags={RUN_ID_TAG: run_id})
    log.info("mlflow_run_created", mlflow_run_id=run.info.run_id, experiment=experiment)
    return run.info.run_id


@dataclass(frozen=True)
class PushedDir:
    local: Path
    prefix: str
    replace: bool
    """False: a key present in the store before this start is never written (TensorBoard: each start writes
    new event files; an earlier start's stay as they are). True: files change in place (an MLflow store)."""


class PushTrackerFiles(TrainerCallback):
    """Rank 0: uploads new and changed files of the trackers' local directories at each checkpoint, at the end
    of training and after the final evaluation (which the run logs once training has ended). An error is
    logged, never raised: a tracker must not stop training.

    With `mlflow_run_id`, the final evaluation's metrics go to that MLflow run too: transformers' callback has
    ended it at the end of training, and MLflow would start an unnamed run for metrics logged after."""

    def __init__(
        self,
        store: Store,
        dirs: Iterable[PushedDir],
        *,
        mlflow_run_id: str | None = None,
        fence: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.dirs = list(dirs)
        self.mlflow_run_id = mlflow_run_id
        self.fence = fence
        """Raises when this process may no longer write the run (its lease lost): a process that a replacement
        has taken over must not rewrite `logs/mlflow/` under it."""
        self._training_ended = False
        self._pushed: dict[Path, tuple[int, int, str]] = {}
        """`_signature` of each file as last uploaded, or as found at start where the store already has it."""
        self._earlier: set[str] = set()
        for pushed in self.dirs:
            try:
                keys = {info.key for info in store.list(pushed.prefix)}
            except Exception as exc:
                log.warning("tracker_files_list_failed", prefix=pushed.prefix, error=str(exc))
                keys = set()
            for path, key in self._files(pushed):
                if key in keys:  # pulled from the store, or left on a persistent scratch by an earlier start
                    self._pushed[path] = _signature(path)
            if not pushed.replace:
                self._earlier |= keys

    def push(self, when: str) -> int:
        """Upload what changed since the last push; returns how many files were uploaded."""
        uploaded = 0
        if self.fence is not None:
            try:
                self.fence()
            except Exception as exc:  # training stops on the lost lease itself; the files just stay local
                log.warning("tracker_files_push_fenced", when=when, error=str(exc))
                return 0
        for pushed in self.dirs:
            try:
                for path, key in self._files(pushed):
                    signature, last = _signature(path), self._pushed.get(path)
                    if last == signature or (not pushed.replace and key in self._earlier):
                        continue
                    if last is not None and signature[2] and (last[0], last[2]) == (signature[0], signature[2]):
                        self._pushed[path] = signature  # rewritten, same bytes: MLflow's params on each start
                        continue
                    self.store.upload_file(path, key)
                    self._pushed[path] = signature
                    uploaded += 1
            except Exception as exc:
                log.warning("tracker_files_push_failed", prefix=pushed.prefix, when=when, error=str(exc))
        if uploaded:
            log.info("tracker_files_pushed", files=uploaded, when=when)
        return uploaded

    @staticmethod
    def _files(pushed: PushedDir) -> list[tuple[Path, str]]:
        if not pushed.local.is_dir():
            return []
        paths = sorted(p for p in pushed.local.rglob("*") if p.is_file())
        return [(p, join_key(pushed.prefix, p.relative_to(pushed.local).as_posix())) for p in paths]

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.push(f"checkpoint {state.global_step}")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # transformers' tracker callbacks come first: TensorBoard's writer is closed, MLflow's run ended.
        if not state.is_world_process_zero:
            return
        self._training_ended = True
        if self.mlflow_run_id:  # MLflow's start_run (called for metrics logged without a run) resumes this id
            os.environ["MLFLOW_RUN_ID"] = self.mlflow_run_id
        self.push("end")

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Called after the evaluation's metrics were logged; evaluations during training wait for a checkpoint.
        if not (state.is_world_process_zero and self._training_ended):
            return
        if self.mlflow_run_id:
            _end_mlflow_run()
        self.push("final evaluation")


def _end_mlflow_run() -> None:
    try:
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.end_run()
        os.environ.pop("MLFLOW_RUN_ID", None)
    except Exception as exc:
        log.warning("mlflow_end_run_failed", error=str(exc))


def _signature(path: Path) -> tuple[int, int, str]:
    """(size, mtime, digest): the digest is read only for small files (a tracker's text files, not event files)."""
    stat = path.stat()
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.st_size <= SMALL_FILE else ""
    return stat.st_size, stat.st_mtime_ns, digest
