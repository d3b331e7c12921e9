"""k8s/multinode: the multi-node variant (a JobSet, N nodes x G GPUs), rendered with
`kubectl kustomize` exactly as tests/test_k8s.py renders the single-GPU Job (its helpers are
reused), and checked offline.

No schema is bundled for the JobSet CRD (kubernetes-validate only warns about the kind), so the
JobSet's own fields are asserted here against the v0.10 API (kubernetes-sigs/jobset,
api/jobset/v1alpha2/jobset_types.go), its failure policy is exercised by simulating what the Job
controller writes on a failed child Job and what the JobSet controller does with it, and the
child Job template is validated as the batch/v1 Job the controller creates from it. What must
equal the single Job (fatal and preemption exit codes, security context, scheduling, grace) is
read from the rendered single Job, never written down twice.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import test_k8s as single
import yaml

ROOT = Path(__file__).resolve().parents[1]
MULTINODE = "multinode"
DEPLOY_CHECKS = ROOT / ".ci" / "deploy-checks.sh"

pytestmark = pytest.mark.skipif(
    single.KUBECTL is None, reason="kubectl is not installed: cannot render the kustomize overlays"
)

# The JobSet API this manifest is written for: v0.10.0 (onJobFailureMessagePatterns, #1033).
# Field names from api/jobset/v1alpha2/jobset_types.go at that release; later fields
# (volumeClaimPolicies v0.11, InPlaceRestart v0.11, RestartJob v0.12, activeDeadlineSeconds v0.13
# alpha) are not allowed, so the manifest keeps working on a v0.10 controller.
JOBSET_API_VERSION = "jobset.x-k8s.io/v1alpha2"
JOBSET_V0_10_FIELDS = {
    "spec": {
        "replicatedJobs",
        "network",
        "successPolicy",
        "failurePolicy",
        "startupPolicy",
        "suspend",
        "coordinator",
        "managedBy",
        "ttlSecondsAfterFinished",
    },
    "network": {"enableDNSHostnames", "subdomain", "publishNotReadyAddresses"},
    "successPolicy": {"operator", "targetReplicatedJobs"},
    "failurePolicy": {"maxRestarts", "restartStrategy", "rules"},
    "rule": {"name", "action", "onJobFailureReasons", "onJobFailureMessagePatterns", "targetReplicatedJobs"},
    "replicatedJob": {"name", "groupName", "template", "replicas", "dependsOn"},
}
JOBSET_V0_10_ACTIONS = {"FailJobSet", "RestartJobSet", "RestartJobSetAndIgnoreMaxRestarts"}
JOBSET_V0_10_RESTART_STRATEGIES = {"Recreate", "BlockingRecreate"}
JOBSET_DEFAULT_ACTION = "RestartJobSet"  # no rule matched (pkg/controllers/failure_policy.go)
JOBSET_RULE_NAME = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
# Job failure reasons (k8s.io/api batch/v1) a failurePolicy rule may name.
JOB_FAILURE_REASONS = {
    "PodFailurePolicy",
    "BackoffLimitExceeded",
    "DeadlineExceeded",
    "MaxFailedIndexesExceeded",
    "FailedIndexes",
}

RESTART_NOT_COUNTED = "RestartJobSetAndIgnoreMaxRestarts"
RESTART_COUNTED = "RestartJobSet"
FAIL = "FailJobSet"

# Counted failures (README "Exit codes"): storage unreachable, unexpected / a rank died, killed.
RETRYABLE_EXIT_CODES = [1, 69, 137]


# ------------------------------------------------------------------ helpers


def render() -> list[dict[str, Any]]:
    return single.render(MULTINODE)


def the_jobset(docs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    docs = render() if docs is None else docs
    (jobset,) = [d for d in docs if d["kind"] == "JobSet"]
    return jobset


def replicated_job(jobset: dict[str, Any]) -> dict[str, Any]:
    rjobs = jobset["spec"]["replicatedJobs"]
    assert len(rjobs) == 1, "one replicatedJob: every node runs the same pod"
    return rjobs[0]


def child_jobs(jobset: dict[str, Any]) -> list[dict[str, Any]]:
    """Each replicatedJob's template as the batch/v1 Job the JobSet controller creates from it."""
    jobs = []
    for rjob in jobset["spec"]["replicatedJobs"]:
        template = copy.deepcopy(rjob["template"])
        for index in range(rjob.get("replicas", 1)):
            metadata = {**template.get("metadata", {}), "name": f"{jobset['metadata']['name']}-{rjob['name']}-{index}"}
            jobs.append({"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": template["spec"]})
    return jobs


