"""job/train/trackers: TensorBoard and MLflow's file store for real (a short train on the tiny model), W&B
offline; their files under scratch, pushed to the store's logs/, and the same tracker run after a restart."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

from conftest import tiny_job_trainer
from job.cli import main
from job.config.load import load_config
from job.errors import LeaseLost
from job.storage.local import LocalStore
from job.train.trackers import (
    ENV_VARS,
    MLFLOW_PREFIX,
    RUN_ID_TAG,
    TENSORBOARD_PREFIX,
    PushedDir,
    PushTrackerFiles,
    complete_file_store,
    configure_trackers,
    tracker_run_id,
)

BASE = ["data.train=train.jsonl", "model.dtype=float32"]


@pytest.fixture
def fresh_env():
    """Each start is a new process: none of the trackers' variables set; everything restored afterwards
    (configure_trackers sets os.environ, as it must for transformers to read it)."""
    saved = dict(os.environ)
    for variable in (*ENV_VARS, "WANDB_MODE"):
        os.environ.pop(variable, None)

    def restart() -> None:
        for variable in ENV_VARS:
            os.environ.pop(variable, None)
        if "mlflow" in sys.modules:
            sys.modules["mlflow"].set_tracking_uri(None)  # process-wide in MLflow; a new process starts without

    yield restart
    restart()
    os.environ.clear()
    os.environ.update(saved)


def job_config(name: str, report_to: str, *overrides: str):
    return load_config(None, [*BASE, f"run.name={name}", f"train.report_to={report_to}", *overrides], environ={})


def digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def train_once(config, model_dir: Path, work: Path, store: LocalStore) -> None:
    """One start as job/run.py makes it: configure the trackers, a real JobTrainer for `train.max_steps` steps,
    then the final evaluation (logged after training has ended)."""
    callbacks = configure_trackers(config, work, store)
    trainer = tiny_job_trainer(config, model_dir, work / "trainer", callbacks, evaluation=True)
    trainer.train()
    trainer.evaluate()


def test_tensorboard_and_mlflow_files_reach_the_store_and_a_restart_continues_the_same_runs(
    tmp_path: Path, tiny_model_dir: Path, fresh_env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two starts of one run, each on a fresh scratch (as a Kubernetes restart gets), with the working
    directory elsewhere: event files under scratch and in the store's logs/tensorboard/ (loss readable),
    the second start's added beside the first's, which stay byte for byte; one MLflow run across both."""
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    cwd.chmod(0o555)  # the image's /app: read-only (root ignores the mode, so nothing may appear in it either)
    monkeypatch.chdir(cwd)
    store = LocalStore(tmp_path / "out" / "tracked")
    overrides = ("train.max_steps=4", "train.logging_steps=1", "checkpoint.every_steps=2", "train.optim=adamw_torch")
    overrides += ("train.gradient_accumulation_steps=1",)
    config = job_config("tracked", "[tensorboard,mlflow]", *overrides)

    first = tmp_path / "scratch-1" / "runs" / "tracked"
    train_once(config, tiny_model_dir, first, store)
    pushed = store.root / TENSORBOARD_PREFIX
    (start_dir,) = (first / "trackers" / "tensorboard").iterdir()  # one TensorBoard run per start: <start>/
    assert digests(pushed) == {f"{start_dir.name}/{name}": digest for name, digest in digests(start_dir).items()}
    assert len(digests(start_dir)) == 2  # training's event file, and the one the final evaluation's line opened
    events = EventAccumulator(str(pushed / start_dir.name))
    events.Reload()
    assert [s.step for s in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert all(s.value > 0 for s in events.Scalars("train/loss")) and len(events.Scalars("eval/loss")) == 1
    first_pushed = digests(pushed)

    complete_file_store(store.root / MLFLOW_PREFIX)  # as a restore does: the store keeps no empty directories
    client = MlflowClient((store.root / MLFLOW_PREFIX).as_uri())  # the store's copy is a whole file store
    experiment = client.get_experiment_by_name("sft-job")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tracked" and run.data.tags[RUN_ID_TAG] == tracker_run_id(store.uri, "tracked")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert len(client.get_metric_history(run.info.run_id, "eval_loss")) == 1  # not in a run of its own

    fresh_env()
    second = tmp_path / "scratch-2" / "runs" / "tracked"
    train_once(config, tiny_model_dir, second, store)
    now = digests(pushed)
    assert {k: now[k] for k in first_pushed} == first_pushed  # the first start's event file untouched
    added = {key.split("/")[0] for key in set(now) - set(first_pushed)}  # another <start>/ directory
    assert added == {p.name for p in (second / "trackers" / "tensorboard").iterdir()} != {start_dir.name}
    (again,) = client.search_runs([experiment.experiment_id])  # restored from the store, then continued
    assert again.info.run_id == run.info.run_id
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4] * 2
    assert len(client.get_metric_history(run.info.run_id, "eval_loss")) == 2
    assert list(cwd.iterdir()) == []


