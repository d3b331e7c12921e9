"""The Kubernetes manifests, rendered by `kubectl kustomize` exactly as a user would, and
scripts/submit-run.sh (dry run, and a full submit/wait against a fake kubectl).

Every rule of the deployment contract is asserted on the rendered objects of every overlay:
failure policy order and codes, replacement policy, back-off sized to the lease, grace periods
below what each provider gives, GPU request and 96 GB-class single-GPU affinity with each cloud's
own labels, requests that fit the target machines (k8s/clouds.yaml) with the checkpoint staging's
host memory, shm, scratch on local NVMe, security context and the absence of literal secrets.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
SUBMIT = ROOT / "scripts" / "submit-run.sh"
KUBECTL = shutil.which("kubectl")

pytestmark = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl is not installed: cannot render the kustomize overlays"
)

OVERLAYS = [
    "base",
    "overlays/gke",
    "overlays/eks",
    "overlays/aks",
    "overlays/rtx-pro-6000",
    "overlays/spot-gke",
    "overlays/spot-eks",
    "overlays/spot-aks",
    "overlays/kueue",
]

# The design's lease: 60 s TTL, heartbeat every 20 s. Job pod-failure back-off: 10 s, doubling.
LEASE_TTL_S = 60
LEASE_HEARTBEAT_S = 20
JOB_BACKOFF_FIRST_S = 10

FATAL_EXIT_CODES = [64, 65, 66, 70, 71, 74, 77]
PREEMPTED_EXIT_CODE = 75
RETRYABLE_EXIT_CODES = [1, 69]

# What each provider really gives a pod after SIGTERM on a spot preemption (seconds).
PROVIDER_BUDGET_S = {"overlays/spot-gke": 15, "overlays/spot-eks": 120, "overlays/spot-aks": 30}
# Seconds between the end of the job's grace budget and SIGKILL: flush, release the lease, exit.
MIN_EXIT_MARGIN_S = 5

# GPU memory in MiB as nvidia-smi / GPU Feature Discovery report it.
RTX_PRO_6000_MIB = 97_887
H100_80GB_MIB = 81_559
GPU_MEMORY_KEYS = {"nvidia.com/gpu.memory", "karpenter.k8s.aws/instance-gpu-memory"}
GPU_COUNT_KEYS = {"nvidia.com/gpu.count", "karpenter.k8s.aws/instance-gpu-count"}
GKE_96GB_CLASS = {"nvidia-rtx-pro-6000"}  # GKE's H200/B200 come only as 8-GPU a3/a4 shapes
KARPENTER_96GB_CLASS = {"rtx-pro-server-6000"}
GFD_PREFIX = "nvidia.com/"

# The machines the overlays target (allocatable, staging need, labels): k8s/clouds.yaml.
CLOUDS = yaml.safe_load((K8S / "clouds.yaml").read_text())
CLOUD_OVERLAYS = CLOUDS["overlays"]
SHAPES = CLOUDS["shapes"]
INSTANCE_TYPE = "node.kubernetes.io/instance-type"


# ------------------------------------------------------------------ helpers


@functools.cache
def _render_text(path: str) -> str:
    proc = subprocess.run([KUBECTL, "kustomize", str(K8S / path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return proc.stdout


def render(path: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(_render_text(path)) if doc]


def the_job(docs: list[dict[str, Any]]) -> dict[str, Any]:
    jobs = [d for d in docs if d["kind"] == "Job"]
    assert len(jobs) == 1, f"expected exactly one Job, got {[j['metadata']['name'] for j in jobs]}"
    return jobs[0]


def pod_spec(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]


def train_container(job: dict[str, Any]) -> dict[str, Any]:
    containers = pod_spec(job)["containers"]
    assert [c["name"] for c in containers] == ["train"], "the pod runs exactly one container, `train`"
    return containers[0]


def literal_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def config_file(docs: list[dict[str, Any]], job: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(mount path of the config file, parsed config) for the ConfigMap the Job mounts."""
    container = train_container(job)
    config_path = literal_env(container)["SFT_CONFIG"]
    volumes = {v["name"]: v for v in pod_spec(job)["volumes"]}
    for mount in container["volumeMounts"]:
        if config_path.startswith(mount["mountPath"].rstrip("/") + "/"):
            cm_name = volumes[mount["name"]]["configMap"]["name"]
            key = config_path[len(mount["mountPath"].rstrip("/")) + 1 :]
            (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == cm_name]
            return config_path, yaml.safe_load(cm["data"][key])
    raise AssertionError(f"SFT_CONFIG={config_path} is not under any volume mount")


def quantity_gib(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|K|M|G|T)?", str(text))
    assert match, f"unparsed quantity {text!r}"
    factor = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    return float(match.group(1)) * factor[match.group(2)] / 2**30


