"""examples/ci: OIDC instead of stored keys, submit without holding a runner, a poller deciding on `status --json`.

The poller's decisions are tested on status dicts the job's own status code reads from real local
stores (the same writers the job uses); one slow test runs the poller end to end with a kubectl
stand-in and the real `entrypoint.py status --json`. actionlint and the schemas run in
.ci/deploy-checks.sh.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from job.publish.export import publish_final
from job.publish.metrics import MetricsLog
from job.publish.status import record_failure, run_status
from job.storage import open_store

ROOT = Path(__file__).resolve().parents[1]
CI = ROOT / "examples" / "ci"
GITHUB = {p.name: yaml.safe_load(p.read_text()) for p in sorted(CI.glob("github-*.yml"))}
GITLAB = yaml.safe_load((CI / "gitlab-ci.yml").read_text())
PINNED = re.compile(r"^[\w.-]+/[\w.-]+(/[\w./-]+)?@(v\d+(\.\d+){0,2}|[0-9a-f]{40})$")


def load_poller() -> Any:
    spec = importlib.util.spec_from_file_location("poll_runs", CI / "poll_runs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["poll_runs"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


poller = load_poller()


def steps(job: dict[str, Any]) -> list[dict[str, Any]]:
    return job.get("steps", [])


def uses(job: dict[str, Any], action: str) -> dict[str, Any] | None:
    return next((s for s in steps(job) if s.get("uses", "").split("@")[0] == action), None)


def triggers(workflow: dict[str, Any]) -> dict[str, Any]:
    return workflow[True]  # YAML 1.1 reads the key `on` as true


def script(job: dict[str, Any]) -> str:
    return "\n".join(s.get("run", "") for s in steps(job))


# ------------------------------------------------------------------ GitHub Actions


def test_github_workflows_use_oidc_and_no_stored_cluster_credentials():
    assert set(GITHUB) == {"github-actions.yml", "github-actions-eks.yml", "github-actions-poll.yml"}
    for name, workflow in GITHUB.items():
        text = (CI / name).read_text()
        assert workflow["permissions"] == {"contents": "read", "id-token": "write"}, name
        assert "KUBECONFIG" not in text and "secrets." not in text, f"{name}: no stored kubeconfig or keys"
        for job_name, job in workflow["jobs"].items():
            for step in steps(job):
                if "uses" in step:
                    assert PINNED.match(step["uses"]), f"{name} {job_name}: {step['uses']} is not pinned"


def test_gke_workflow_authenticates_through_workload_identity_federation():
    jobs = GITHUB["github-actions.yml"]["jobs"]
    for job_name in ("image", "smoke", "submit"):
        auth = uses(jobs[job_name], "google-github-actions/auth")
        assert auth and auth["with"]["workload_identity_provider"] == "${{ vars.GCP_WIF_PROVIDER }}", job_name
    gke = uses(jobs["submit"], "google-github-actions/get-gke-credentials")
    assert {"cluster_name", "location"} <= set(gke["with"])
    login = uses(jobs["image"], "docker/login-action")
    assert (
        login["with"]["username"] == "oauth2accesstoken"
        and "steps.auth.outputs.access_token" in login["with"]["password"]
    )


def test_eks_workflow_assumes_a_role_and_builds_its_kubeconfig():
    jobs = GITHUB["github-actions-eks.yml"]["jobs"]
    for job_name in ("image", "smoke", "submit"):
        aws = uses(jobs[job_name], "aws-actions/configure-aws-credentials")
        assert aws and aws["with"]["role-to-assume"] == "${{ vars.AWS_CI_ROLE_ARN }}", job_name
    assert 'aws eks update-kubeconfig --name "$EKS_CLUSTER"' in script(jobs["submit"])
    assert uses(jobs["image"], "aws-actions/amazon-ecr-login")


@pytest.mark.parametrize("name", ["github-actions.yml", "github-actions-eks.yml"])
def test_submit_creates_the_run_and_ends(name):
    workflow = GITHUB[name]
    submit = workflow["jobs"]["submit"]
    assert submit["timeout-minutes"] <= 15, "the runner is never held for the run"
    run = script(submit)
    assert "scripts/submit-run.sh --no-wait" in run and '--image "$IMAGE"' in run
    assert '| tee -a "$GITHUB_OUTPUT"' in run, "submit-run.sh's key=value lines become the step's outputs"
    assert submit["outputs"]["run-name"] == "${{ steps.run.outputs.run-name }}"
    for option in triggers(workflow)["workflow_dispatch"]["inputs"]["overlay"]["options"]:
        assert (ROOT / option / "kustomization.yaml").is_file(), option
    build = next(s for s in steps(workflow["jobs"]["image"]) if s.get("id") == "build")
    assert build["with"]["push"] is True
    assert "@${{ steps.build.outputs.digest }}" in workflow["jobs"]["image"]["outputs"]["ref"]


def test_poll_workflow_is_scheduled_and_runs_the_poller_per_cloud():
    workflow = GITHUB["github-actions-poll.yml"]
    assert triggers(workflow)["schedule"] and "workflow_dispatch" in triggers(workflow)
    for job_name, cluster in (("gke", "GKE_CLUSTER"), ("eks", "EKS_CLUSTER")):
        job = workflow["jobs"][job_name]
        assert job["if"] == f"vars.{cluster} != ''" and job["timeout-minutes"] <= 10
        assert "python examples/ci/poll_runs.py" in script(job)
    gke = workflow["jobs"]["gke"]
    poll_step = next(s for s in steps(gke) if s.get("name") == "Poll")
    assert poll_step["env"]["AWS_ENDPOINT_URL_S3"] == "https://storage.googleapis.com"
    assert uses(gke, "google-github-actions/get-secretmanager-secrets"), "HMAC keys from Secret Manager, not GitHub"


# ------------------------------------------------------------------ GitLab CI


def test_gitlab_submits_with_id_tokens_and_polls_on_a_schedule():
    assert GITLAB["stages"] == ["submit", "poll"]
    assert GITLAB[".eks"]["id_tokens"]["AWS_ID_TOKEN"]["aud"] == "sts.amazonaws.com"
    assert GITLAB[".gke"]["id_tokens"]["GCP_ID_TOKEN"]["aud"] == "$GCP_WIF_AUDIENCE"
    assert "scripts/submit-run.sh --no-wait" in " ".join(GITLAB[".submit"]["script"])
    assert GITLAB[".submit"]["timeout"] == "10m"
    for cloud in ("eks", "gke"):
        submit, poll = GITLAB[f"submit:{cloud}"], GITLAB[f"poll:{cloud}"]
        assert f".{cloud}" in submit["extends"] and f".{cloud}" in poll["extends"]
        assert submit["rules"][0] == {"if": '$CI_PIPELINE_SOURCE == "schedule"', "when": "never"}
        assert poll["rules"][0]["if"].startswith('$CI_PIPELINE_SOURCE == "schedule"')
        assert "examples/ci/poll_runs.py" in " ".join(poll.get("script") or GITLAB[".poll"]["script"])
    dotenv = " ".join(GITLAB[".submit"]["script"])
    assert "SFT_RUN_NAME=" in dotenv, "dotenv names must be valid variable names (no '-')"


# ------------------------------------------------------------------ the poller's decisions


def store_in(tmp_path: Path, name: str):
    return open_store(str(tmp_path / "runs")).child(name)


def add_steps(store, *steps_done: int) -> None:
    metrics = MetricsLog(store)
    for step in steps_done:
        metrics.add({"step": step, "loss": 1.0, "seconds": 60.0, "max_steps": 100, "tokens_per_second": 9.0})
    metrics.flush()


def job_with(condition: str | None, reason: str = "", message: str = "") -> dict[str, Any]:
    conditions = [{"type": condition, "status": "True", "reason": reason, "message": message}] if condition else []
    return {"metadata": {"name": "r"}, "status": {"conditions": conditions}}


def test_decisions_from_what_the_store_holds(tmp_path):
    training = store_in(tmp_path, "training")
    add_steps(training, 1, 2, 3)
    verdict = poller.decide(job_with(None), run_status(training))
    assert verdict.outcome == "waiting" and "preempted-waiting, step 3/100" in verdict.detail
    assert "ETA 1.6 h" in verdict.detail  # 97 steps x 60 s

    failed = store_in(tmp_path, "failed")
    add_steps(failed, 1)
    time.sleep(0.01)
    record_failure(failed, 71, "driver 570.86 is older than CUDA 13.0 needs (580)")
    verdict = poller.decide(job_with("Failed", "PodFailurePolicy"), run_status(failed))
    assert verdict.outcome == "failed" and verdict.detail.startswith("exit 71: driver 570.86")

    done = store_in(tmp_path, "done")
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"\0" * 1024)
    publish_final(done, staging)
    assert poller.decide(job_with("Complete"), run_status(done)).outcome == "succeeded"
    assert poller.decide(None, run_status(done)).outcome == "succeeded", "the store decides once the Job is gone"


def test_decisions_when_the_job_and_the_store_disagree_or_are_silent(tmp_path):
    training = store_in(tmp_path, "t")
    add_steps(training, 5)
    status = run_status(training)
    deadline = poller.decide(job_with("Failed", "DeadlineExceeded", "Job was active longer than specified"), status)
    assert deadline.outcome == "failed" and "DeadlineExceeded" in deadline.detail and "step 5/100" in deadline.detail
    assert poller.decide(job_with("Complete"), status).outcome == "failed", "complete without a final model"
    assert poller.decide(None, status).outcome == "failed", "a Job gone before the run finished"
    assert poller.decide(job_with("Complete"), None, "AccessDenied").outcome == "succeeded"
    pending = poller.decide(job_with(None), None, "status exit 66: no run at s3://b/runs/r")
    assert pending.outcome == "waiting" and "no run at" in pending.detail


def test_summary_is_a_markdown_table():
    table = poller.summary([("r1", poller.Verdict("failed", "exit 65: bad | row"))])
    assert "| `r1` | failed | exit 65: bad / row |" in table
    assert "No run waiting" in poller.summary([])


# ------------------------------------------------------------------ end to end: kubectl stand-in + real status CLI

FAKE_KUBECTL = r"""#!/usr/bin/env python3
import json, os, sys
state_path = os.environ["FAKE_KUBECTL_STATE"]
state = json.load(open(state_path))
args = sys.argv[1:]
if args[:2] == ["-n", state["namespace"]]:
    args = args[2:]
