"""k8s/kubeflow: the Trainer v2 runtime and TrainJobs against the Trainer CRDs' schemas, and their wiring to the job.

Schema validation runs the repository's own validator (k8s/kubeflow/validate.py) on the transcribed
CRD schemas; the embedded Kubernetes types are checked strictly only where kubernetes-validate is
installed (.ci/deploy-checks.sh runs that), else as bare objects.
"""

from __future__ import annotations

import copy
import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from job.dist.launch import hosts_rendezvous
from job.errors import FATAL_EXIT_CODES, Preempted

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed (deploy-checks validates)")

ROOT = Path(__file__).resolve().parents[1]
KUBEFLOW = ROOT / "k8s" / "kubeflow"
RUNTIME = yaml.safe_load((KUBEFLOW / "runtime.yaml").read_text())
TRAINJOBS = {p.name: yaml.safe_load(p.read_text()) for p in sorted(KUBEFLOW.glob("trainjob-*.yaml"))}


def load_validator() -> Any:
    spec = importlib.util.spec_from_file_location("kubeflow_validate", KUBEFLOW / "validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


validator = load_validator()


def errors_of(*docs: dict[str, Any], k8s: bool = False) -> list[str]:
    schemas, registry = validator.load_crd_schemas(k8s=k8s)
    return validator.validate_documents(docs, schemas, registry)


def node_job(runtime: dict[str, Any]) -> dict[str, Any]:
    (job,) = [j for j in runtime["spec"]["template"]["spec"]["replicatedJobs"] if j["name"] == "node"]
    return job


def node_container(runtime: dict[str, Any]) -> dict[str, Any]:
    (container,) = node_job(runtime)["template"]["spec"]["template"]["spec"]["containers"]
    return container


# ------------------------------------------------------------------ schema


def test_every_manifest_validates_against_the_crd_schemas():
    assert set(TRAINJOBS) == {"trainjob-1gpu.yaml", "trainjob-multinode.yaml"}
    assert errors_of(RUNTIME, *TRAINJOBS.values()) == []
    for schema_file in validator.SCHEMAS:
        header = schema_file.read_text()
        crd = yaml.safe_load(header)
        assert re.fullmatch(r"[0-9a-f]{40}", crd["source"]["commit"]) and crd["source"]["license"] == "Apache-2.0"
        assert crd["source"]["repository"] == "kubeflow/trainer" and "Apache License 2.0" in header


def with_change(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of doc with one field set (a path of keys and list indexes, dot-separated)."""
    doc = copy.deepcopy(doc)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = doc
    for key in parents:
        node = node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


DELETE = object()
TRAINJOB = TRAINJOBS["trainjob-1gpu.yaml"]


@pytest.mark.parametrize(
    ("doc", "path", "value", "expected"),
    [
        (RUNTIME, "spec.mlPolicy.torch.numProcPerNod", 1, "Additional properties are not allowed ('numProcPerNod'"),
        (RUNTIME, "spec.template.spec.failurePolicy.rules.0.action", "Restart", "'Restart' is not one of"),
        (RUNTIME, "spec.template.spec.replicatedJobs.0.replica", 2, "('replica' was unexpected)"),
        (RUNTIME, "spec.template.spec.sucessPolicy", {"operator": "All"}, "('sucessPolicy' was unexpected)"),
        (TRAINJOB, "spec.trainer.numNode", 2, "('numNode' was unexpected)"),
        (TRAINJOB, "spec.trainer.numNodes", "2", "'2' is not of type 'integer'"),
        (TRAINJOB, "spec.runtimeRef", DELETE, "'runtimeRef' is a required property"),
        (TRAINJOB, "metadata.name", "2-support-bot", "does not match"),
        (TRAINJOB, "spec.managedBy", "me/controller", "is not one of"),
    ],
)
def test_a_misspelled_or_wrong_field_is_rejected(doc, path, value, expected):
    errors = errors_of(with_change(doc, path, value))
    assert len(errors) == 1 and expected in errors[0], errors


def test_embedded_kubernetes_types_are_checked_strictly_with_kubernetes_validate():
    if validator._k8s_definitions() is None:
        pytest.skip("kubernetes-validate is not installed (.ci/deploy-checks.sh runs this check)")
    assert errors_of(RUNTIME, *TRAINJOBS.values(), k8s=True) == []
    pod = "spec.template.spec.replicatedJobs.0.template.spec.template.spec"
    broken = with_change(RUNTIME, f"{pod}.containers.0.imagePullPolicyy", "Always")
    assert any("imagePullPolicyy" in e for e in errors_of(broken, k8s=True))
    assert errors_of(broken) == [], "without Kubernetes' schema the pod spec is only an object"
    env = with_change(TRAINJOB, "spec.trainer.env.0.valu", "x")
    assert any("valu" in e for e in errors_of(env, k8s=True))


# ------------------------------------------------------------------ wiring to the job


def test_the_trainer_finds_our_container_and_the_job_gets_the_torch_variables():
    job = node_job(RUNTIME)
    assert job["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    container = node_container(RUNTIME)
    assert container["name"] == "node" and "command" not in container, "tini stays PID 1 (the image's ENTRYPOINT)"
    assert RUNTIME["spec"]["mlPolicy"]["torch"] == {}
    # What the torch plugin sets, expanded as Kubernetes expands $(VAR) in args.
    pet = {
        "PET_NNODES": "2",
        "PET_MASTER_ADDR": "support-bot-v1-2n-node-0-0.support-bot-v1-2n",
        "PET_MASTER_PORT": "29500",
    }
    args = [re.sub(r"\$\((\w+)\)", lambda m: pet[m.group(1)], arg) for arg in container["args"]]
    from job.cli import cli

    ctx = cli.commands["train"].make_context("train", args[1:])
    assert args[0] == "train" and ctx.params["nnodes"] == 2
    assert ctx.params["rdzv_endpoint"] == "support-bot-v1-2n-node-0-0.support-bot-v1-2n:29500"
    assert hosts_rendezvous(ctx.params["rdzv_endpoint"], "support-bot-v1-2n-node-0-0") is True
    assert hosts_rendezvous(ctx.params["rdzv_endpoint"], "support-bot-v1-2n-node-0-1") is None
    assert [p["containerPort"] for p in container["ports"]] == [29500]
    env = {e["name"]: e for e in container["env"]}
    assert env["SFT_RUN__NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['jobset.sigs.k8s.io/jobset-name']"
    ), "the TrainJob's (= JobSet's) name is the run's name"
    assert (
        env["SFT_DISTRIBUTED__NPROC_PER_NODE"]["value"] == "1"
        and container["resources"]["limits"]["nvidia.com/gpu"] == 1
    )
    grace = node_job(RUNTIME)["template"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert float(env["SFT_CHECKPOINT__GRACE_SECONDS"]["value"]) + 20 <= grace


def test_exit_codes_map_to_restart_or_fail_like_the_multinode_jobset():
    job_spec = node_job(RUNTIME)["template"]["spec"]
    assert job_spec["backoffLimit"] == 0 and job_spec["completionMode"] == "Indexed"
    rules = job_spec["podFailurePolicy"]["rules"]
    assert rules[0]["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    assert rules[1]["onExitCodes"]["values"] == [Preempted.exit_code]
    assert tuple(rules[2]["onExitCodes"]["values"]) == FATAL_EXIT_CODES
    assert all(r["action"] == "FailJob" for r in rules)
    assert all(r["onExitCodes"]["containerName"] == "node" for r in rules[1:])
    # The Job controller's messages (pkg/controller/job/pod_failure_policy.go), per rule index.
    messages = {
        0: "Pod ml/x-node-0-0-abcde has condition DisruptionTarget matching FailJob rule at index 0",
        1: "Container node for pod ml/x-node-0-1-abcde failed with exit code 75 matching FailJob rule at index 1",
        2: "Container node for pod ml/x-node-0-0-abcde failed with exit code 71 matching FailJob rule at index 2",
    }
    actions = {0: "RestartJobSetAndIgnoreMaxRestarts", 1: "RestartJobSetAndIgnoreMaxRestarts", 2: "FailJobSet"}
    policy = RUNTIME["spec"]["template"]["spec"]["failurePolicy"]
    assert policy["restartStrategy"] == "BlockingRecreate" and policy["maxRestarts"] == 6
    for index, message in messages.items():
        matched = [
            r
            for r in policy["rules"]
            if "PodFailurePolicy" in r.get("onJobFailureReasons", [])
            and any(re.search(p, message) for p in r.get("onJobFailureMessagePatterns", []))
        ]
        assert [r["action"] for r in matched] == [actions[index]], message


def test_scheduling_and_pod_match_the_single_job_base():
    base = yaml.safe_load((ROOT / "k8s" / "base" / "job.yaml").read_text())["spec"]["template"]["spec"]
    pod = node_job(RUNTIME)["template"]["spec"]["template"]["spec"]
    assert pod["affinity"]["nodeAffinity"] == base["affinity"]["nodeAffinity"], "keep runtime.yaml's node terms in step"
    assert pod["tolerations"] == base["tolerations"]
    assert pod["securityContext"] == base["securityContext"]
    (base_container,) = base["containers"]
    container = node_container(RUNTIME)
    assert container["securityContext"] == base_container["securityContext"]
    for kind in ("requests", "limits"):
        for resource in ("cpu", "memory", "nvidia.com/gpu"):
            assert container["resources"][kind].get(resource) == base_container["resources"][kind].get(resource)


def test_trainjobs_name_the_runtime_and_leave_the_launch_to_it():
    for name, trainjob in TRAINJOBS.items():
        spec = trainjob["spec"]
        assert spec["runtimeRef"] == {"name": RUNTIME["metadata"]["name"]}, name
        trainer = spec["trainer"]
        assert "args" not in trainer and "command" not in trainer, f"{name}: args would replace the launcher's"
        assert "resourcesPerNode" not in trainer, f"{name}: it replaces the runtime's resources whole"
        assert not [e for e in trainer.get("env", []) if e["name"].startswith("PET_")], "PET_* are the Trainer's"
    assert TRAINJOBS["trainjob-1gpu.yaml"]["spec"]["trainer"]["numNodes"] == 1
    assert TRAINJOBS["trainjob-multinode.yaml"]["spec"]["trainer"]["numNodes"] > 1


def test_deploy_checks_run_the_validator_with_kubernetes_types():
    checks = (ROOT / ".ci" / "deploy-checks.sh").read_text()
    assert "k8s/kubeflow/validate.py --require-k8s" in checks
