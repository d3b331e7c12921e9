"""job/logs: every line a library writes comes out once, as our JSON, whatever the import order."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

# A fresh interpreter: huggingface_hub and torch are first imported by setup_logging itself (through
# transformers), which is when they add their own stderr handlers.
SCRIPT = """
import logging
from job.logs import setup_logging, bind_run, quiet_unless_main, get_logger
setup_logging(json_mode=True)
logging.getLogger("huggingface_hub.utils._http").warning("hub says once")
logging.getLogger("torch.distributed.elastic.agent").warning("torch says once")
logging.getLogger("transformers.trainer").warning("transformers says once")
quiet_unless_main(1, True)
get_logger("job.run").info("progress, not from rank 1")
get_logger("job.run").warning("rank 1 warns")
"""


@pytest.mark.slow
def test_library_lines_come_out_once_as_json_and_other_ranks_keep_only_warnings() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    lines = [json.loads(line) for line in proc.stderr.splitlines() if line.strip()]  # any plain line fails here
    events = [line["event"] for line in lines]
    assert events == ["hub says once", "torch says once", "transformers says once", "rank 1 warns"]
    assert lines[-1]["rank"] == 1 and "rank" not in lines[0]


def test_json_lines_carry_the_run_level_logger_and_hide_no_exception(capsys) -> None:
    """In-process: our lines and a library's come out as one JSON object each, with the bound run name."""
    import logging

    from job.logs import bind_run, get_logger, setup_logging

    setup_logging(json_mode=True, level="INFO")
    bind_run(run="unit-run")
    get_logger("job.run").info("step", step=3, loss=0.5)
    logging.getLogger("transformers.trainer").warning("from a library")
    try:
        raise ValueError("boom")
    except ValueError:
        get_logger("job.cli").exception("job_failed", exit_code=1)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert [line["event"] for line in lines] == ["step", "from a library", "job_failed"]
    assert all(line["run"] == "unit-run" and "timestamp" in line for line in lines)
    assert (lines[0]["level"], lines[0]["logger"], lines[0]["step"], lines[0]["loss"]) == ("info", "job.run", 3, 0.5)
    assert (lines[1]["level"], lines[1]["logger"]) == ("warning", "transformers.trainer")
    assert lines[2]["exception"][0]["exc_type"] == "ValueError"  # the traceback as JSON, without locals
    assert "locals" not in json.dumps(lines[2]["exception"])


def test_json_lines_read_right_in_cloud_consoles(capsys) -> None:
    """Cloud Logging reads `severity` (else a stderr line is an ERROR), `message` (the summary) and `time`."""
    import datetime
    import logging

    from job.logs import MESSAGE_LIMIT, get_logger, setup_logging

    setup_logging(json_mode=True, level="DEBUG")
    log = get_logger("job.run")
    log.debug("cache_checked", hit=True)
    log.info("step", step=3, loss=0.5, endpoint="http://user:secret@minio:9000")
    logging.getLogger("transformers.trainer").warning("from a library")
    log.error("job_failed", exit_code=65, error="x" * 5000)
    logging.getLogger("torch").critical("fatal")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert [line["severity"] for line in lines] == ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
    assert lines[1]["message"] == "step step=3 loss=0.5 endpoint=http://***@minio:9000"
    assert lines[2]["message"] == "from a library" and lines[2]["event"] == "from a library"
    assert lines[3]["message"].startswith("job_failed exit_code=65 error=xxx") and len(lines[3]["message"]) == (
        MESSAGE_LIMIT
    )
    for line in lines:
        assert line["time"].endswith("Z") and line["time"] == line["timestamp"]
        moment = datetime.datetime.fromisoformat(line["time"])  # RFC 3339, UTC
        assert moment.utcoffset() == datetime.timedelta(0)