state["calls"].append(args)
if args[:2] == ["get", "jobs"]:
    selector = args[args.index("-l") + 1]
    items = [j for j in state["jobs"] if "sft-job/reported" not in j["metadata"].get("labels", {})]
    print(json.dumps({"items": items}))
elif args[0] == "label":
    name = args[2].split("/", 1)[1]
    key, value = args[3].split("=", 1)
    next(j for j in state["jobs"] if j["metadata"]["name"] == name)["metadata"].setdefault("labels", {})[key] = value
else:
    sys.exit(f"unexpected kubectl {args}")
json.dump(state, open(state_path, "w"))
"""


@pytest.mark.slow
def test_poller_end_to_end_reports_each_end_once(tmp_path):
    runs = tmp_path / "runs"
    add_steps(store_in(tmp_path, "still-training"), 1, 2)
    failed = store_in(tmp_path, "bad-data")
    add_steps(failed, 1)
    time.sleep(0.01)  # after the last lease heartbeat (none here) and the metrics
    record_failure(failed, 65, "bad record at train.jsonl:7")
    jobs = [
        {"metadata": {"name": name, "annotations": {"sft-job/run-uri": str(runs / name)}, "labels": {}}, "status": {}}
        for name in ("still-training", "bad-data")
    ]
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"namespace": "ml", "jobs": jobs, "calls": []}))
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(FAKE_KUBECTL.replace("#!/usr/bin/env python3", f"#!{sys.executable}", 1))
    kubectl.chmod(kubectl.stat().st_mode | stat.S_IEXEC)
    summary = tmp_path / "summary.md"
    env = {**os.environ, "KUBECTL": str(kubectl), "FAKE_KUBECTL_STATE": str(state), "GITHUB_STEP_SUMMARY": str(summary)}

    def poll() -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(CI / "poll_runs.py"), "--namespace", "ml"]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)

    first = poll()
    assert first.returncode == 1, first.stderr
    assert "run=bad-data outcome=failed exit 65: bad record at train.jsonl:7" in first.stdout
    assert "run=still-training outcome=waiting preempted-waiting, step 2/100" in first.stdout
    labels = {j["metadata"]["name"]: j["metadata"]["labels"] for j in json.loads(state.read_text())["jobs"]}
    assert labels == {"bad-data": {"sft-job/reported": "failed"}, "still-training": {}}
    assert "| `bad-data` | failed |" in summary.read_text()
    second = poll()
    assert second.returncode == 0, "a failed run fails one poll, not every later one"
    assert "bad-data" not in second.stdout and "still-training" in second.stdout


# ------------------------------------------------------------------ scripts/submit-run.sh for CI


@pytest.mark.slow
def test_submit_dry_run_annotates_the_job_with_the_run_uri(tmp_path):
    config = ROOT / "k8s" / "base" / "config" / "job.yaml"
    cmd = ["bash", str(ROOT / "scripts" / "submit-run.sh"), "--dry-run", "--config", str(config), "--name", "ci-run"]
    out = subprocess.run([*cmd, "--overlay", str(ROOT / "k8s" / "base")], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    (job,) = [d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "Job"]
    assert job["metadata"]["annotations"]["sft-job/run-uri"] == "s3://my-bucket/runs/ci-run"
    override = ["--set", "run.output=s3://other/runs/"]
    out = subprocess.run([*cmd, "--overlay", str(ROOT / "k8s" / "base"), *override], capture_output=True, text=True)
    (job,) = [d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "Job"]
    assert job["metadata"]["annotations"]["sft-job/run-uri"] == "s3://other/runs/ci-run"
