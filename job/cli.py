"""Command line: parse, load the config, call `job.run`, and map errors to exit codes (here only)."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn

import click

from job.config.load import load_config, to_yaml
from job.config.reference import reference_page
from job.config.schema import JobConfig
from job.errors import UNEXPECTED_EXIT_CODE, ConfigError, JobError, Preempted
from job.logs import bind_run, get_logger, redact_urls, setup_logging, shorten

log = get_logger("job.cli")

_ARGV: list[str] = []
"""This process's arguments: the launcher starts every rank with the same ones."""

ENVIRONMENT_HELP = """\b
Environment:
  SFT_CONFIG               config file (path or s3:// URI) when --config is not given
  SFT_<SECTION>__<KEY>     any config value, e.g. SFT_TRAIN__LEARNING_RATE=1e-5
                           (precedence: defaults < file < environment < --set)
  AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, ...
                           S3 settings where the storage section leaves them empty
  HF_TOKEN                 Hub token for gated base models (never logged)
  SFT_LOG_FORMAT           json | console (default: json unless stderr is a terminal)
  SFT_LOG_LEVEL            DEBUG | INFO | WARNING (default INFO)

Every config key, its default and its variable: `python entrypoint.py config --reference`.
"""


def config_options(command: Callable) -> Callable:
    command = click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="SECTION.KEY=VALUE",
        help="Override one config value (repeatable); wins over the file and the environment.",
    )(command)
    return click.option(
        "--config",
        "config_path",
        metavar="FILE",
        help="YAML config file, local path or s3:// URI (default: $SFT_CONFIG).",
    )(command)