def dockerfile_env_and_user() -> tuple[dict[str, str], str]:
    """ENV and USER of the Dockerfile's final stage (enough parsing for cross-checks)."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    final = text.split("\nFROM ")[-1]
    env: dict[str, str] = {}
    user = ""
    for line in final.splitlines():
        line = line.strip()
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line[4:]))
        elif line.startswith("USER "):
            user = line[5:].strip()
    return env, user


@pytest.fixture(params=OVERLAYS)
def overlay(request) -> str:
    return request.param


# ------------------------------------------------------------------ structure


def test_every_overlay_is_tested():
    on_disk = {f"overlays/{p.name}" for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file()}
    assert on_disk == set(OVERLAYS) - {"base"}, "a new overlay must be added to OVERLAYS (and to deploy-checks)"


def test_renders_one_job_its_configmap_and_no_secret(overlay):
    docs = render(overlay)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "Job", "ServiceAccount"], kinds
    job = the_job(docs)
    assert job["apiVersion"] == "batch/v1"
    assert pod_spec(job)["serviceAccountName"] in {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    _, config = config_file(docs, job)
    assert config["model"]["source"] and config["data"]["train"]


def test_pod_never_restarts_in_place_and_keeps_tini(overlay):
    job = the_job(render(overlay))
    assert pod_spec(job)["restartPolicy"] == "Never"
    container = train_container(job)
    assert "command" not in container, "a `command` would replace the image's tini ENTRYPOINT"
    assert container["args"][0] == "train"


def test_pod_failure_policy_rules_in_order(overlay):
    job = the_job(render(overlay))
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert len(rules) == 3
    disruption, preempted, fatal = rules
    assert disruption["action"] == "Ignore"
    assert disruption["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    assert preempted["action"] == "Ignore"
    assert preempted["onExitCodes"] == {"containerName": "train", "operator": "In", "values": [PREEMPTED_EXIT_CODE]}
    assert fatal["action"] == "FailJob"
    assert fatal["onExitCodes"]["containerName"] == "train"
    assert fatal["onExitCodes"]["operator"] == "In"
    values = fatal["onExitCodes"]["values"]
    assert values == FATAL_EXIT_CODES, (
        "FailJob exactly on config, data, not found, training, driver, scratch full, access denied"
    )
    assert values == sorted(set(values)), "the API wants exit codes ascending and unique"
    for code in RETRYABLE_EXIT_CODES:
        assert all(code not in r.get("onExitCodes", {}).get("values", []) for r in rules), f"{code} must be counted"


def test_fatal_exit_codes_are_the_jobs():
    errors = pytest.importorskip("job.errors", reason="the job package defines the exit codes")
    assert list(errors.FATAL_EXIT_CODES) == FATAL_EXIT_CODES
    assert errors.DriverIncompatible.exit_code == 71 and not errors.DriverIncompatible.retryable


def test_exit_code_lists_in_comments_and_readme_name_71():
    assert "values: [64, 65, 66, 70, 71, 74, 77]" in (K8S / "base" / "job.yaml").read_text()
    assert "values: [64, 65, 66, 70, 71, 74, 77]" in (K8S / "multinode" / "jobset.yaml").read_text()
    readme = (K8S / "README.md").read_text()
    assert "FailJob on 64, 65, 66, 70, 71, 74, 77" in readme
    assert "exits 64, 65, 66, 70, 71, 74, 77" in readme
    assert not re.search(r"\b70, 74\b", readme), "an exit code list without 71"


def worst_case_counts_per_crash(ttl_s: int = LEASE_TTL_S, first_backoff_s: int = JOB_BACKOFF_FIRST_S) -> int:
    """Counted failures one hard crash can cost: the crash itself, plus each replacement that
    starts while the dead pod's lease is still live (assuming such a replacement exits non-zero)."""
    counts, elapsed, delay = 1, 0, first_backoff_s
    while True:
        elapsed += delay
        if elapsed >= ttl_s:
            return counts
        counts += 1
        delay *= 2


def test_worst_case_counts_per_crash_model():
    assert worst_case_counts_per_crash(60, 10) == 3  # replacements at 10 s and 30 s refused, 70 s proceeds
    assert worst_case_counts_per_crash(5, 10) == 1
    assert LEASE_HEARTBEAT_S * 3 == LEASE_TTL_S  # the design's ratio: two missed heartbeats still hold


def test_lease_assumption_matches_the_job(overlay):
    config_mod = pytest.importorskip("job.config.schema", reason="the job package holds the lease TTL default")
    assert config_mod.RunConfig().lease_ttl_seconds == LEASE_TTL_S, "re-derive backoffLimit for the new TTL"
    docs = render(overlay)
    _, config = config_file(docs, the_job(docs))
    env = literal_env(train_container(the_job(docs)))
    assert "lease_ttl_seconds" not in config.get("run", {}) and "SFT_RUN__LEASE_TTL_SECONDS" not in env


def test_replacement_backoff_and_deadlines(overlay):
    spec = the_job(render(overlay))["spec"]
    assert spec["podReplacementPolicy"] == "Failed", "a replacement must never overlap its predecessor"
    per_crash = worst_case_counts_per_crash()
    assert spec["backoffLimit"] >= 2 * per_crash, "two hard crashes (each leaving a live lease) must be survivable"
    assert spec["backoffLimit"] <= 4 * per_crash, "a crash loop must fail the Job, not burn the deadline"
    assert 3600 <= spec["activeDeadlineSeconds"] <= 7 * 86400
    assert spec["ttlSecondsAfterFinished"] >= 3600, "keep the finished Job long enough to read its logs"