def child_job() -> dict[str, Any]:
    (job,) = child_jobs(the_jobset())
    return job


def single_job() -> dict[str, Any]:
    return single.the_job(single.render("base"))


def expanded_env(container: dict[str, Any], pod_labels: dict[str, str]) -> dict[str, str]:
    """The container's environment as Kubernetes resolves it: literal values, downward-API label
    references, and `$(VAR)` references to variables defined earlier in the list."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), item["value"])
            continue
        field = item["valueFrom"].get("fieldRef", {}).get("fieldPath", "")
        label = re.fullmatch(r"metadata\.labels\['([^']+)'\]", field)
        if label and label.group(1) in pod_labels:
            env[item["name"]] = pod_labels[label.group(1)]
    return env


def pod_env(jobset: dict[str, Any] | None = None) -> dict[str, str]:
    jobset = the_jobset() if jobset is None else jobset
    labels = {JOBSET_NAME_LABEL: jobset["metadata"]["name"]}  # what the JobSet controller sets
    return expanded_env(single.train_container(child_jobs(jobset)[0]), labels)


def fatal_and_preempted_codes(job: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(FailJob exit codes, Ignore exit codes) of the single Job's podFailurePolicy."""
    rules = job["spec"]["podFailurePolicy"]["rules"]
    fatal = [c for r in rules if r["action"] == "FailJob" for c in r.get("onExitCodes", {}).get("values", [])]
    ignored = [c for r in rules if r["action"] == "Ignore" for c in r.get("onExitCodes", {}).get("values", [])]
    return fatal, ignored


def job_failure(job: dict[str, Any], *, exit_code: int, disrupted: bool = False) -> tuple[str, str] | None:
    """(reason, message) of the Failed condition the Job controller puts on the child Job when one
    of its pods fails this way; None if the pod is ignored (replaced, the Job keeps running).
    Follows kubernetes pkg/controller/job/pod_failure_policy.go (matchPodFailurePolicy) and the
    backoffLimit check; message formats are the Job controller's."""
    pod, container = "ml-training/sft-job-multinode-node-0-1-x7k2p", "train"
    rules = job["spec"].get("podFailurePolicy", {}).get("rules", [])
    for index, rule in enumerate(rules):
        if "onExitCodes" in rule:
            req = rule["onExitCodes"]
            if req.get("containerName", container) != container or exit_code == 0:
                continue
            if (exit_code in req["values"]) != (req["operator"] == "In"):
                continue
            if rule["action"] == "Ignore":
                return None
            if rule["action"] == "FailJob":
                message = f"Container {container} for pod {pod} failed with exit code {exit_code}"
                return "PodFailurePolicy", f"{message} matching FailJob rule at index {index}"
            break  # Count
        elif "onPodConditions" in rule and disrupted:
            if {"type": "DisruptionTarget", "status": "True"} not in rule["onPodConditions"]:
                continue
            if rule["action"] == "Ignore":
                return None
            if rule["action"] == "FailJob":
                return (
                    "PodFailurePolicy",
                    f"Pod {pod} has condition DisruptionTarget matching FailJob rule at index {index}",
                )
            break
    if job["spec"].get("backoffLimit", 6) < 1:
        return "BackoffLimitExceeded", "Job has reached the specified backoff limit"
    return None


def jobset_action(jobset: dict[str, Any], reason: str, message: str, replicated_job_name: str = "node") -> str:
    """The action the JobSet controller takes for a child Job failed with (reason, message):
    the first rule whose reasons, message patterns (RE2 search) and targets all match."""
    for rule in jobset["spec"]["failurePolicy"].get("rules", []):
        if rule.get("onJobFailureReasons") and reason not in rule["onJobFailureReasons"]:
            continue
        patterns = rule.get("onJobFailureMessagePatterns") or []
        if patterns and not any(re.search(p, message) for p in patterns):
            continue
        if rule.get("targetReplicatedJobs") and replicated_job_name not in rule["targetReplicatedJobs"]:
            continue
        return rule["action"]
    return JOBSET_DEFAULT_ACTION


