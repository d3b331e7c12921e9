"""Config: precedence, type conversion, and every error path (exit 64 at the CLI)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from job.config.load import load_config, to_yaml
from job.config.reference import reference_rows
from job.config.schema import SECTION_TYPES, JobConfig
from job.errors import ConfigError

BASE = ["data.train=train.jsonl"]


def write_yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_are_the_seed_recipe() -> None:
    config = load_config(None, BASE, environ={})
    assert config.model.source == "mistralai/Mistral-7B-v0.3"
    assert config.model.dtype == "bfloat16"
    train = config.train
    assert (train.per_device_train_batch_size, train.gradient_accumulation_steps) == (2, 8)
    assert train.activation_checkpointing is True
    assert train.learning_rate == 5e-6
    assert train.num_train_epochs == 3
    assert train.logging_steps == 10
    assert train.seed == 42
    assert train.optim == "adamw_kahan"  # the seed used adamw_torch_fused, which loses bf16 updates (issue 6)
    assert config.checkpoint.every_steps == 500
    assert config.data.max_length == 2048


def test_precedence_defaults_file_env_set(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path,
        "data: {train: a.jsonl}\ntrain: {learning_rate: 1e-5, seed: 1, logging_steps: 3}\nrun: {name: from-file}\n",
    )
    env = {"SFT_TRAIN__SEED": "2", "SFT_TRAIN__LOGGING_STEPS": "4"}
    config = load_config(path, ["train.logging_steps=5"], environ=env)
    assert config.train.learning_rate == 1e-5  # file beats default
    assert config.train.seed == 2  # environment beats file
    assert config.train.logging_steps == 5  # --set beats environment
    assert config.run.name == "from-file"
    assert config.train.gradient_accumulation_steps == 8  # untouched default


def test_sft_config_env_names_the_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "data: {train: from-env-file.jsonl}\n")
    assert load_config(None, [], environ={"SFT_CONFIG": path}).data.train == "from-env-file.jsonl"
    # --config wins over SFT_CONFIG
    other = tmp_path / "other.yaml"
    other.write_text("data: {train: other.jsonl}\n")
    assert load_config(str(other), [], environ={"SFT_CONFIG": path}).data.train == "other.jsonl"


@pytest.mark.parametrize(
    ("override", "attribute", "expected"),
    [
        ("train.learning_rate=1e-5", ("train", "learning_rate"), 1e-5),  # YAML 1.1 reads this as a string
        ("train.learning_rate='3e-4'", ("train", "learning_rate"), 3e-4),
        ("train.per_device_train_batch_size=4.0", ("train", "per_device_train_batch_size"), 4),
        ("train.activation_checkpointing=no", ("train", "activation_checkpointing"), False),
        ("train.gradient_checkpointing=false", ("train", "activation_checkpointing"), False),  # alias
        ("model.revision=null", ("model", "revision"), None),
        ("model.revision=1234", ("model", "revision"), "1234"),  # str field keeps digits as text
        ("checkpoint.every_minutes=5", ("checkpoint", "every_minutes"), 5.0),
    ],
)
def test_values_convert_to_field_types(override: str, attribute: tuple[str, str], expected: object) -> None:
    config = load_config(None, [*BASE, override], environ={})
    value = getattr(getattr(config, attribute[0]), attribute[1])
    assert value == expected and type(value) is type(expected)


def test_env_values_convert_too() -> None:
    config = load_config(None, BASE, environ={"SFT_TRAIN__LEARNING_RATE": "2e-5", "SFT_TRAIN__MAX_STEPS": "7"})
    assert config.train.learning_rate == 2e-5
    assert config.train.max_steps == 7


def test_other_sft_config_fields_pass_through_typed() -> None:
    config = load_config(None, [*BASE, "train.eval_steps=5", "train.label_names=[labels]"], environ={})
    assert config.train.extra == {"eval_steps": 5, "label_names": ["labels"]}
    assert to_yaml(config).count("eval_steps: 5") == 1  # written back under train:


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.learning_rat=1e-5", "did you mean 'learning_rate'"),
        ("trian.seed=1", "did you mean 'train'"),
        ("model.sorce=x", "did you mean 'source'"),
        ("train.max_length=4096", "data.max_length"),
        ("train.save_steps=100", "checkpoint.every_steps"),
        ("train.output_dir=/x", "run.output"),
        ("train.seed=abc", "train.seed"),
        ("train.learning_rate=fast", "train.learning_rate"),
        ("train.activation_checkpointing=maybe", "expected true or false"),
        ("model.dtype=float8", "expected one of bfloat16, float16, float32"),
        ("data.eval_fraction=1.5", "eval_fraction"),
        ("run.name=../escape", "not a valid run name"),
        ("train.per_device_train_batch_size=0", "at least 1"),
        ("train.eval_steps=often", "train.eval_steps"),
        ("noequals", "section.key=value"),
    ],
)
def test_bad_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [*BASE, override], environ={})
    assert message in str(info.value)
    assert info.value.exit_code == 64


def test_unknown_env_section_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="SFT_TRAINN__SEED"):
        load_config(None, BASE, environ={"SFT_TRAINN__SEED": "1"})


def test_missing_train_data_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"data\.train is not set"):
        load_config(None, [], environ={})


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"), BASE, environ={})
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write_yaml(tmp_path, "train: [unclosed\n"), BASE, environ={})
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(write_yaml(tmp_path, "- a\n- b\n"), BASE, environ={})
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write_yaml(tmp_path, "train: 3\n"), BASE, environ={})


def test_reference_documents_every_field() -> None:
    rows = {key: (default, env, doc) for key, default, env, doc in reference_rows()}
    assert set(SECTION_TYPES) == {f.name for f in dataclasses.fields(JobConfig)}
    for section, cls in SECTION_TYPES.items():
        for item in dataclasses.fields(cls):
            if item.name == "extra":
                continue
            key = f"{section}.{item.name}"
            assert key in rows, f"{key} has no docstring"
            assert rows[key][1] == f"SFT_{section.upper()}__{item.name.upper()}"
            assert rows[key][2], f"{key} docstring is empty"


def test_reference_table_has_one_line_per_field_and_escapes_pipes(monkeypatch) -> None:
    from job.config import reference

    lines = reference.reference_table().splitlines()
    assert len(lines) == 2 + len(reference_rows()), "a docstring spanning lines must stay in one row"
    monkeypatch.setattr(
        reference,
        "reference_rows",
        lambda: [("data.x", "a|b", "SFT_DATA__X", "First line\n  second line: `json|yaml`.\n\nA paragraph.")],
    )
    row = reference.reference_table().splitlines()[2]
    assert row == r"| `data.x` | `a\|b` | `SFT_DATA__X` | First line second line: `json\|yaml`. A paragraph. |"


def test_resolved_yaml_round_trips(tmp_path: Path) -> None:
    config = load_config(None, [*BASE, "train.learning_rate=1e-5", "train.eval_steps=3"], environ={})
    again = load_config(write_yaml(tmp_path, to_yaml(config)), [], environ={})
    assert again == config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("distributed.nnodes=2", "rdzv_endpoint is empty"),
        ("distributed.rdzv_endpoint=no-port", "not host:port"),
        ("distributed.nproc_per_node=0", "at least 1"),
        ("distributed.collective_timeout_seconds=0", "timeouts must be positive"),
    ],
)
def test_distributed_settings_are_checked(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*BASE, override], environ={})


def test_world_size_from_the_environment_like_any_key() -> None:
    env = {"SFT_DISTRIBUTED__NNODES": "2", "SFT_DISTRIBUTED__RDZV_ENDPOINT": "sft-node-0-0.sft:29400"}
    config = load_config(None, [*BASE, "distributed.nproc_per_node=4"], environ=env)
    assert config.distributed.world_size == 8 and config.distributed.rdzv_endpoint == "sft-node-0-0.sft:29400"
    assert load_config(None, [*BASE, "train.fsdp=true"], environ={}).train.fsdp is True
    assert load_config(None, [*BASE, "train.fsdp=false"], environ={}).train.fsdp is False


@pytest.mark.parametrize("steps", ["0", "-2"])
def test_max_steps_zero_or_below_minus_one_is_refused(steps: str) -> None:
    """Trainer takes one step for max_steps 0 and the job would publish that model."""
    with pytest.raises(ConfigError, match=r"train\.max_steps must be at least 1, or -1") as info:
        load_config(None, [*BASE, f"train.max_steps={steps}"], environ={})
    assert info.value.exit_code == 64
    assert load_config(None, [*BASE, "train.max_steps=-1"], environ={}).train.max_steps == -1


# ---------------------------------------------------------------- hostile input (issue 15)

LAUGHS = "train:\n  fsdp_config:\n    a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"    {name}: &{name} [{', '.join([f'*{prev}'] * 9)}]\n" for prev, name in zip("abcdefgh", "bcdefghi", strict=True)
)  # 9^9 = 387 million "lol"s once expanded, in 700 bytes


def test_billion_laughs_under_fsdp_config_fails_fast_naming_file_and_line(tmp_path: Path) -> None:
    import time

    path = write_yaml(tmp_path, LAUGHS)
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        load_config(path, BASE, environ={})
    assert time.monotonic() - started < 2.0
    assert info.value.exit_code == 64
    assert f"config file {path}" in info.value.message and "line 4" in info.value.message  # the first alias
    assert "aliases" in info.value.message
    # ordinary anchors, aliases and merge keys still load
    text = (
        "train:\n"
        "  fsdp_config: &fsdp {min_num_params: 1000, backward_prefetch: backward_pre}\n"
        "  seed: &seed 7\n"
        "  data_seed: *seed\n"
        "data:\n  train: t.jsonl\n"
    )
    config = load_config(write_yaml(tmp_path, text), [], environ={})
    assert config.train.seed == 7 and config.train.extra["data_seed"] == 7
    assert config.train.extra["fsdp_config"]["min_num_params"] == 1000


@pytest.mark.slow
def test_billion_laughs_exits_64_at_the_cli(tmp_path: Path) -> None:
    """The same bomb through `entrypoint.py config`: a one-line error and exit 64, in seconds, not a hang."""
    from conftest import run_job

    path = write_yaml(tmp_path, LAUGHS)
    result = run_job("config", "--config", path, "--set", BASE[0], timeout=60)
    assert result.returncode == 64, result.stderr[-2000:]
    error = result.events("job_failed")[0]["error"]
    assert path in error and "line 4" in error


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("train:\n  fsdp_config: &a {x: *a}\n", "refers to the mapping or list that contains it"),
        ("train:\n  fsdp_config: " + "[" * 40 + "]" * 40 + "\n", "nested deeper than 32"),
        ("train:\n  fsdp_config: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than 32"),
    ],
)
def test_recursive_and_deep_yaml_is_refused(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_config(write_yaml(tmp_path, text), BASE, environ={})


def test_oversized_config_file_is_refused_before_reading(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "# padding\n" * 120_000)
    with pytest.raises(ConfigError, match=r"bytes, more than the 1048576 allowed"):
        load_config(path, BASE, environ={})


def test_alias_bombs_in_variables_and_set_are_refused_too() -> None:
    bomb = "[" + ", ".join(f"&{n} [{', '.join([f'*{p}'] * 10)}]" for p, n in zip("abcde", "bcdef", strict=True)) + "]"
    bomb = "[&a [1,1,1,1,1,1,1,1,1,1], " + bomb[1:]
    with pytest.raises(ConfigError, match="SFT_TRAIN__FSDP_CONFIG: YAML aliases"):
        load_config(None, BASE, environ={"SFT_TRAIN__FSDP_CONFIG": bomb})
    with pytest.raises(ConfigError, match=r"--set train.fsdp_config: YAML aliases"):
        load_config(None, [*BASE, f"train.fsdp_config={bomb}"], environ={})


def test_a_megabyte_value_is_quoted_short_in_the_error() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [*BASE, "train.seed=" + "x" * 1_048_576], environ={})
    assert "train.seed" in info.value.message and "[cut " in info.value.message
    assert len(str(info.value)) < 1000


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("SFT_TRAIN__LEARNIG_RATE", "SFT_TRAIN__LEARNIG_RATE: unknown key 'train.learnig_rate' "
                                    "(did you mean SFT_TRAIN__LEARNING_RATE?)"),
        ("SFT_STORAGE__ENDPOINT", "(did you mean SFT_STORAGE__ENDPOINT_URL?)"),
        ("SFT_TRAIN_LEARNING_RATE", "SFT_TRAIN_LEARNING_RATE is not a config variable (SFT_<SECTION>__<KEY>) "
                                    "(did you mean SFT_TRAIN__LEARNING_RATE?)"),
        ("SFT_FOO", "environment variable SFT_FOO is not a config variable"),
        ("SFT_TRAINN__SEED", "unknown section 'trainn' (did you mean SFT_TRAIN__SEED?)"),
    ],
)  # fmt: skip
def test_unknown_sft_variables_name_themselves_and_the_closest_valid_one(name: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, BASE, environ={name: "1"})
    assert words in info.value.message
    # SFT_* variables that are not config values are left alone
    environ = {
        "SFT_CONFIG": "",
        "SFT_LOG_LEVEL": "DEBUG",
        "SFT_LOG_FORMAT": "json",
        "SFT_FAULTS": "",
        "SFT_HEARTBEAT_SECONDS": "5",
        "SFT_RANK_OUTCOMES": "/tmp/x",
        "SFT_POLL_SECONDS": "1",
        "SFT_IMAGE": "img",
        # Kubernetes service links for Services named `sft` and `sft-api` in the namespace
        "SFT_SERVICE_HOST": "10.0.0.1",
        "SFT_SERVICE_PORT": "80",
        "SFT_PORT": "tcp://10.0.0.1:80",
        "SFT_PORT_80_TCP_ADDR": "10.0.0.1",
        "SFT_API_SERVICE_PORT_HTTP": "8080",
    }
    assert load_config(None, BASE, environ=environ).train.seed == 42  # and nothing else is flagged


def test_train_as_a_list_of_sources(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path,
        "data:\n  format: alpaca\n  train:\n    - a.jsonl\n"
        "    - {path: hf://datasets/o/n@v1/data/*.parquet, format: sharegpt, weight: 0.5, max_examples: 100}\n",
    )
    sources = load_config(path, [], environ={}).data.sources()
    assert [(s.path, s.format, s.weight, s.max_examples) for s in sources] == [
        ("a.jsonl", "alpaca", 1.0, None),
        ("hf://datasets/o/n@v1/data/*.parquet", "sharegpt", 0.5, 100),
    ]
    single = load_config(None, ["data.train=one.jsonl", "data.format=text"], environ={}).data
    assert single.train == "one.jsonl"  # a plain string stays one source, not a list of one
    assert [(s.path, s.format) for s in single.sources()] == [("one.jsonl", "text")]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("{path: a.jsonl, weight: 0}", "data.train[0].weight must be a positive number"),
        ("{path: a.jsonl, weight: .nan}", "data.train[0].weight must be a positive number"),
        ("{path: a.jsonl, max_examples: 0}", "data.train[0].max_examples must be a positive integer"),
        ("{path: a.jsonl, format: csv}", "data.train[0].format 'csv' is not one of"),
        ("{path: a.jsonl, wieght: 2}", "data.train[0]: unknown key(s) ['wieght']"),
        ("{weight: 2}", "data.train[0].path must be a non-empty string"),
        ("7", "data.train[0] must be a path or a mapping"),
    ],
)
def test_bad_source_entries_name_their_index(tmp_path: Path, entry: str, message: str) -> None:
    path = write_yaml(tmp_path, f"data:\n  train:\n    - {entry}\n    - b.jsonl\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, [], environ={})
    assert message in str(caught.value)


def test_a_source_named_twice_is_refused(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "data:\n  train: [a.jsonl, {path: a.jsonl, weight: 2}]\n")
    with pytest.raises(ConfigError, match="more than once"):
        load_config(path, [], environ={})


def test_text_mode_and_special_strings_are_checked() -> None:
    config = load_config(None, [*BASE, "data.text_mode=documents", "data.special_strings=text"], environ={})
    assert (config.data.text_mode, config.data.special_strings) == ("documents", "text")
    for key, value in (("text_mode", "lines"), ("special_strings", "drop")):
        with pytest.raises(ConfigError, match=f"data.{key}"):
            load_config(None, [*BASE, f"data.{key}={value}"], environ={})


def test_report_to_names_only_trackers_that_are_installed(tmp_path, monkeypatch) -> None:
    """A tracker the Trainer cannot build is exit 64 at load, not exit 1 (retried) when training starts."""
    for value in ("none", "all"):
        load_config(None, [*BASE, f"train.report_to={value}"], environ={})
    with pytest.raises(ConfigError, match=r"\['tensorbord'\]: not a tracker") as caught:
        load_config(None, [*BASE, "train.report_to=tensorbord"], environ={})
    assert caught.value.exit_code == 64 and "tensorboard" in caught.value.hint
    with pytest.raises(ConfigError, match="names comet_ml, which is not installed") as caught:
        load_config(None, [*BASE, "train.report_to=[comet_ml]"], environ={})
    assert "pip install comet_ml" in caught.value.hint
    monkeypatch.setenv("DISABLE_MLFLOW_INTEGRATION", "TRUE")  # transformers' own switch: mlflow counts as absent
    with pytest.raises(ConfigError, match="names mlflow, which is not installed"):
        load_config(None, [*BASE, "train.report_to=[tensorboard,mlflow]"], environ={})
    monkeypatch.delenv("DISABLE_MLFLOW_INTEGRATION")
    config = load_config(None, [*BASE, "train.report_to=[tensorboard,mlflow,wandb]"], environ={})  # the dev extras
    assert config.train.extra["report_to"] == ["tensorboard", "mlflow", "wandb"]
