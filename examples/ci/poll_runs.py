"""One polling pass over sft-job runs submitted with `scripts/submit-run.sh --no-wait`; CI runs it on a schedule.

For every Job labelled `sft-job/run` and not yet labelled `sft-job/reported` (or the one `--run`
names), it reads the Job's state (kubectl) and the run's state from its store (`entrypoint.py status
--json` on the URI in the Job's `sft-job/run-uri` annotation), decides, and reports:
  succeeded  the store holds the final model             -> label sft-job/reported=succeeded
  failed     the job recorded a failure, the Job failed, or the Job is gone unfinished
                                                          -> label sft-job/reported=failed
  waiting    anything else (training, preempted-waiting, pending)  -> nothing changes
Exit status: 0 nothing failed, 1 at least one run failed in this pass, 2 kubectl failed or bad usage.
A Markdown table goes to $GITHUB_STEP_SUMMARY when that is set. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RUN_LABEL = "sft-job/run"
REPORTED_LABEL = "sft-job/reported"
RUN_URI_ANNOTATION = "sft-job/run-uri"


@dataclass
class Verdict:
    outcome: str  # succeeded | failed | waiting
    detail: str


def decide(job: dict[str, Any] | None, status: dict[str, Any] | None, status_error: str = "") -> Verdict:
    """What a run's Job (None: gone) and its store status (None: unreadable or no run yet) add up to."""
    phase = status["phase"] if status else None
    state, reason = job_state(job) if job is not None else ("Gone", "")
    if phase == "finished":
        final = status["final"]
        return Verdict("succeeded", f"final model: {final['files']} files, {final['bytes'] / 2**30:.1f} GiB")
    if phase == "failed":
        failure = status["failure"]
        return Verdict("failed", f"exit {failure['exit_code']}: {failure['error']}")
    if state == "Failed":
        return Verdict("failed", f"Job failed: {reason or 'no reason given'}" + _progress(status))
    if state == "Complete":
        if status is None:  # the store could not be read: trust the Job, say so
            return Verdict("succeeded", f"Job complete; store not read ({status_error or 'no status'})")
        return Verdict("failed", f"Job complete but the store has no final model (phase {phase})")
    if state == "Gone":
        return Verdict("failed", f"Job is gone (deleted or past its TTL) and the run is {phase or 'unknown'}")
    if status is None:
        return Verdict("waiting", f"Job active; store: {status_error or 'nothing written yet'}")
    return Verdict("waiting", f"{phase}{_progress(status)}")


def job_state(job: dict[str, Any]) -> tuple[str, str]:
    """Complete | Failed | Active, and the failure's reason and message."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("status") == "True" and condition.get("type") in ("Complete", "Failed"):
            text = ": ".join(part for part in (condition.get("reason"), condition.get("message")) if part)
            return condition["type"], text
    return "Active", ""


def _progress(status: dict[str, Any] | None) -> str:
    metrics = (status or {}).get("last_metrics")
    if not metrics:
        return ""
    eta = f", ETA {metrics['eta_seconds'] / 3600:.1f} h" if metrics.get("eta_seconds") else ""
    durable = (status or {}).get("newest_durable_step")
    saved = f", durable step {durable}" if durable is not None else ""
    return f", step {metrics['step']}/{metrics.get('max_steps') or '?'}{saved}{eta}"


class Cluster:
    """kubectl, as the CI job's credentials allow (KUBECTL overrides the binary)."""

    def __init__(self, namespace: str | None) -> None:
        self.base = [os.environ.get("KUBECTL", "kubectl"), *(["-n", namespace] if namespace else [])]

    def run(self, *args: str) -> str:
        proc = subprocess.run([*self.base, *args], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
        return proc.stdout

    def open_jobs(self, run: str | None) -> list[dict[str, Any]]:
        if run:
            return json.loads(self.run("get", "jobs", "-l", f"{RUN_LABEL}={run}", "-o", "json"))["items"]
        return json.loads(self.run("get", "jobs", "-l", f"{RUN_LABEL},!{REPORTED_LABEL}", "-o", "json"))["items"]

    def mark(self, name: str, outcome: str) -> None:
        self.run("label", "--overwrite", f"job/{name}", f"{REPORTED_LABEL}={outcome}")


def read_status(run_uri: str) -> tuple[dict[str, Any] | None, str]:
    """`status --json` of the run (the job's own CLI, from this checkout): (status, '') or (None, why)."""
    cmd = os.environ.get("SFT_STATUS_COMMAND", f"{sys.executable} {REPO / 'entrypoint.py'} status --json").split()
    proc = subprocess.run([*cmd, run_uri], capture_output=True, text=True, cwd=REPO)
    if proc.returncode == 0:
        return json.loads(proc.stdout), ""
    try:  # --json errors are JSON on stdout too
        errors = json.loads(proc.stdout).get("errors") or [{}]
        why = errors[0].get("message") or proc.stderr.strip()
    except (json.JSONDecodeError, AttributeError):
        why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
    return None, f"status exit {proc.returncode}: {why}"


def poll(cluster: Cluster, run: str | None = None, run_uri: str | None = None) -> list[tuple[str, Verdict]]:
    jobs = cluster.open_jobs(run)
    if run and not jobs and run_uri:  # the Job is gone (TTL): the store alone decides
        status, error = read_status(run_uri)
        return [(run, decide(None, status, error))]
    results = []
    for job in jobs:
        name = job["metadata"]["name"]
        uri = (job["metadata"].get("annotations") or {}).get(RUN_URI_ANNOTATION)
        status, error = read_status(uri) if uri else (None, f"no {RUN_URI_ANNOTATION} annotation")
        verdict = decide(job, status, error)
        if verdict.outcome != "waiting":
            cluster.mark(name, verdict.outcome)
        results.append((name, verdict))
    return results


def summary(results: list[tuple[str, Verdict]]) -> str:
    if not results:
        return "### sft-job runs\nNo run waiting to be reported.\n"
    rows = [f"| `{name}` | {v.outcome} | {v.detail.replace('|', '/')} |" for name, v in results]
    return "\n".join(["### sft-job runs", "| run | outcome | detail |", "|---|---|---|", *rows]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--namespace", "-n", default=os.environ.get("SFT_NAMESPACE"))
    parser.add_argument("--run", help="one run (its Job name), reported or not")
    parser.add_argument("--run-uri", help="with --run: the run's store URI, for a run whose Job is gone")
    args = parser.parse_args(argv)
    try:
        results = poll(Cluster(args.namespace), args.run, args.run_uri)
    except RuntimeError as exc:
        print(f"poll-runs: {exc}", file=sys.stderr)
        return 2
    for name, verdict in results:
        print(f"run={name} outcome={verdict.outcome} {verdict.detail}")
    if os.environ.get("GITHUB_STEP_SUMMARY"):
        with open(os.environ["GITHUB_STEP_SUMMARY"], "a") as out:
            out.write(summary(results))
    return 1 if any(v.outcome == "failed" for _, v in results) else 0


if __name__ == "__main__":
    sys.exit(main())