def test_grace_period_matches_checkpoint_grace(overlay):
    docs = render(overlay)
    job = the_job(docs)
    env = literal_env(train_container(job))
    _, config = config_file(docs, job)
    # Environment beats the file: the platform's value is the one the job uses.
    grace = float(env.get("SFT_CHECKPOINT__GRACE_SECONDS", config["checkpoint"]["grace_seconds"]))
    termination = pod_spec(job)["terminationGracePeriodSeconds"]
    assert grace > 0
    assert termination >= grace + MIN_EXIT_MARGIN_S, "SIGKILL must come after the job's grace budget plus exit time"
    if overlay in PROVIDER_BUDGET_S:
        budget = PROVIDER_BUDGET_S[overlay]
        assert termination <= budget, f"{overlay}: the provider gives {budget}s; more is a promise nobody keeps"
        assert grace + MIN_EXIT_MARGIN_S <= budget
    every = float(env.get("SFT_CHECKPOINT__EVERY_MINUTES", config["checkpoint"]["every_minutes"]))
    assert every <= 8, "a preemption without warning must lose at most ~10 min of work (8 + write and upload)"


# ------------------------------------------------------------------ scheduling


def test_one_gpu_cpu_and_memory(overlay):
    resources = train_container(the_job(render(overlay)))["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert int(resources["requests"].get("nvidia.com/gpu", 1)) == 1
    assert float(resources["requests"]["cpu"]) >= 4
    request = quantity_gib(resources["requests"]["memory"])
    limit = quantity_gib(resources["limits"]["memory"])
    assert 32 <= request <= limit


def _is_96gb_class(expr: dict[str, Any]) -> bool:
    if expr["key"] in GPU_MEMORY_KEYS and expr["operator"] == "Gt":
        (value,) = expr["values"]
        return H100_80GB_MIB <= int(value) < RTX_PRO_6000_MIB
    if expr["key"] == "cloud.google.com/gke-accelerator" and expr["operator"] == "In":
        return set(expr["values"]) <= GKE_96GB_CLASS
    if expr["key"] == "karpenter.k8s.aws/instance-gpu-name" and expr["operator"] == "In":
        return set(expr["values"]) <= KARPENTER_96GB_CLASS
    if expr["key"] == INSTANCE_TYPE and expr["operator"] == "In":
        return set(expr["values"]) <= set(SHAPES) | set(CLOUDS["multi_gpu_shapes"])
    return False


def gpus_per_machine(term: list[dict[str, Any]]) -> set[int]:
    """The GPU counts a node term admits, from its count labels and its instance types (empty: unbounded)."""
    counts: list[set[int]] = []
    for expr in term:
        if expr["key"] in GPU_COUNT_KEYS and expr["operator"] == "In":
            counts.append({int(v) for v in expr["values"]})
        if expr["key"] == INSTANCE_TYPE and expr["operator"] == "In":
            table = {name: shape["gpus"] for name, shape in SHAPES.items()} | CLOUDS["multi_gpu_shapes"]
            counts.append({table[v] for v in expr["values"]})
    return set.intersection(*counts) if counts else set()


def node_terms(job: dict[str, Any]) -> list[list[dict[str, Any]]]:
    required = pod_spec(job)["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    return [term["matchExpressions"] for term in required["nodeSelectorTerms"]]


def test_every_node_term_asks_for_one_96gb_class_gpu_on_a_single_gpu_machine(overlay):
    terms = node_terms(the_job(render(overlay)))
    assert terms
    for term in terms:
        assert any(_is_96gb_class(e) for e in term), f"term without a 96 GB-class rule: {term}"
        assert gpus_per_machine(term) == {1}, f"term that admits multi-GPU machines (p5en, a3...): {term}"
    gfd = [e for term in terms for e in term if e["key"] == "nvidia.com/gpu.memory"]
    assert all(e == {"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["90000"]} for e in gfd)


def test_is_96gb_class_and_gpu_count_reject_what_they_should():
    assert not _is_96gb_class({"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["80000"]})
    assert not _is_96gb_class({"key": "cloud.google.com/gke-accelerator", "operator": "In", "values": ["nvidia-l4"]})
    assert not _is_96gb_class({"key": INSTANCE_TYPE, "operator": "In", "values": ["p5en.48xlarge"]})
    eight = [{"key": "karpenter.k8s.aws/instance-gpu-count", "operator": "In", "values": ["1", "8"]}]
    assert gpus_per_machine(eight) == {1, 8}
    assert gpus_per_machine([{"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["90000"]}]) == set()


def test_base_accepts_gfd_or_each_clouds_labels():
    terms = node_terms(the_job(render("base")))
    keys = [{e["key"] for e in term} for term in terms]
    assert any(k <= {"nvidia.com/gpu.memory", "nvidia.com/gpu.count"} for k in keys), "a GFD term"
    for cloud in ("gke", "eks", "aks"):
        own = set(CLOUDS["cloud_labels"][cloud])
        assert any(k <= own and not any(x.startswith(GFD_PREFIX) for x in k) for k in keys), f"no {cloud} term"


@pytest.mark.parametrize("overlay", sorted(CLOUD_OVERLAYS))
def test_cloud_overlays_select_with_their_own_labels_only(overlay):
    cloud = CLOUD_OVERLAYS[overlay]["cloud"]
    pod = pod_spec(the_job(render(overlay)))
    own = set(CLOUDS["cloud_labels"][cloud])
    for term in node_terms(the_job(render(overlay))):
        keys = {e["key"] for e in term}
        assert not any(k.startswith(GFD_PREFIX) for k in keys), f"{overlay}: needs a GPU Feature Discovery label"
        assert keys <= own, f"{overlay}: labels {keys - own} are not {cloud}'s"
        for expr in term:
            if expr["key"] == INSTANCE_TYPE:
                assert set(expr["values"]) <= set(CLOUD_OVERLAYS[overlay]["shapes"]), "shape not in k8s/clouds.yaml"
                assert all(SHAPES[v]["cloud"] == cloud for v in expr["values"])
    assert set(pod.get("nodeSelector", {})) <= own


def _cpu(text: str) -> float:
    return float(text[:-1]) / 1000 if str(text).endswith("m") else float(text)


def _fits(resources: dict[str, Any], shape: dict[str, Any]) -> bool:
    headroom = CLOUDS["daemonset_headroom"]
    alloc = shape["allocatable"]
    requests = resources["requests"]
    return (
        _cpu(requests["cpu"]) + headroom["cpu"] <= _cpu(alloc["cpu"])
        and quantity_gib(requests["memory"]) + headroom["memory_gib"] <= quantity_gib(alloc["memory"])
        and int(requests.get("nvidia.com/gpu", 1)) <= shape["gpus"]
    )


@pytest.mark.parametrize("overlay", sorted(CLOUD_OVERLAYS))
def test_requests_fit_every_shape_the_overlay_targets(overlay):
    resources = train_container(the_job(render(overlay)))["resources"]
    for name in CLOUD_OVERLAYS[overlay]["shapes"]:
        assert _fits(resources, SHAPES[name]), f"{overlay}: requests do not fit {name}'s allocatable"


def test_shapes_too_small_for_the_staging_are_not_targeted_and_do_not_fit(overlay):
    resources = train_container(the_job(render(overlay)))["resources"]
    targeted = {
        v
        for term in node_terms(the_job(render(overlay)))
        for e in term
        if e["key"] == INSTANCE_TYPE
        for v in e["values"]
    }
    for name, shape in SHAPES.items():
        if "too_small" in shape:
            assert name not in targeted
            assert not _fits(resources, shape), f"{name} would be chosen (by Karpenter, say) and stage in chunks"
        elif overlay in ("base", "overlays/rtx-pro-6000", "overlays/kueue"):
            assert _fits(resources, shape), f"{overlay}: requests do not fit {name}"


def test_memory_holds_the_checkpoint_staging(overlay):
    staging = CLOUDS["staging"]
    job = the_job(render(overlay))
    limit = quantity_gib(train_container(job)["resources"]["limits"]["memory"])
    volumes = {v["name"]: v for v in pod_spec(job)["volumes"]}
    shm = quantity_gib(volumes["dshm"]["emptyDir"]["sizeLimit"])
    assert shm == staging["shm_gib"]
    assert limit >= staging["state_gib"] + staging["reserve_gib"] + shm


def test_staging_figures_are_the_planners():
    memory = pytest.importorskip("job.plan.memory", reason="the planner holds the staging rule")
    staging_mod = pytest.importorskip("job.durability.staging")
    staging = CLOUDS["staging"]
    limit = quantity_gib(train_container(the_job(render("base")))["resources"]["limits"]["memory"])
    plan = memory.make_plan(
        memory.MISTRAL_7B_V03,
        optimizer="adamw_kahan",
        gpu_memory_bytes=RTX_PRO_6000_MIB << 20,
        gpu_name="NVIDIA H200",
        host_memory_bytes=int((limit - staging["shm_gib"]) * 2**30),
    )["checkpoint"]
    assert round(plan["state_bytes"] / 2**30, 1) == staging["state_gib"]
    assert staging["reserve_gib"] * 2**30 == staging_mod.DEFAULT_RESERVE_BYTES
    # the pod's limit with a full /dev/shm still stages the whole state; the too-small g7e.2xlarge does not
    assert plan["staging"]["mode"] == "full"
    small = quantity_gib(SHAPES["g7e.2xlarge"]["allocatable"]["memory"])
    assert memory.checkpoint_staging(plan["state_bytes"], int(small * 2**30))["staging"]["mode"] == "chunked"


def test_tolerates_the_gpu_taint(overlay):
    tolerations = pod_spec(the_job(render(overlay))).get("tolerations", [])
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


def test_rtx_pro_6000_overlay_selects_the_product():
    terms = node_terms(the_job(render("overlays/rtx-pro-6000")))
    for term in terms:
        (product,) = [e for e in term if e["key"] == "nvidia.com/gpu.product"]
        assert product["operator"] == "In" and product["values"]
        assert all("RTX-PRO-6000" in v and " " not in v for v in product["values"])


def test_spot_overlays_select_spot_nodes_and_tolerate_their_taints():
    gke = pod_spec(the_job(render("overlays/spot-gke")))
    assert gke["nodeSelector"] == {"cloud.google.com/gke-spot": "true"}
    assert {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"} in gke[
        "tolerations"
    ]
    aks = pod_spec(the_job(render("overlays/spot-aks")))
    assert aks["nodeSelector"] == {"kubernetes.azure.com/scalesetpriority": "spot"}
    assert {
        "key": "kubernetes.azure.com/scalesetpriority",
        "operator": "Equal",
        "value": "spot",
        "effect": "NoSchedule",
    } in aks["tolerations"]
    spot_rules = [
        {"key": "karpenter.sh/capacity-type", "operator": "In", "values": ["spot"]},
        {"key": "eks.amazonaws.com/capacityType", "operator": "In", "values": ["SPOT"]},
    ]
    for term in node_terms(the_job(render("overlays/spot-eks"))):
        assert any(rule in term for rule in spot_rules), f"EKS term that could land on on-demand: {term}"
    for spot, on_demand in (("overlays/spot-gke", "overlays/gke"), ("overlays/spot-aks", "overlays/aks")):
        assert node_terms(the_job(render(spot))) == node_terms(the_job(render(on_demand))), "same machines, spot"


def test_on_demand_eks_stays_off_spot():
    on_demand = [
        {"key": "karpenter.sh/capacity-type", "operator": "In", "values": ["on-demand"]},
        {"key": "eks.amazonaws.com/capacityType", "operator": "In", "values": ["ON_DEMAND"]},
    ]
    for term in node_terms(the_job(render("overlays/eks"))):
        assert any(rule in term for rule in on_demand), f"EKS term that could land on spot: {term}"


def test_gke_prefers_nodes_with_local_ssd_ephemeral_storage_without_requiring_them():
    local_ssd = {"key": "cloud.google.com/gke-ephemeral-storage-local-ssd", "operator": "In", "values": ["true"]}
    for overlay in ("overlays/gke", "overlays/spot-gke"):
        job = the_job(render(overlay))
        (term,) = node_terms(job)
        assert local_ssd not in term  # a pool without the label must still schedule, not stay Pending
        preferred = job["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
            "preferredDuringSchedulingIgnoredDuringExecution"
        ]
        assert [p["preference"]["matchExpressions"] for p in preferred] == [[local_ssd]]


@pytest.mark.parametrize(
    "overlay", ["base", "overlays/gke", "overlays/eks", "overlays/aks", "overlays/rtx-pro-6000", "overlays/kueue"]
)
def test_non_spot_overlays_do_not_ask_for_spot(overlay):
    job_text = yaml.safe_dump(the_job(render(overlay))).lower()
    assert "spot" not in job_text


def test_kueue_overlay_is_queued_and_suspended(overlay):
    job = the_job(render(overlay))
    labels = job["metadata"].get("labels", {})
    if overlay == "overlays/kueue":
        assert labels["kueue.x-k8s.io/queue-name"]
        assert job["spec"]["suspend"] is True
    else:
        assert "kueue.x-k8s.io/queue-name" not in labels
        assert not job["spec"].get("suspend", False), "without Kueue nothing would ever un-suspend it"


# ------------------------------------------------------------------ volumes and security


def test_shm_scratch_tmp_and_config_mounts(overlay):
    docs = render(overlay)
    job = the_job(docs)
    container = train_container(job)
    volumes = {v["name"]: v for v in pod_spec(job)["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}

    shm = volumes[mounts["/dev/shm"]["name"]]["emptyDir"]
    assert shm["medium"] == "Memory"
    assert 8 <= quantity_gib(shm["sizeLimit"]) < quantity_gib(container["resources"]["limits"]["memory"])

    env = literal_env(container)
    scratch_path = env["SFT_RUN__SCRATCH"]
    scratch = volumes[mounts[scratch_path]["name"]]
    tmp = volumes[mounts["/tmp"]["name"]]["emptyDir"]
    requests = container["resources"]["requests"]
    if overlay in CLOUD_OVERLAYS:  # local NVMe: the node's ephemeral storage, requested so the pod lands on room
        assert set(scratch) == {"name", "emptyDir"}, "a cloud overlay's scratch is an emptyDir on local disk"
        assert "medium" not in scratch["emptyDir"]
        size = quantity_gib(scratch["emptyDir"]["sizeLimit"])
        assert size >= 250
        assert quantity_gib(requests["ephemeral-storage"]) >= size + quantity_gib(tmp["sizeLimit"])
    else:  # the fallback: a generic ephemeral PVC of the default StorageClass
        claim = scratch["ephemeral"]["volumeClaimTemplate"]["spec"]
        assert quantity_gib(claim["resources"]["requests"]["storage"]) >= 250
        assert claim["accessModes"] == ["ReadWriteOnce"]
    assert not mounts[scratch_path].get("readOnly", False)

    config_path, _ = config_file(docs, job)
    (config_mount,) = [m for p, m in mounts.items() if config_path.startswith(p + "/")]
    assert config_mount["readOnly"] is True


def test_image_writes_only_under_the_mounted_scratch(overlay):
    image_env, _ = dockerfile_env_and_user()
    env = literal_env(train_container(the_job(render(overlay))))
    assert image_env["SFT_RUN__SCRATCH"] == env["SFT_RUN__SCRATCH"]
    for name in ("HF_HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR", "HOME"):
        assert image_env[name].startswith(env["SFT_RUN__SCRATCH"] + "/"), name


def test_restricted_security_context(overlay):
    job = the_job(render(overlay))
    pod = pod_spec(job)
    container = train_container(job)
    _, image_user = dockerfile_env_and_user()
    image_uid = int(image_user.split(":")[0])
    for ctx in (pod["securityContext"], container["securityContext"]):
        assert ctx["runAsNonRoot"] is True
        assert ctx["runAsUser"] == image_uid > 0
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    csc = container["securityContext"]
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["capabilities"] == {"drop": ["ALL"]}
    assert not csc.get("privileged", False)
    assert pod["securityContext"]["fsGroup"] == image_uid
    assert pod["automountServiceAccountToken"] is False
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(key, False)
    assert all("hostPath" not in v for v in pod["volumes"])


SECRETISH = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL|SESSION)", re.IGNORECASE)


def test_no_literal_secrets(overlay):
    docs = render(overlay)
    assert not [d for d in docs if d["kind"] == "Secret"], "Secrets are created out of band, never rendered"
    container = train_container(the_job(docs))
    for item in container.get("env", []):
        if SECRETISH.search(item["name"]):
            assert "value" not in item, f"{item['name']} has a literal value"
            assert "secretKeyRef" in item["valueFrom"], item
    hf = [e for e in container["env"] if e["name"] == "HF_TOKEN"]
    assert hf and hf[0]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert {"secretRef": {"name": "sft-job-s3", "optional": True}} in container["envFrom"]
    assert {"secretRef": {"name": "sft-job-trackers", "optional": True}} in container["envFrom"]  # W&B, MLflow keys
    text = _render_text(overlay)
    assert not re.search(r"AKIA[0-9A-Z]{16}|hf_[A-Za-z0-9]{30,}|aws_secret_access_key", text, re.IGNORECASE)


def test_image_is_pinned(overlay):
    image = train_container(the_job(render(overlay)))["image"]
    assert "@sha256:" in image or re.search(r":[\w.-]+$", image.split("/")[-1]), image
    assert not image.endswith(":latest")


def test_shipped_config_validates_with_the_job_loader(overlay, tmp_path):
    config_mod = pytest.importorskip("job.config.load", reason="the job package is needed to load the config")
    docs = render(overlay)
    job = the_job(docs)
    env = literal_env(train_container(job))
    _, config = config_file(docs, job)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    environ = {k: v for k, v in env.items() if k != "SFT_CONFIG"}
    loaded = config_mod.load_config(str(path), environ=environ)
    assert loaded.run.scratch == env["SFT_RUN__SCRATCH"]
    assert loaded.checkpoint.grace_seconds == float(env["SFT_CHECKPOINT__GRACE_SECONDS"])
    assert loaded.run.output.startswith("s3://")


def test_kubernetes_validate_strict(overlay, tmp_path):
    validate = shutil.which("kubernetes-validate")
    if validate is None:
        pytest.skip("kubernetes-validate is not installed (.ci/deploy-checks.sh installs and runs it)")
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(_render_text(overlay))
    ok = subprocess.run([validate, "--strict", "--quiet", str(rendered)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # ... and the check does reject what it should: an unknown field in the Job spec.
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        _render_text(overlay).replace("podReplacementPolicy: Failed", "podReplacementPolicy: Failed\n  x: 1")
    )
    bad = subprocess.run([validate, "--strict", "--quiet", str(broken)], capture_output=True, text=True)
    assert bad.returncode != 0


# ------------------------------------------------------------------ scripts/submit-run.sh

CONFIG = K8S / "base" / "config" / "job.yaml"


def submit(*args: str, env: dict[str, str] | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SUBMIT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


def test_submit_dry_run_renders_a_unique_run(tmp_path):
    config = tmp_path / "Support Bot v1.yaml"
    config.write_text(CONFIG.read_text())
    args = ["--config", str(config), "--overlay", str(K8S / "overlays/spot-gke"), "--dry-run"]
    extra = ["--image", "registry.example/sft-job@sha256:" + "0" * 64, "--set", "train.learning_rate=1e-5"]
    first, second = submit(*args, *extra), submit(*args)
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    docs = [d for d in yaml.safe_load_all(first.stdout) if d]
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Job"], "no ServiceAccount: CI only creates the run"
    job = the_job(docs)
    name = job["metadata"]["name"]
    assert re.fullmatch(r"support-bot-v1-\d{8}-\d{6}-[0-9a-f]{6}", name), name
    assert name != the_job([d for d in yaml.safe_load_all(second.stdout) if d])["metadata"]["name"]
    container = train_container(job)
    env = literal_env(container)
    assert env["SFT_RUN__NAME"] == name
    assert env["SFT_TRAIN__LEARNING_RATE"] == "1e-5"
    assert env["SFT_CHECKPOINT__GRACE_SECONDS"] == "10", "the overlay's settings survive"
    assert container["image"].startswith("registry.example/sft-job@sha256:")
    _, loaded = config_file(docs, job)
    assert loaded == yaml.safe_load(CONFIG.read_text())
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert cm["metadata"]["labels"]["sft-job/run"] == name
    assert job["spec"]["podFailurePolicy"] == the_job(render("overlays/spot-gke"))["spec"]["podFailurePolicy"]
    assert f"s3://my-bucket/runs/{name}/final/" in first.stderr


def test_submit_rejects_bad_input(tmp_path):
    assert submit("--overlay", str(K8S / "base"), "--dry-run").returncode == 2
    assert submit("--config", str(tmp_path / "missing.yaml"), "--dry-run").returncode == 2
    bad_name = submit("--config", str(CONFIG), "--name", "Not_A_Label", "--dry-run")
    assert bad_name.returncode == 2 and "DNS-1123" in bad_name.stderr
    bad_set = submit("--config", str(CONFIG), "--set", "learning_rate", "--dry-run")
    assert bad_set.returncode == 2


FAKE_KUBECTL = r'''#!/usr/bin/env python3
"""A kubectl stand-in: `kustomize` runs the real one; the rest plays a scripted Job."""
import json, os, subprocess, sys

state_path = os.environ["FAKE_KUBECTL_STATE"]
with open(state_path) as f:
    state = json.load(f)
args = sys.argv[1:]
state["calls"].append(args)
if args and args[0] == "-n":
    args = args[2:]

def save():
    with open(state_path, "w") as f:
        json.dump(state, f)

def step(seq):  # consume one element per call, then repeat the last one
    return seq.pop(0) if len(seq) > 1 else seq[0]

out, code = "", 0
if args[0] == "kustomize":
    save()
    os.execv(os.environ["REAL_KUBECTL"], [os.environ["REAL_KUBECTL"], *args])
elif args[0] == "create":
    with open(args[args.index("-f") + 1]) as f:
        state["created"] = f.read()
    out = "configmap/x created\njob.batch/x created\n"
elif args[0] == "patch":
    state["patched"] = args
elif args[:2] == ["get", "job"]:
    query = args[-1]
    if "metadata.uid" in query:
        out = "uid-1234"
    elif 'type=="Failed"' in query and "reason" in query:
        out = state["failed_reason"]
    elif 'type=="Failed"' in query:
        out = "scripted failure"
    else:
        out = step(state["job_states"])
elif args[:2] == ["get", "configmap"]:
    out = "sft-job-config-abc"
elif args[:2] == ["get", "pods"]:
    if "exitCode" in args[-1]:
        out = "".join(f"{p['exit']}\n" for p in state["pods"][: state["visible"]])
    else:
        state["visible"] = min(state["visible"] + 1, len(state["pods"]))
        out = "".join(p["name"] + "\n" for p in state["pods"][: state["visible"]])
elif args[:2] == ["get", "pod"]:
    pod = next(p for p in state["pods"] if p["name"] == args[2])
    out = step(pod["phases"])
elif args[0] == "logs":
    pod = next(p for p in state["pods"] if "pod/" + p["name"] in args)
    out = "".join(line + "\n" for line in pod["logs"])
else:
    out, code = f"fake kubectl: unexpected {args}\n", 1
save()
sys.stdout.write(out)
sys.exit(code)
'''


@pytest.fixture
def fake_kubectl(tmp_path):
    path = tmp_path / "kubectl"
    path.write_text(FAKE_KUBECTL.replace("#!/usr/bin/env python3", f"#!{sys.executable}", 1))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    state_path = tmp_path / "state.json"

    def run(pods: list[dict[str, Any]], job_states: list[str], failed_reason: str = "", *extra: str):
        state = {"calls": [], "pods": pods, "job_states": job_states, "failed_reason": failed_reason, "visible": 0}
        state_path.write_text(json.dumps(state))
        env = {"KUBECTL": str(path), "REAL_KUBECTL": KUBECTL, "FAKE_KUBECTL_STATE": str(state_path)}
        env["SFT_POLL_SECONDS"] = "0"
        proc = submit("--config", str(CONFIG), "--namespace", "ml", *extra, env=env)
        return proc, json.loads(state_path.read_text())

    return run


def test_submit_waits_streams_every_pod_and_succeeds(fake_kubectl):
    pods = [
        {"name": "p1", "phases": ["Pending", "Running", "Failed"], "logs": ["step 10", "preempted"], "exit": 75},
        {
            "name": "p2",
            "phases": ["Running", "Succeeded"],
            "logs": ["resumed from checkpoint-000500", "done"],
            "exit": 0,
        },
    ]
    proc, state = fake_kubectl(pods, ["", "", "", "Complete"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.index("step 10") < proc.stdout.index("preempted") < proc.stdout.index("resumed from")
    name = re.search(r"^run-name=(\S+)$", proc.stdout, re.M).group(1)
    assert f"final-output=s3://my-bucket/runs/{name}/final/" in proc.stdout
    created = [d for d in yaml.safe_load_all(state["created"]) if d]
    assert the_job(created)["metadata"]["name"] == name
    patch = json.loads(state["patched"][-1])
    assert patch["metadata"]["ownerReferences"][0] == {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "name": name,
        "uid": "uid-1234",
    }
    assert all(call[:2] == ["-n", "ml"] for call in state["calls"] if call[0] != "kustomize")
    assert state["calls"][1][:4] == ["-n", "ml", "create", "-f"], "create (never apply) right after rendering"


@pytest.mark.parametrize(("exit_code", "expected"), [(65, 65), (77, 77), (137, 1)])
def test_submit_fails_with_the_jobs_exit_code(fake_kubectl, exit_code, expected):
    pods = [{"name": "p1", "phases": ["Running", "Failed"], "logs": ["bad record at train.jsonl:7"], "exit": exit_code}]
    proc, _ = fake_kubectl(pods, ["", "Failed"], "PodFailurePolicy")
    assert proc.returncode == expected, proc.stderr
    assert "bad record at train.jsonl:7" in proc.stdout
    assert "failed: PodFailurePolicy" in proc.stderr


def test_submit_no_wait_returns_after_creating(fake_kubectl):
    proc, state = fake_kubectl([], [""], "", "--no-wait")
    assert proc.returncode == 0, proc.stderr
    assert state["created"]
    assert not [c for c in state["calls"] if "logs" in c]


# ------------------------------------------------------------------ k8s/clusters, k8s/clouds.yaml


def test_karpenter_example_puts_kubelet_storage_on_the_instance_store():
    folder = K8S / "clusters" / "eks-karpenter"
    docs = [d for path in sorted(folder.glob("*.yaml")) for d in yaml.safe_load_all(path.read_text()) if d]
    (node_class,) = [d for d in docs if d["kind"] == "EC2NodeClass"]
    (pool,) = [d for d in docs if d["kind"] == "NodePool"]
    assert node_class["apiVersion"] == "karpenter.k8s.aws/v1" and pool["apiVersion"] == "karpenter.sh/v1"
    assert node_class["spec"]["instanceStorePolicy"] == "RAID0"
    assert [t["alias"].split("@")[0] for t in node_class["spec"]["amiSelectorTerms"]] == ["al2023"]
    template = pool["spec"]["template"]["spec"]
    assert template["nodeClassRef"] == {
        "group": "karpenter.k8s.aws",
        "kind": "EC2NodeClass",
        "name": node_class["metadata"]["name"],
    }
    requirements = {r["key"]: r for r in template["requirements"]}
    assert requirements["karpenter.k8s.aws/instance-gpu-count"]["values"] == ["1"]
    assert requirements["karpenter.k8s.aws/instance-family"]["values"] == ["g7e"]
    assert {"on-demand", "spot"} == set(requirements["karpenter.sh/capacity-type"]["values"])
    assert {"key": "nvidia.com/gpu", "effect": "NoSchedule"} in template["taints"]
    assert pool["spec"]["disruption"]["consolidationPolicy"] == "WhenEmpty", "never consolidate a running node"
    # every size the pool may launch is in clouds.yaml, and the smallest one the requests fit is what it picks
    eks_shapes = {n for n, s in SHAPES.items() if s["cloud"] == "eks"}
    assert all(n.startswith("g7e.") for n in eks_shapes)
    resources = train_container(the_job(render("overlays/eks")))["resources"]
    fitting = sorted((s["vcpu"], n) for n, s in SHAPES.items() if s["cloud"] == "eks" and _fits(resources, s))
    assert fitting[0][1] == "g7e.4xlarge"


def test_clouds_table_is_consistent_and_in_the_readme():
    readme = (K8S / "README.md").read_text()
    assert set(CLOUD_OVERLAYS) <= set(OVERLAYS)
    for name, shape in SHAPES.items():
        assert shape["allocatable"]["source"] in {"observed", "computed"}
        assert _cpu(shape["allocatable"]["cpu"]) < shape["vcpu"]
        assert quantity_gib(shape["allocatable"]["memory"]) < shape["memory_gib"]
        assert name in readme, f"{name} missing from k8s/README.md's table"
    for overlay, entry in CLOUD_OVERLAYS.items():
        assert entry["shapes"] and all(SHAPES[s]["cloud"] == entry["cloud"] for s in entry["shapes"])
        assert f"`{overlay.split('/')[-1]}`" in readme