@click.group(epilog=ENVIRONMENT_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sft-job")
def cli() -> None:
    """sft-job: full-parameter supervised fine-tuning as a preemptible batch job.

    Exit codes: 0 done, 64 bad config, 65 bad data, 66 input not found, 69 storage
    unreachable, 70 training failed (not retryable), 71 GPU driver too old for the image's
    CUDA, 74 scratch disk full, 75 preempted or lease lost (retry), 77 access denied, 1 unexpected.
    """


@cli.command(epilog=ENVIRONMENT_HELP)
@config_options
@click.option("--force", is_flag=True, help="Train even when the memory planner says it will not fit the GPU.")
@click.option(
    "--allow-config-change",
    is_flag=True,
    help="Resume even though model, data or hyper-parameters differ from the run's first start (recorded).",
)
@click.option("--nproc-per-node", type=int, help="Ranks (GPUs) on this node [distributed.nproc_per_node].")
@click.option("--nnodes", type=int, help="Nodes in the run [distributed.nnodes].")
@click.option("--rdzv-endpoint", metavar="HOST:PORT", help="Where the nodes meet [distributed.rdzv_endpoint].")
def train(
    config_path: str | None,
    overrides: tuple[str, ...],
    allow_config_change: bool,
    force: bool,
    nproc_per_node: int | None,
    nnodes: int | None,
    rdzv_endpoint: str | None,
) -> int:
    """Train and publish the final model to <run.output>/<run.name>/final/.

    Resumes from the newest committed checkpoint when there is one. A run whose final
    output is already committed exits 0 at once. SIGTERM exits 75 once the newest
    checkpoint is durable (see docs/checkpointing.md). With more than one rank
    (--nproc-per-node, --nnodes) this process launches the ranks and exits with their
    outcome: 75 when they stopped for preemption, a fatal code when a rank hit one, else 1.
    """
    flags = {"nproc_per_node": nproc_per_node, "nnodes": nnodes, "rdzv_endpoint": rdzv_endpoint}
    overrides += tuple(f"distributed.{key}={value}" for key, value in flags.items() if value is not None)

    def action(config: JobConfig) -> int:
        from job.dist.group import is_worker

        if config.distributed.world_size > 1 and not is_worker():
            from job.dist.launch import launch

            return launch(config, _ARGV)
        from job.run import train as run_train

        run_train(config, allow_config_change=allow_config_change, force=force)
        return 0

    return _execute(config_path, overrides, action)


@cli.command(epilog=ENVIRONMENT_HELP)
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option(
    "--show",
    type=click.IntRange(min=0),
    default=0,
    metavar="N",
    help="Also show the first N training examples as the model sees them, trained spans marked "
    "(with --json: under `shown`, each with its `text` and `trained` spans).",
)
def validate(config_path: str | None, overrides: tuple[str, ...], as_json: bool, show: int) -> int:
    """Check the config and every data record (file:line on errors); loads no weights, trains nothing."""

    def action(config: JobConfig) -> int:
        from job.config.trackers import check_tracker_credentials
        from job.data.prepare import validate as run_validate
        from job.publish.hub_push import check_hub_push

        # What train refuses (64) before its first step is refused here too.
        check_hub_push(config)
        check_tracker_credentials(config.train.extra.get("report_to"))

        report = run_validate(config, show=show)
        if as_json:
            click.echo(json.dumps({"ok": True, **report}, indent=2, sort_keys=True))
        else:
            click.echo("\n".join(f"{key}: {value}" for key, value in report.items() if key not in ("shown", "sources")))
            _echo_sources(report.get("sources") or [])
            _echo_shown(report.get("shown") or [])
        return 0

    return _execute(config_path, overrides, action, json_errors=as_json)


def _echo_sources(sources: list[dict[str, Any]]) -> None:
    """One line per `data.train` source: what it gives the mixture."""
    click.echo("sources:")
    for row in sources:
        revision = f" @ {row['revision'][:12]}" if row.get("revision") else ""
        click.echo(
            f"  {row['name']}{revision}: {row['format']}, {row['records']} records -> {row['examples']} examples "
            f"(weight {row['weight']:g}), {row['tokens']} tokens = {100 * row['token_share']:.1f}%"
        )


def _echo_shown(examples: list[dict[str, Any]]) -> None:
    """`validate --show` on a terminal: each example with its trained spans marked (colored on a TTY)."""
    from job.data.show import render_terminal, use_color

    color = use_color()
    for example in examples:
        click.echo("")
        click.echo(render_terminal(example, color), color=color)


@cli.command(epilog=ENVIRONMENT_HELP)
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON on stdout.")
@click.option(
    "--gpu-memory-gib", type=float, help="GPU memory to plan for (default: detected, else 95.59 = 96 GB card)."
)
@click.option("--with-data", is_flag=True, help="Also tokenize the data for a time estimate (as validate does).")
@click.option(
    "--host-memory-gib",
    type=float,
    help="Host RAM to plan checkpoint staging for (default: the pod's limit, detected).",
)
@click.option("--gpu-name", help='GPU to plan for, for its peak FLOP/s (e.g. "NVIDIA H200"; default: detected).')
def plan(
    config_path: str | None,
    overrides: tuple[str, ...],
    as_json: bool,
    gpu_memory_gib: float | None,
    with_data: bool,
    host_memory_gib: float | None,
    gpu_name: str | None,
) -> int:
    """Memory, layers kept, batch split, time and checkpoint staging for the GPU, from config.json (no weights)."""

    def action(config: JobConfig) -> int:
        from job.plan.memory import plan_job
        from job.plan.render import render_plan

        tokens = None
        if with_data:
            from job.data.prepare import prepare

            tokens = prepare(config).train.tokens
        memory = int(gpu_memory_gib * 2**30) if gpu_memory_gib else None
        host = int(host_memory_gib * 2**30) if host_memory_gib else None
        result = plan_job(
            config, gpu_memory_bytes=memory, dataset_tokens=tokens, host_memory_bytes=host, gpu_name=gpu_name
        )
        click.echo(json.dumps(result, indent=2, sort_keys=True) if as_json else render_plan(result))
        return 0

    return _execute(config_path, overrides, action, json_errors=as_json)


@cli.command(epilog=ENVIRONMENT_HELP)
@click.argument("run_uri", required=False, metavar="[RUN_URI]")
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON on stdout.")
def status(run_uri: str | None, config_path: str | None, overrides: tuple[str, ...], as_json: bool) -> int:
    """Where a run stands (phase, checkpoints, lease, final output, last metrics), read from the store only.

    RUN_URI is <run.output>/<run.name> (e.g. s3://bucket/runs/my-run); without it the run is
    taken from the config. Exits 0 when the run could be read, 66 when there is no such run.
    """

    def show(store: Any) -> int:
        from job.publish.status import render_status, run_status

        report = run_status(store)
        click.echo(json.dumps(report, indent=2, sort_keys=True) if as_json else render_status(report))
        return 0

    if run_uri:
        return _guarded(lambda: show(_open(run_uri)), json_errors=as_json)

    def action(config: JobConfig) -> int:
        from job.run import run_store

        return show(run_store(config))

    return _execute(config_path, overrides, action, json_errors=as_json)


def _open(uri: str) -> Any:
    from job.storage import open_store

    return open_store(uri.rstrip("/"))


@cli.command(name="config", epilog=ENVIRONMENT_HELP)
@config_options
@click.option("--reference", is_flag=True, help="Print every key with its default and variable (Markdown).")
def show_config(config_path: str | None, overrides: tuple[str, ...], reference: bool) -> int:
    """Print the resolved config (credentials redacted), or the reference of all keys."""
    if reference:
        click.echo(config_reference_markdown())
        return 0

    def action(config: JobConfig) -> int:
        click.echo(to_yaml(config), nl=False)
        return 0

    return _execute(config_path, overrides, action)


def config_reference_markdown() -> str:
    """docs/config.md (regenerate: `python entrypoint.py config --reference > docs/config.md`)."""
    return reference_page()


def _execute(
    config_path: str | None,
    overrides: tuple[str, ...],
    action: Callable[[JobConfig], int],
    *,
    json_errors: bool = False,
) -> int:
    """Load the config and run `action`, turning every failure into its exit code."""

    def load_and_act() -> int:
        config = load_config(config_path, overrides, read_text=_read_remote_config)
        bind_run(run=config.run.name)
        return action(config)

    return _guarded(load_and_act, json_errors=json_errors)


def _guarded(body: Callable[[], int], *, json_errors: bool = False) -> int:
    """Run `body`, mapping JobError subclasses to their exit codes: the only place that does.

    `json_errors` (a `--json` command): a failure also prints one JSON document on stdout, so a script
    reading stdout always gets one."""
    try:
        return body()
    except JobError as exc:
        log.error(
            "job_failed",
            exit_code=exc.exit_code,
            error_type=type(exc).__name__,
            error=exc.message,
            hint=exc.hint,
            retryable=exc.retryable,
        )
        if json_errors:
            _echo_json_error(exc.exit_code, type(exc).__name__, exc.message, exc.hint)
        return exc.exit_code
    except KeyboardInterrupt:
        log.error("interrupted", exit_code=Preempted.exit_code)
        if json_errors:
            _echo_json_error(Preempted.exit_code, "Interrupted", "interrupted", None)
        return Preempted.exit_code
    except Exception as exc:
        from job.durability.scratch import scratch_full

        full = scratch_full(exc, None)  # e.g. validate's tokenize cache on a full disk
        if full is not None:
            return _guarded(lambda: _raise(full), json_errors=json_errors)
        log.exception("unexpected_error", exit_code=UNEXPECTED_EXIT_CODE)
        if json_errors:
            _echo_json_error(UNEXPECTED_EXIT_CODE, type(exc).__name__, str(exc), "the traceback is in the log")
        return UNEXPECTED_EXIT_CODE


def _raise(error: JobError) -> NoReturn:
    raise error


_LOCATED = re.compile(r"^\s*(?P<file>\S.*?):(?P<line>\d+): (?P<message>.*)$")


def _echo_json_error(exit_code: int, error_type: str, message: str, hint: str | None) -> None:
    """`{"ok": false, ...}` with one entry per `file:line: problem` line of the message (else the message)."""
    message, hint = shorten(redact_urls(message), 4000), hint and shorten(redact_urls(hint), 1000)
    errors = [match.groupdict() for line in message.splitlines() if (match := _LOCATED.match(line))]
    for error in errors:
        error["line"] = int(error["line"])
    document = {
        "ok": False,
        "exit_code": exit_code,
        "error_type": error_type,
        "message": message,
        "hint": hint,
        "errors": errors or [{"file": None, "line": None, "message": message}],
    }
    click.echo(json.dumps(document, indent=2, sort_keys=True))


def _read_remote_config(uri: str) -> str:
    """An s3:// config is fetched with the environment's storage settings alone."""
    from job.storage import read_text

    return read_text(uri)


def _preempted_before_start(signum: int, frame: Any) -> NoReturn:
    raise SystemExit(Preempted.exit_code)


def main(argv: list[str] | None = None) -> None:
    # Until the run installs its own handler (after seconds of imports), SIGTERM still means "preempted":
    # exit 75, not -15, which Kubernetes would count as a crash.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _preempted_before_start)
    _ARGV[:] = sys.argv[1:] if argv is None else argv
    try:
        code = _run(argv)
    except SystemExit as exc:  # the handler above, during start-up
        code = exc.code if isinstance(exc.code, int) else UNEXPECTED_EXIT_CODE
    from job.dist.group import record_outcome

    record_outcome(code)  # as one of several ranks: when and how this rank ended, for the launcher
    sys.exit(code)


def _run(argv: list[str] | None) -> int:
    log_format = os.environ.get("SFT_LOG_FORMAT", "").lower()
    setup_logging(json_mode={"json": True, "console": False}.get(log_format))
    try:
        code: Any = cli.main(args=argv, prog_name="entrypoint.py", standalone_mode=False)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:  # usage errors too: configuration errors (64), not click's 2
        shown = io.StringIO()
        exc.show(file=shown)  # the usage line and the message; a value in it may be huge or hold a URL
        sys.stderr.write("\n".join(shorten(line, 1000) for line in shown.getvalue().splitlines()) + "\n")
        code = ConfigError.exit_code
    except click.Abort:
        code = Preempted.exit_code
    return code if isinstance(code, int) else 0