def test_mlflow_same_run_name_one_run_another_name_another_run(tmp_path: Path, fresh_env) -> None:
    """transformers' own MLflowCallback, three starts on one scratch: two of run `a` log into one MLflow run,
    `b` gets its own. A tracking URI the user set is kept, and nothing is pushed from it."""
    from mlflow import MlflowClient
    from transformers import TrainerControl, TrainerState, TrainingArguments
    from transformers.integrations import MLflowCallback

    def start(name: str, step: int, work: Path) -> list:
        callbacks = configure_trackers(job_config(name, "mlflow"), work, LocalStore(tmp_path / "out" / name))
        args = TrainingArguments(output_dir=str(work / "trainer"), run_name=name, report_to=[], use_cpu=True)
        state, control = TrainerState(is_world_process_zero=True), TrainerControl()
        state.global_step = step
        tracker = MLflowCallback()
        tracker.on_train_begin(args, state, control)
        tracker.on_log(args, state, control, logs={"loss": float(step)})
        tracker.on_train_end(args, state, control)
        for callback in callbacks:
            callback.on_train_end(args, state, control)
        fresh_env()
        return callbacks

    def runs(store: Path) -> dict:
        client = MlflowClient(store.as_uri())
        experiment = client.get_experiment_by_name("sft-job")
        return {r.info.run_name: (client, r.info.run_id) for r in client.search_runs([experiment.experiment_id])}

    work = tmp_path / "scratch" / "runs"
    start("a", 1, work / "a")
    start("a", 2, work / "a")
    start("b", 1, work / "b")
    found = runs(work / "a" / "trackers" / "mlruns")
    assert sorted(found) == ["a"]  # each run's file store is its own (b's is under b's work directory)
    client, run_id = found["a"]
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [1.0, 2.0]
    other = runs(work / "b" / "trackers" / "mlruns")
    assert sorted(other) == ["b"] and other["b"][1] != run_id
    assert (tmp_path / "out" / "a" / MLFLOW_PREFIX).is_dir()

    server = tmp_path / "server"  # a user's tracking URI: a store the job does not own, so nothing to push
    os.environ["MLFLOW_TRACKING_URI"] = server.as_uri()
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    (callback,) = start("c", 1, work / "c")
    assert callback.dirs == [] and callback.mlflow_run_id
    assert sorted(runs(server)) == ["c"] and not (work / "c" / "trackers" / "mlruns").exists()