def outcome(exit_code: int, *, disrupted: bool = False) -> str:
    jobset = the_jobset()
    failure = job_failure(child_jobs(jobset)[0], exit_code=exit_code, disrupted=disrupted)
    assert failure is not None, "every pod failure must fail the child Job, so the whole group restarts"
    return jobset_action(jobset, *failure)


# ------------------------------------------------------------------ what is rendered


def test_renders_a_jobset_with_the_base_serviceaccount_and_configmap_and_no_job():
    docs = render()
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "JobSet", "ServiceAccount"]
    assert the_jobset(docs)["apiVersion"] == JOBSET_API_VERSION
    base = {(d["kind"], d["metadata"]["name"]): d for d in single.render("base") if d["kind"] != "Job"}
    mine = {(d["kind"], d["metadata"]["name"]): d for d in docs if d["kind"] != "JobSet"}
    assert mine == base, "the ServiceAccount and the run's ConfigMap are the base's, unchanged"


def test_the_jobset_mounts_the_rendered_configmap_and_uses_the_serviceaccount():
    docs = render()
    job = child_jobs(the_jobset(docs))[0]
    config_path, config = single.config_file(docs, job)  # fails if the hashed name did not reach the JobSet
    assert config_path == single.literal_env(single.train_container(single_job()))["SFT_CONFIG"]
    assert config["model"]["source"] and config["data"]["train"]
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    assert single.pod_spec(job)["serviceAccountName"] in accounts


def test_image_is_the_single_jobs_and_keeps_tini():
    container = single.train_container(child_job())
    assert container["image"] == single.train_container(single_job())["image"], "keep `images:` equal to the base's"
    assert "command" not in container, "a `command` would replace the image's tini ENTRYPOINT"
    assert container["args"] == ["train"]


def test_jobset_uses_only_fields_of_the_v0_10_api():
    jobset = the_jobset()
    spec = jobset["spec"]
    assert set(spec) <= JOBSET_V0_10_FIELDS["spec"], set(spec) - JOBSET_V0_10_FIELDS["spec"]
    for key in ("network", "successPolicy", "failurePolicy"):
        assert set(spec[key]) <= JOBSET_V0_10_FIELDS[key], (key, set(spec[key]) - JOBSET_V0_10_FIELDS[key])
    for rule in spec["failurePolicy"]["rules"]:
        assert set(rule) <= JOBSET_V0_10_FIELDS["rule"], set(rule) - JOBSET_V0_10_FIELDS["rule"]
        assert rule["action"] in JOBSET_V0_10_ACTIONS
    assert spec["failurePolicy"].get("restartStrategy", "Recreate") in JOBSET_V0_10_RESTART_STRATEGIES
    for rjob in spec["replicatedJobs"]:
        assert set(rjob) <= JOBSET_V0_10_FIELDS["replicatedJob"], set(rjob) - JOBSET_V0_10_FIELDS["replicatedJob"]
        assert set(rjob["template"]) <= {"metadata", "spec"}


# ------------------------------------------------------------------ N nodes x G GPUs


