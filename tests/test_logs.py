"""job/logs: every line a library writes comes out once, as our JSON, whatever the import order."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

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


def test_library_lines_come_out_once_as_json_and_other_ranks_keep_only_warnings() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    lines = [json.loads(line) for line in proc.stderr.splitlines() if line.strip()]  # any plain line fails here
    events = [line["event"] for line in lines]
    assert events == ["hub says once", "torch says once", "transformers says once", "rank 1 warns"]
    assert lines[-1]["rank"] == 1 and "rank" not in lines[0]