@pytest.mark.slow  # wandb.init starts W&B's service process
def test_wandb_offline_keeps_its_id_across_starts_and_writes_under_scratch(
    tmp_path: Path, fresh_env, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb
    from transformers import TrainerState, TrainingArguments
    from transformers.integrations import WandbCallback

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    cwd.chmod(0o555)
    monkeypatch.chdir(cwd)
    store = LocalStore(tmp_path / "out" / "w.run")
    work = tmp_path / "scratch" / "runs" / "w.run"
    ids = []
    try:
        for _ in range(2):
            os.environ["WANDB_MODE"] = "offline"
            assert configure_trackers(job_config("w.run", "wandb"), work, store) == []  # W&B syncs its own files
            args = TrainingArguments(output_dir=str(work / "trainer"), run_name="w.run", report_to=[], use_cpu=True)
            WandbCallback().setup(args, TrainerState(is_world_process_zero=True), model=None)
            run = wandb.run
            ids.append(run.id)
            assert Path(run.dir).is_relative_to(work / "trackers" / "wandb")
            assert run.project == "sft-job" and run.name == "w.run"
            wandb.finish()
            fresh_env()
    finally:
        wandb.teardown()
    assert ids[0] == ids[1] == tracker_run_id(store.uri, "w.run") and ids[0].startswith("w-run-")
    runs = sorted((work / "trackers" / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(f"-{ids[0]}" in r.name for r in runs)  # a "-1" follows within one second
    configure_trackers(job_config("w.run2", "wandb"), work, store)
    assert os.environ["WANDB_RUN_ID"] != ids[0]
    assert list(cwd.iterdir()) == []


def test_push_never_overwrites_an_earlier_starts_file_and_never_raises(tmp_path: Path) -> None:
    """TensorBoard's rule on a persistent scratch: a key already in the store is left as it is (the
    earlier start's), new and changed files of this start go up; a failing store is logged, not raised."""
    local, store = tmp_path / "tb", LocalStore(tmp_path / "out")
    local.mkdir()
    (local / "events.1").write_bytes(b"start 1, longer on scratch than in the store")
    store.write_bytes(f"{TENSORBOARD_PREFIX}/events.1", b"start 1")
    push = PushTrackerFiles(store, [PushedDir(local, TENSORBOARD_PREFIX, replace=False)])
    (local / "events.2").write_bytes(b"start 2")
    assert push.push("checkpoint") == 1
    (local / "events.2").write_bytes(b"start 2, step 4")
    assert push.push("end") == 1 and push.push("end") == 0
    os.utime(local / "events.2", ns=(1, 1))  # rewritten with the same bytes (MLflow's params on each start)
    assert push.push("end") == 0
    assert store.read_bytes(f"{TENSORBOARD_PREFIX}/events.1") == b"start 1"
    assert store.read_bytes(f"{TENSORBOARD_PREFIX}/events.2") == b"start 2, step 4"

    class Broken(LocalStore):
        def upload_file(self, source: Path, key: str) -> None:
            raise OSError("store unreachable")

    (local / "events.3").write_bytes(b"x")
    assert PushTrackerFiles(Broken(tmp_path / "out"), push.dirs).push("end") == 0

    def lease_lost() -> None:
        raise LeaseLost("another process holds the run's lease now")

    fenced = PushTrackerFiles(store, push.dirs, fence=lease_lost)
    assert fenced.push("checkpoint") == 0 and not store.exists(f"{TENSORBOARD_PREFIX}/events.3")
    assert PushTrackerFiles(store, push.dirs, fence=lambda: None).push("checkpoint") == 1  # the lease held


def test_validate_refuses_a_tracker_that_is_not_installed_with_64(tmp_path: Path, capsys) -> None:
    where = ["--set", f"run.scratch={tmp_path / 's'}", "--set", f"run.output={tmp_path / 'o'}"]
    with pytest.raises(SystemExit) as info:
        main(["validate", "--set", "data.train=train.jsonl", "--set", "train.report_to=[tensorboard,comet_ml]", *where])
    assert info.value.code == 64
    assert "comet_ml" in capsys.readouterr().err


def test_wandb_online_without_credentials_is_refused_before_anything_is_pulled(tmp_path: Path, capsys) -> None:
    """W&B's login would fail when the Trainer starts it (exit 1, retried): refused at validate (64) instead, unless
    a key, a ~/.netrc entry for the W&B host, or an offline mode is there."""
    from job.config.trackers import check_tracker_credentials
    from job.errors import ConfigError

    home = tmp_path / "home"
    home.mkdir()
    bare = {"HOME": str(home)}
    with pytest.raises(ConfigError, match="WANDB_API_KEY"):
        check_tracker_credentials(["tensorboard", "wandb"], bare)
    check_tracker_credentials(["tensorboard"], bare)  # nothing to log in to
    check_tracker_credentials(["wandb"], {**bare, "WANDB_API_KEY": "k" * 40})
    check_tracker_credentials(["wandb"], {**bare, "WANDB_MODE": "offline"})
    (home / ".netrc").write_text("machine wandb.example.com\n  login user\n  password " + "p" * 40 + "\n")
    with pytest.raises(ConfigError, match=r"api\.wandb\.ai"):  # an entry for another host is not a W&B login
        check_tracker_credentials(["wandb"], bare)
    check_tracker_credentials(["wandb"], {**bare, "WANDB_BASE_URL": "https://wandb.example.com"})

    where = ["--set", f"run.scratch={tmp_path / 's'}", "--set", f"run.output={tmp_path / 'o'}"]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HOME", str(tmp_path / "nobody"))
        for name in ("WANDB_API_KEY", "WANDB_MODE", "NETRC", "WANDB_BASE_URL"):
            env.delenv(name, raising=False)
        with pytest.raises(SystemExit) as info:
            main(["validate", "--set", "data.train=train.jsonl", "--set", "train.report_to=[wandb]", *where])
    assert info.value.code == 64
    assert "no W&B credentials" in capsys.readouterr().err
