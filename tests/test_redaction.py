"""No credential is ever published: URL user info is masked in logs (ours, botocore's, tracebacks), in
`config.resolved.yaml`, the model card and `status`; a long value is cut before it reaches a log line.

The end-to-end test trains against moto with a password in `storage.endpoint_url` and DEBUG logging on,
then looks for that password everywhere the run wrote: stdout, stderr, scratch, every object in the store.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import structlog

from conftest import cpu_run_args, run_job
from job.config.load import load_config, redacted, to_yaml
from job.config.schema import StorageConfig
from job.errors import ConfigError
from job.logs import CUT_MARK, TRACEBACK_LIMIT, VALUE_LIMIT, get_logger, redact_urls, sanitize, setup_logging, shorten

SENTINEL = "SENTINEL-PASSWORD-1234"
BASE = ["data.train=x.jsonl"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://a:b@c", "http://***@c"),
        ("https://user@host/path?x=1", "https://***@host/path?x=1"),
        ("s3://key:secret@bucket/k", "s3://***@bucket/k"),
        ("postgres://app:pw@db:5432/x", "postgres://***@db:5432/x"),
        (
            "could not reach http://u:p@127.0.0.1:9000/b/k: refused",
            "could not reach http://***@127.0.0.1:9000/b/k: refused",
        ),
        ("http://u:p%40ss%2Fw@host", "http://***@host"),  # percent-encoded '@' and '/'
        ("http://u:p@ss@host:9/x", "http://***@host:9/x"),  # a bare '@' in the password
        ("http://AKIA:ab/cd+ef@minio:9000/", "http://***@minio:9000/"),  # a bare '/' (AWS secrets have them)
        ("http://u:p@[::1]:9000/", "http://***@[::1]:9000/"),  # IPv6 host
        ("http://:tok@h and ftp://x@y", "http://***@h and ftp://***@y"),  # empty user, two URLs
        ("{'endpoint_url': 'http://u:p@h'}", "{'endpoint_url': 'http://***@h'}"),
        ("http://***@host", "http://***@host"),  # idempotent
        # no user info: untouched
        ("https://host:9000/path", "https://host:9000/path"),
        ("https://host/p?mail=a@b.c", "https://host/p?mail=a@b.c"),
        ("s3://bucket/key@v2", "s3://bucket/key@v2"),
        ("mail me: a@b.c", "mail me: a@b.c"),
    ],
)
def test_redact_urls_hostile_shapes(text: str, expected: str) -> None:
    assert redact_urls(text) == expected


def test_redaction_is_linear_on_hostile_text() -> None:
    import time

    started = time.monotonic()
    for text in (
        "://" * 400_000,
        "://@" * 300_000,
        "http://a:" + "b" * 1_000_000,
        ("http://u:" + "x" * 3000 + " ") * 300,
    ):
        redact_urls(text)
    assert time.monotonic() - started < 2.0


def test_shorten_cuts_with_a_marker_and_never_leaves_half_a_password() -> None:
    big = "x" * 1_048_576
    assert shorten(big, 500) == "x" * 500 + CUT_MARK.format(1_048_576 - 500)
    assert shorten("short") == "short"
    # the cut falls inside the user info, before the '@' that identifies it
    cut = shorten("y" * 180 + f"http://user:{SENTINEL}@host/", 200)
    assert "SENTINEL" not in cut and "http://***" in cut and "[cut" in cut
    nested = sanitize({"a": [big, ("http://u:p@h",)], "exception": "z" * 50_000, "n": 3})
    assert len(nested["a"][0]) < VALUE_LIMIT + 40 and nested["a"][1] == ("http://***@h",)
    assert TRACEBACK_LIMIT <= len(nested["exception"]) < TRACEBACK_LIMIT + 40 and nested["n"] == 3


def _lines(err: str) -> list[dict]:
    return [json.loads(line) for line in err.splitlines() if line.strip()]


def test_every_log_line_is_redacted_and_cut_json(capsys) -> None:
    """Ours, a bridged botocore DEBUG line, an exception object as a value, and a JSON traceback."""
    setup_logging(json_mode=True, level="DEBUG")
    url = f"http://sentineluser:{SENTINEL}@127.0.0.1:9/bucket"
    log = get_logger("job.test")
    log.info("record_quoted", record="r" * 1_048_576, endpoint=url)
    logging.getLogger("botocore.endpoint").debug("Sending http request: <AWSPreparedRequest url=%s>", url)
    logging.getLogger("botocore.parsers").debug("Response body:\n%s", "b" * 1_048_576)
    log.warning("as_object", error=ValueError(f"cannot reach {url}"))
    try:
        raise ConnectionError(f"Could not connect to the endpoint URL: {url} " + "e" * 100_000)
    except ConnectionError:
        log.exception("unexpected_error")
    err = capsys.readouterr().err
    assert SENTINEL not in err
    lines = [line for line in _lines(err) if line["logger"].startswith(("job.test", "botocore"))]  # not torch's
    body = "Response body:\n" + "b" * (TRACEBACK_LIMIT - 15) + CUT_MARK.format(1_048_576 + 15 - TRACEBACK_LIMIT)
    assert [line["event"] for line in lines] == [
        "record_quoted",
        "Sending http request: <AWSPreparedRequest url=http://***@127.0.0.1:9/bucket>",
        body,  # a library's message is all `event`: cut too, at the traceback limit
        "as_object",
        "unexpected_error",
    ]
    assert lines[0]["record"].endswith(CUT_MARK.format(1_048_576 - VALUE_LIMIT))
    assert lines[0]["endpoint"] == "http://***@127.0.0.1:9/bucket"
    assert lines[3]["error"] == "ValueError: cannot reach http://***@127.0.0.1:9/bucket"
    assert "http://***@127.0.0.1:9/bucket" in lines[4]["exception"][0]["exc_value"]
    assert len(err) < 3 * TRACEBACK_LIMIT + 10_000  # 2.1 MB went in


def test_console_tracebacks_are_redacted_and_show_no_locals(capsys) -> None:
    setup_logging(json_mode=False, level="INFO")
    password = SENTINEL  # a local variable: the console renderer must not print it

    try:
        raise RuntimeError(f"Could not connect to http://u:{password}@h:9/")
    except RuntimeError:
        get_logger("job.test").exception("unexpected_error")
    err = capsys.readouterr().err
    assert "unexpected_error" in err and "http://***@h:9/" in err
    assert SENTINEL not in err


def test_resolved_config_hides_url_credentials_and_is_stable_for_drift() -> None:
    from job.config.drift import config_drift

    url = f"http://sentineluser:{SENTINEL}@minio:9000"
    config = load_config(None, [*BASE, f"storage.endpoint_url={url}", "model.source=https://u:tok@hub.example/m"], {})
    text = to_yaml(config)
    assert SENTINEL not in text and "tok@" not in text
    assert "endpoint_url: http://***@minio:9000" in text and "https://***@hub.example/m" in text
    assert SENTINEL not in json.dumps(redacted(config.to_dict()))
    import yaml

    again = load_config(None, [*BASE, f"storage.endpoint_url={url}", "model.source=https://u:tok@hub.example/m"], {})
    assert config_drift(yaml.safe_load(text), yaml.safe_load(to_yaml(again))) == []


def test_model_card_hides_url_credentials() -> None:
    from job.publish.card import render_card

    config = load_config(None, [*BASE, f"storage.endpoint_url=http://u:{SENTINEL}@minio:9000"], {})
    card = render_card(
        config,
        base_model=f"https://u:{SENTINEL}@hub.example/base",
        revision=None,
        data_files={f"https://u:{SENTINEL}@data.example/train.jsonl": "ab" * 32},
        metrics={"note": f"pulled from http://u:{SENTINEL}@minio:9000"},
        plot=None,
    )
    assert SENTINEL not in card
    assert "https://***@hub.example/base" in card and "http://***@minio:9000" in card


def test_status_never_shows_credentials_nor_a_megabyte_error(tmp_path: Path) -> None:
    from job.publish.status import RESOLVED_CONFIG, record_failure, render_status, run_status
    from job.storage import open_store

    store = open_store(str(tmp_path / "runs")).child("leaky")
    # as an older version would have written it: the password in the clear
    store.write_bytes(RESOLVED_CONFIG, f"model: {{source: 'https://u:{SENTINEL}@hub.example/m'}}\n".encode())
    record_failure(store, 65, f"bad record from http://u:{SENTINEL}@h/x: " + "r" * 1_048_576)
    assert SENTINEL not in store.read_bytes("reports/failure.json").decode()
    report = run_status(store)
    text = render_status(report) + json.dumps(report)
    assert SENTINEL not in text and "https://***@hub.example/m" in text
    assert report["phase"] == "failed" and len(report["failure"]["error"]) < 2100


def test_s3_endpoint_credentials_are_stripped_with_one_warning(monkeypatch) -> None:
    from job.storage import s3_client

    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://envuser:{SENTINEL}@127.0.0.1:9001/")
    with structlog.testing.capture_logs() as logs:
        first = s3_client.resolve_endpoint(StorageConfig())
        second = s3_client.resolve_endpoint(StorageConfig())
    assert first == second == "http://127.0.0.1:9001/"
    warnings = [e for e in logs if e["event"] == "s3_endpoint_credentials_ignored"]
    assert len(warnings) == 1 and warnings[0]["setting"] == "AWS_ENDPOINT_URL"
    assert SENTINEL not in json.dumps(logs, default=str)
    explicit = StorageConfig(endpoint_url="https://a:b/c@minio.local:9000")  # '/' in the password
    assert s3_client.resolve_endpoint(explicit) == "https://minio.local:9000"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"ftp://u:{SENTINEL}@h")
    with pytest.raises(ConfigError, match="AWS_ENDPOINT_URL_S3") as caught:
        s3_client.resolve_endpoint(StorageConfig())
    assert SENTINEL not in str(caught.value)


def _files_containing(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


@pytest.mark.slow
def test_sentinel_password_in_the_endpoint_appears_nowhere(s3_bucket, tiny_model_dir, tmp_path) -> None:
    """One DEBUG run on S3 whose endpoint carries a password; then `status` with the password in
    AWS_ENDPOINT_URL_S3 instead. Neither password is in any output, file or object."""
    host = s3_bucket.endpoint.removeprefix("http://")
    args = [
        *cpu_run_args(tmp_path, tiny_model_dir, "sentinel", "--set", "train.max_steps=4"),
        "--set", f"run.output={s3_bucket.uri}/runs",
        "--set", f"storage.endpoint_url=http://sentineluser:{SENTINEL}@{host}",
    ]  # fmt: skip
    result = run_job(*args, env={"SFT_LOG_LEVEL": "DEBUG"})
    assert result.returncode == 0, result.stderr[-4000:].replace(SENTINEL, "<sentinel>")
    assert any(line["logger"].startswith("botocore") for line in result.lines)  # DEBUG really was on
    warned = result.events("s3_endpoint_credentials_ignored")
    assert len(warned) == 1 and warned[0]["setting"] == "storage.endpoint_url"

    second = "SECOND-SENTINEL-5678"
    status = run_job(
        "status", f"{s3_bucket.uri}/runs/sentinel", "--json",
        env={"SFT_LOG_LEVEL": "DEBUG", "AWS_ENDPOINT_URL_S3": f"http://u:{second}@{host}"},
    )  # fmt: skip
    assert status.returncode == 0, status.stderr[-4000:].replace(second, "<sentinel>")
    assert json.loads(status.stdout)["phase"] == "finished"

    keys = s3_bucket.list_keys()
    assert "runs/sentinel/config.resolved.yaml" in keys and any(k.endswith("README.md") for k in keys)
    leaks = [k for k in keys if SENTINEL.encode() in s3_bucket.get(k) or second.encode() in s3_bucket.get(k)]
    for text, where in ((result.stdout, "stdout"), (result.stderr, "stderr"), (status.stdout, "status stdout")):
        if SENTINEL in text or second in text:
            leaks.append(where)
    if second in status.stderr:
        leaks.append("status stderr")
    leaks += _files_containing(tmp_path, SENTINEL.encode())
    assert leaks == []
    resolved = s3_bucket.get("runs/sentinel/config.resolved.yaml").decode()
    assert f"endpoint_url: http://***@{host}" in resolved