def test_one_child_job_with_one_indexed_pod_per_node():
    jobset = the_jobset()
    rjob = replicated_job(jobset)
    spec = rjob["template"]["spec"]
    nnodes = int(pod_env(jobset)["SFT_DISTRIBUTED__NNODES"])
    assert nnodes >= 2, "the multi-node example has at least two nodes"
    assert rjob.get("replicas", 1) == 1, "one child Job; its pods are the nodes"
    assert spec["parallelism"] == spec["completions"] == nnodes, "parallelism = completions = NNODES"
    assert spec["completionMode"] == "Indexed", "stable pod hostnames <jobset>-<rjob>-0-<index>"
    assert spec["backoffLimit"] == 0, "any pod failure must fail the child Job so the whole group restarts"
    assert spec["podReplacementPolicy"] == "Failed"
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    anti = spec["template"]["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    (term,) = anti
    assert term["topologyKey"] == "kubernetes.io/hostname", "N pods on N distinct nodes"
    assert JOBSET_NAME_LABEL in term["matchLabelKeys"], "keep other runs' pods out of the rule"
    assert {"key": "jobset.sigs.k8s.io/replicatedjob-name", "operator": "In", "values": [rjob["name"]]} in term[
        "labelSelector"
    ]["matchExpressions"]


def test_gpus_per_pod_equal_nproc_per_node():
    resources = single.train_container(child_job())["resources"]
    nproc = int(pod_env()["SFT_DISTRIBUTED__NPROC_PER_NODE"])
    assert nproc >= 1
    assert int(resources["limits"]["nvidia.com/gpu"]) == nproc, "nvidia.com/gpu limit = NPROC_PER_NODE"
    assert int(resources["requests"].get("nvidia.com/gpu", nproc)) == nproc
    assert float(resources["requests"]["cpu"]) >= 4 * nproc
    assert single.quantity_gib(resources["requests"]["memory"]) >= 32 * nproc
    assert resources["requests"]["memory"] == resources["limits"]["memory"]


def test_rendezvous_endpoint_is_pod_0_under_the_jobset_subdomain():
    jobset = the_jobset()
    network = jobset["spec"]["network"]
    assert network["enableDNSHostnames"] is True, "pods are reachable by hostname only with enableDNSHostnames"
    subdomain = network.get("subdomain") or jobset["metadata"]["name"]  # the controller's default
    rjob = replicated_job(jobset)
    endpoint = pod_env(jobset)["SFT_DISTRIBUTED__RDZV_ENDPOINT"]
    host, _, port = endpoint.rpartition(":")
    pod0 = f"{jobset['metadata']['name']}-{rjob['name']}-0-0"
    assert host == f"{pod0}.{subdomain}", f"{endpoint} is not pod 0 ({pod0}) under the subdomain {subdomain}"
    (rdzv,) = [p for p in single.train_container(child_job())["ports"] if p["name"] == "rdzv"]
    assert int(port) == rdzv["containerPort"] == 29400 and rdzv["protocol"] == "TCP"
    last = f"{jobset['metadata']['name']}-{rjob['name']}-0-{rjob['template']['spec']['completions'] - 1}"
    assert all(len(label) <= 63 for label in (last, subdomain)), "pod hostnames and the subdomain are DNS labels"


def test_rendezvous_endpoint_follows_a_renamed_jobset():
    jobset = copy.deepcopy(the_jobset())
    jobset["metadata"]["name"] = "support-bot-v2"
    assert pod_env(jobset)["SFT_DISTRIBUTED__RDZV_ENDPOINT"] == "support-bot-v2-node-0-0.support-bot-v2:29400"


def test_every_sft_variable_is_a_config_key_and_sets_the_distributed_section(tmp_path):
    config_mod = pytest.importorskip("job.config.load", reason="the job package is needed to load the config")
    jobset = the_jobset()
    env = pod_env(jobset)
    spec = replicated_job(jobset)["template"]["spec"]
    gpus = int(single.train_container(child_job())["resources"]["limits"]["nvidia.com/gpu"])
    minimal = tmp_path / "minimal.yaml"
    minimal.write_text(yaml.safe_dump({"data": {"train": "s3://bucket/data/train.jsonl"}}))
    environ = {k: v for k, v in env.items() if k.startswith("SFT_") and k != "SFT_CONFIG"}
    assert {"SFT_DISTRIBUTED__NNODES", "SFT_DISTRIBUTED__NPROC_PER_NODE", "SFT_DISTRIBUTED__RDZV_ENDPOINT"} <= set(
        environ
    )
    loaded = config_mod.load_config(str(minimal), environ=environ)  # unknown keys are ConfigErrors
    dist = loaded.distributed
    assert dist.nnodes == spec["parallelism"] == spec["completions"]
    assert dist.nproc_per_node == gpus
    assert dist.world_size == spec["parallelism"] * gpus
    assert dist.rdzv_endpoint == env["SFT_DISTRIBUTED__RDZV_ENDPOINT"]
    assert dist.rdzv_id is None, "one rendezvous id per run: the default, run.name"
    assert loaded.run.scratch == env["SFT_RUN__SCRATCH"]
    assert loaded.checkpoint.grace_seconds == float(env["SFT_CHECKPOINT__GRACE_SECONDS"])
    flat = {f"SFT_{s.upper()}__{k.upper()}" for s, values in loaded.to_dict().items() for k in values}
    assert set(environ) <= flat
    # ... and with the shipped config file from the ConfigMap, as the pod loads it.
    docs = render()
    _, config = single.config_file(docs, child_jobs(the_jobset(docs))[0])
    shipped = tmp_path / "job.yaml"
    shipped.write_text(yaml.safe_dump(config))
    assert config_mod.load_config(str(shipped), environ=environ).distributed == dist


def test_a_misspelt_variable_is_refused_by_the_loader(tmp_path):
    config_mod = pytest.importorskip("job.config.load", reason="the job package is needed to load the config")
    from job.errors import ConfigError

    minimal = tmp_path / "minimal.yaml"
    minimal.write_text(yaml.safe_dump({"data": {"train": "s3://bucket/data/train.jsonl"}}))
    environ = {k: v for k, v in pod_env().items() if k.startswith("SFT_") and k != "SFT_CONFIG"}
    environ["SFT_DISTRIBUTED__NNODE"] = environ.pop("SFT_DISTRIBUTED__NNODES")
    with pytest.raises(ConfigError, match=r"SFT_DISTRIBUTED__NNODE: .*did you mean SFT_DISTRIBUTED__NNODES"):
        config_mod.load_config(str(minimal), environ=environ)


# ------------------------------------------------------------------ volumes


def test_scratch_is_node_local_per_pod_and_shm_is_memory():
    job = child_job()
    pod = single.pod_spec(job)
    container = single.train_container(job)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    nproc = int(pod_env()["SFT_DISTRIBUTED__NPROC_PER_NODE"])

    assert all("persistentVolumeClaim" not in v for v in pod["volumes"]), "no shared PVC: each node has its own"
    scratch = volumes[mounts[pod_env()["SFT_RUN__SCRATCH"]]["name"]]
    assert set(scratch) == {"name", "emptyDir"}, "scratch is an emptyDir: created with the pod, on its node"
    assert scratch["emptyDir"].get("medium", "") == "", "scratch on the node's disk, not in RAM"
    scratch_gib = single.quantity_gib(scratch["emptyDir"]["sizeLimit"])
    assert scratch_gib >= 250

    shm = volumes[mounts["/dev/shm"]["name"]]["emptyDir"]
    assert shm["medium"] == "Memory"
    assert (
        8 * nproc
        <= single.quantity_gib(shm["sizeLimit"])
        < single.quantity_gib(container["resources"]["limits"]["memory"])
    )

    tmp = volumes[mounts["/tmp"]["name"]]["emptyDir"]
    disk = scratch_gib + single.quantity_gib(tmp["sizeLimit"])
    assert single.quantity_gib(container["resources"]["requests"]["ephemeral-storage"]) >= disk, (
        "request the node-local disk the emptyDirs may fill, or the pod lands on a node without it"
    )
    assert mounts["/etc/sft-job"]["readOnly"] is True


# ------------------------------------------------------------------ failure policy


def test_child_pod_failure_policy_has_the_single_jobs_codes():
    fatal, preempted = fatal_and_preempted_codes(single_job())
    assert fatal and preempted
    single_rules = single_job()["spec"]["podFailurePolicy"]["rules"]
    (single_disruption,) = [r for r in single_rules if "onPodConditions" in r]
    rules = child_job()["spec"]["podFailurePolicy"]["rules"]
    assert [r["action"] for r in rules] == ["FailJob"] * 3, "every pod failure the single Job knows fails the group"
    disruption, preemption, fatal_rule = rules
    assert disruption["onPodConditions"] == single_disruption["onPodConditions"]
    assert preemption["onExitCodes"] == {"containerName": "train", "operator": "In", "values": preempted}
    assert fatal_rule["onExitCodes"] == {"containerName": "train", "operator": "In", "values": fatal}
    for code in RETRYABLE_EXIT_CODES:
        assert all(code not in r.get("onExitCodes", {}).get("values", []) for r in rules), f"{code} must be counted"


def test_fatal_exit_codes_fail_the_jobset_at_once():
    fatal, _ = fatal_and_preempted_codes(single_job())
    for code in fatal:
        assert outcome(code) == FAIL, code


def test_preemption_and_disruption_restart_without_counting():
    _, preempted = fatal_and_preempted_codes(single_job())
    for code in preempted:
        assert outcome(code) == RESTART_NOT_COUNTED, code
    # A disruption wins over the exit code, as in the single Job (the condition rule comes first).
    for code in [*preempted, *RETRYABLE_EXIT_CODES, 64]:
        assert outcome(code, disrupted=True) == RESTART_NOT_COUNTED, code


def test_other_failures_restart_the_group_counted():
    for code in [*RETRYABLE_EXIT_CODES, 2, 255]:
        assert outcome(code) == RESTART_COUNTED, code


def test_an_unrecognised_failure_message_is_counted_not_fatal():
    jobset = the_jobset()
    for message in ("", "Container train for pod a/b failed with exit code 64 matching FailJob rule #2"):
        assert jobset_action(jobset, "PodFailurePolicy", message) == RESTART_COUNTED, message


def test_failure_policy_rules_are_well_formed():
    failure_policy = the_jobset()["spec"]["failurePolicy"]
    rules = failure_policy["rules"]
    names = [r["name"] for r in rules]
    assert len(set(names)) == len(names) and all(JOBSET_RULE_NAME.fullmatch(n) for n in names), names
    for rule in rules:
        assert set(rule.get("onJobFailureReasons", [])) <= JOB_FAILURE_REASONS, rule
        for pattern in rule.get("onJobFailureMessagePatterns", []):
            re.compile(pattern)
            assert not re.search(r"\(\?[=!<]|\\[1-9]", pattern), f"RE2 has no lookaround or backreference: {pattern}"
    assert failure_policy["restartStrategy"] == "BlockingRecreate", "never two groups writing one run"
    assert failure_policy["maxRestarts"] == single_job()["spec"]["backoffLimit"], "the single Job's failure budget"
    (deadline,) = [r for r in rules if "DeadlineExceeded" in r.get("onJobFailureReasons", [])]
    assert deadline["action"] == FAIL


def test_success_ttl_and_deadline():
    jobset = the_jobset()
    spec = jobset["spec"]
    names = [r["name"] for r in spec["replicatedJobs"]]
    assert spec["successPolicy"]["operator"] == "All"
    assert sorted(spec["successPolicy"].get("targetReplicatedJobs") or names) == sorted(names)
    assert spec["ttlSecondsAfterFinished"] >= 3600, "keep the finished JobSet long enough to read its logs"
    assert child_job()["spec"]["activeDeadlineSeconds"] == single_job()["spec"]["activeDeadlineSeconds"]
    assert "startupPolicy" not in spec and "dependsOn" not in replicated_job(jobset), "c10d waits for the nodes"


# ------------------------------------------------------------------ same pod rules as the single Job


def test_security_context_is_the_single_jobs():
    pod, base_pod = single.pod_spec(child_job()), single.pod_spec(single_job())
    container, base_container = single.train_container(child_job()), single.train_container(single_job())
    assert pod["securityContext"] == base_pod["securityContext"]
    assert container["securityContext"] == base_container["securityContext"]
    _, image_user = single.dockerfile_env_and_user()
    assert pod["securityContext"]["runAsUser"] == int(image_user.split(":")[0]) > 0
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["automountServiceAccountToken"] is False
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(key, False)
    assert all("hostPath" not in v for v in pod["volumes"])


def test_scheduling_is_the_single_jobs_for_g_gpu_machines():
    job, base = child_job(), single_job()
    pod, base_pod = single.pod_spec(job), single.pod_spec(base)
    nproc = int(pod_env()["SFT_DISTRIBUTED__NPROC_PER_NODE"])
    terms = single.node_terms(job)
    # the same kinds of term as the single Job (GFD, GKE, Karpenter, EKS and AKS instance types) ...
    assert [{e["key"] for e in t} for t in terms] == [{e["key"] for e in t} for t in single.node_terms(base)]
    for term in terms:
        assert any(single._is_96gb_class(e) for e in term), f"term without a 96 GB-class rule: {term}"
        # ... each admitting only machines with exactly G GPUs (G = NPROC_PER_NODE)
        assert single.gpus_per_machine(term) == {nproc}, f"term for machines without {nproc} GPUs: {term}"
    assert pod["tolerations"] == base_pod["tolerations"]
    annotations = job["spec"]["template"]["metadata"]["annotations"]
    for key, value in base["spec"]["template"]["metadata"]["annotations"].items():
        assert annotations[key] == value, f"{key}: autoscalers must not consolidate a node under the run"


def test_grace_period_covers_the_jobs_grace_budget():
    env = pod_env()
    grace = float(env["SFT_CHECKPOINT__GRACE_SECONDS"])
    base_env = single.literal_env(single.train_container(single_job()))
    assert grace == float(base_env["SFT_CHECKPOINT__GRACE_SECONDS"])
    termination = single.pod_spec(child_job())["terminationGracePeriodSeconds"]
    assert termination >= grace + single.MIN_EXIT_MARGIN_S, "SIGKILL must come after the job's grace budget"
    assert termination == single.pod_spec(single_job())["terminationGracePeriodSeconds"]


def test_grace_period_covers_the_launchers_shutdown():
    launch = pytest.importorskip("job.dist.launch", reason="the job package holds the launcher's shutdown margin")
    config_mod = pytest.importorskip("job.config.load")
    env = {k: v for k, v in pod_env().items() if k.startswith("SFT_") and k != "SFT_CONFIG"}
    config = config_mod.load_config(None, environ={**env, "SFT_DATA__TRAIN": "s3://bucket/train.jsonl"})
    ranks_killed_after = config.checkpoint.grace_seconds + launch.SHUTDOWN_MARGIN_SECONDS
    termination = single.pod_spec(child_job())["terminationGracePeriodSeconds"]
    assert termination >= ranks_killed_after + single.MIN_EXIT_MARGIN_S, (
        "the launcher must reap its ranks and exit with their code before the kubelet's SIGKILL"
    )


def test_no_literal_secrets():
    container = single.train_container(child_job())
    for item in container.get("env", []):
        if single.SECRETISH.search(item["name"]):
            assert "value" not in item and "secretKeyRef" in item["valueFrom"], item
    assert container["envFrom"] == single.train_container(single_job())["envFrom"]
    assert not re.search(r"AKIA[0-9A-Z]{16}|hf_[A-Za-z0-9]{30,}", single._render_text(MULTINODE))


# ------------------------------------------------------------------ schema of the child Job, CI wiring


def test_child_job_template_passes_kubernetes_validate_strict(tmp_path):
    validate = shutil.which("kubernetes-validate")
    if validate is None:
        pytest.skip("kubernetes-validate is not installed (.ci/deploy-checks.sh installs and runs it)")
    docs = [d for d in render() if d["kind"] != "JobSet"] + child_jobs(the_jobset())
    good = tmp_path / "children.yaml"
    good.write_text(yaml.safe_dump_all(docs))
    ok = subprocess.run([validate, "--strict", "--quiet", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # ... and it rejects what it should: an unknown field in the child Job's spec.
    broken_docs = copy.deepcopy(docs)
    broken_docs[-1]["spec"]["podFailurePolicyy"] = broken_docs[-1]["spec"]["podFailurePolicy"]
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump_all(broken_docs))
    bad = subprocess.run([validate, "--strict", "--quiet", str(broken)], capture_output=True, text=True)
    assert bad.returncode != 0


def test_deploy_checks_render_and_validate_the_multinode_variant():
    script = DEPLOY_CHECKS.read_text()
    assert re.search(r"^MULTINODE=k8s/multinode$", script, re.M)
    assert re.search(r'^\s*check "[^"]*\$MULTINODE[^"]*" jobset_children_and_validate ', script, re.M)
