#!/usr/bin/env bash
# Submit one uniquely named SFT run to Kubernetes (a ConfigMap with the config file + a Job from
# a kustomize overlay), wait for it, stream its logs, and exit with the run's result.
#
#   scripts/submit-run.sh --config job.yaml [--overlay k8s/overlays/spot-gke] \
#       [--image ghcr.io/org/sft-job@sha256:...] [--namespace ml] [--output s3://bucket/runs] \
#       [--set train.learning_rate=1e-5 ...] [--name NAME] [--timeout SECONDS] [--no-wait] [--dry-run]
#
# The Job and the run share one name (SFT_RUN__NAME): <config stem>-<UTC time>-<random>, so every
# submission is a new run; pass --name to resume an earlier run after its Job is gone. The
# ConfigMap is owned by the Job, so both go when the Job's ttlSecondsAfterFinished expires.
# Needs kubectl (>= 1.27) with a context that may create ConfigMaps and Jobs and read pods/logs.
#
# stdout carries key=value lines (for $GITHUB_OUTPUT or a dotenv report) and, when waiting, the
# run's logs: run-name=<name> and run-uri=<run.output>/<name> once the Job is created, then
# final-output=<run.output>/<name>/final/ and a "Final model:" line when it completed. The Job is
# annotated sft-job/run-uri=<run.output>/<name>; examples/ci/poll_runs.py reads the run's status there.
#
# Exit status: 0 the run completed (prints where the final model is), or was submitted (--no-wait);
# the job's own exit code when the Job failed on it (64 config, 65 data, 66 input not found,
# 69 storage, 70 training, 71 driver too old, 74 scratch full, 77 access denied, 1 unexpected);
# 1 for any other failure (deadline, backoff limit without a known code); 2 usage; 124 when
# --timeout expired first (the Job keeps running).
set -euo pipefail

KUBECTL=${KUBECTL:-kubectl}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

config="" overlay="${SFT_OVERLAY:-$REPO_ROOT/k8s/overlays/rtx-pro-6000}" image="${SFT_IMAGE:-}"
namespace="${SFT_NAMESPACE:-}" name="" output="" timeout=0 wait=1 dry_run=0 poll=${SFT_POLL_SECONDS:-10}
sets=()

usage() { sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
die() { echo "submit-run: $*" >&2; exit 2; }
log() { echo "submit-run: $*" >&2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) config=${2:?}; shift 2 ;;
    --overlay) overlay=${2:?}; shift 2 ;;
    --image) image=${2:?}; shift 2 ;;
    --namespace|-n) namespace=${2:?}; shift 2 ;;
    --name) name=${2:?}; shift 2 ;;
    --output) output=${2:?}; shift 2 ;;
    --set) sets+=("${2:?}"); shift 2 ;;
    --timeout) timeout=${2:?}; shift 2 ;;
    --no-wait) wait=0; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

[[ -n "$config" ]] || die "--config FILE is required"
[[ -f "$config" ]] || die "config file $config does not exist"
[[ -f "$overlay/kustomization.yaml" ]] || die "$overlay is not a kustomize directory"
[[ "$timeout" =~ ^[0-9]+$ ]] || die "--timeout takes whole seconds"

# ------------------------------------------------------------------ the run's unique name
if [[ -z "$name" ]]; then
  stem=$(basename "$config"); stem=${stem%.*}
  stem=$(printf '%s' "$stem" | tr '[:upper:]' '[:lower:]' | tr -c 'a-z0-9' '-' | sed 's/--*/-/g; s/^-//; s/-$//')
  stem=${stem:0:30}; stem=${stem%-}
  rand=$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
  name="${stem:-sft}-$(date -u +%Y%m%d-%H%M%S)-${rand}"
fi
# A Job name is a DNS-1123 label (<= 63); it is also run.name (a directory and an S3 prefix).
[[ "$name" =~ ^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$ ]] || die "run name '$name' must be a DNS-1123 label (a-z, 0-9, '-', <= 63)"

json_str() {  # a JSON string literal, which YAML reads as the same string
  local s=$1
  [[ "$s" != *$'\n'* ]] || die "values may not contain newlines: $s"
  s=${s//\\/\\\\}; s=${s//\"/\\\"}; s=${s//$'\t'/\\t}
  printf '"%s"' "$s"
}

env_items=("SFT_RUN__NAME=$name")
[[ -z "$output" ]] || env_items+=("SFT_RUN__OUTPUT=$output")
for item in "${sets[@]+"${sets[@]}"}"; do
  key=${item%%=*}; value=${item#*=}
  [[ "$item" == *=* && "$key" =~ ^[A-Za-z_]+\.[A-Za-z0-9_]+$ ]] || die "--set $item is not section.key=value"
  section=${key%%.*}; field=${key#*.}
  [[ "$key" != run.output || -n "$output" ]] || output=$value
  env_items+=("SFT_${section^^}__${field^^}=$value")
done

# ------------------------------------------------------------------ render
# Where the final model will be: --output, else run.output from the config file.
if [[ -z "$output" ]]; then
  output=$(awk '
    /^[^[:space:]#]/ { in_run = ($0 ~ /^run:[[:space:]]*(#.*)?$/) }
    in_run && /^[[:space:]]+output:/ {
      sub(/^[[:space:]]+output:[[:space:]]*/, ""); sub(/[[:space:]]+#.*$/, ""); gsub(/^["'\'']|["'\'']$/, ""); print; exit
    }' "$config")
fi
final_location="${output:-<run.output>}"; final_location="${final_location%/}/$name/final/"
run_uri=""
[[ -z "$output" ]] || run_uri="${output%/}/$name"
work=$(mktemp -d "${TMPDIR:-/tmp}/sft-submit.XXXXXX")
trap 'rm -rf "$work"' EXIT
cp "$config" "$work/job.yaml"
overlay_abs=$(cd "$overlay" && pwd)
{
  echo "apiVersion: kustomize.config.k8s.io/v1beta1"
  echo "kind: Kustomization"
  echo "resources:"
  echo "  - $(json_str "$(realpath --relative-to="$work" "$overlay_abs")")"
  echo "labels:"
  echo "  - pairs:"
  echo "      sft-job/run: $(json_str "$name")"
  echo "    includeTemplates: true"
  echo "configMapGenerator:"
  echo "  - name: sft-job-config"
  echo "    behavior: replace"
  echo "    files: [job.yaml=job.yaml]"
  echo "    literals: [$(json_str "run=$name")]   # makes the ConfigMap's hashed name unique to the run"
  echo "patches:"
  echo "  - patch: |-"
  echo "      \$patch: delete"
  echo "      apiVersion: v1"
  echo "      kind: ServiceAccount"
  echo "      metadata:"
  echo "        name: sft-job"
  echo "  - patch: |-"
  echo "      apiVersion: batch/v1"
  echo "      kind: Job"
  echo "      metadata:"
  echo "        name: sft-job"
  if [[ -n "$run_uri" ]]; then
    echo "        annotations:"
    echo "          sft-job/run-uri: $(json_str "$run_uri")"
  fi
  echo "      spec:"
  echo "        template:"
  echo "          spec:"
  echo "            containers:"
  echo "              - name: train"
  [[ -z "$image" ]] || echo "                image: $(json_str "$image")"
  echo "                env:"
  for item in "${env_items[@]}"; do
    echo "                  - name: $(json_str "${item%%=*}")"
    echo "                    value: $(json_str "${item#*=}")"
  done
  # last: the patches above find the Job by its base name
  echo "  - target: {kind: Job, name: sft-job}"
  echo "    patch: |-"
  echo "      - op: replace"
  echo "        path: /metadata/name"
  echo "        value: $(json_str "$name")"
} > "$work/kustomization.yaml"

"$KUBECTL" kustomize "$work" > "$work/rendered.yaml"

if [[ "$dry_run" == 1 ]]; then
  cat "$work/rendered.yaml"
  log "dry run: job/$name not created; its final model would be at $final_location"
  exit 0
fi

kns=(); [[ -z "$namespace" ]] || kns=(-n "$namespace")
k() { "$KUBECTL" "${kns[@]+"${kns[@]}"}" "$@"; }

# create, not apply: a name that already exists is an error, never an update of another run.
k create -f "$work/rendered.yaml" >&2
uid=$(k get job "$name" -o jsonpath='{.metadata.uid}')
cm=$(k get configmap -l "sft-job/run=$name" -o jsonpath='{.items[0].metadata.name}')
if [[ -n "$uid" && -n "$cm" ]]; then
  k patch configmap "$cm" --type merge -p \
    "{\"metadata\":{\"ownerReferences\":[{\"apiVersion\":\"batch/v1\",\"kind\":\"Job\",\"name\":\"$name\",\"uid\":\"$uid\"}]}}" >&2
fi
log "submitted job/$name${namespace:+ in namespace $namespace}; final model: $final_location"
echo "run-name=$name"
[[ -z "$run_uri" ]] || echo "run-uri=$run_uri"
[[ "$wait" == 1 ]] || exit 0
trap 'rm -rf "$work"; log "interrupted: job/$name keeps running (kubectl delete job $name to stop it)"; exit 130' INT TERM

# ------------------------------------------------------------------ wait, streaming each pod's logs
start=$(date +%s)
job_state() {  # Complete | Failed | (empty: still going)
  k get job "$name" -o jsonpath='{range .status.conditions[?(@.status=="True")]}{.type}{"\n"}{end}' \
    | grep -E -m1 '^(Complete|Failed)$' || true
}
pods_in_order() {
  k get pods -l "batch.kubernetes.io/job-name=$name" --sort-by=.metadata.creationTimestamp \
    -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}'
}
timed_out() { [[ "$timeout" -gt 0 && $(( $(date +%s) - start )) -ge "$timeout" ]]; }
stream_pod() {  # follow one pod's logs until its container has finished
  local pod=$1 phase attached=0
  log "pod/$pod"
  while true; do
    phase=$(k get pod "$pod" -o jsonpath='{.status.phase}' 2>/dev/null || true)
    case "$phase" in
      "") return 0 ;;                                      # deleted (e.g. Kueue suspended the Job)
      Pending) timed_out && return 0; sleep "$poll"; continue ;;
    esac
    if [[ "$attached" == 0 ]]; then
      k logs -f "pod/$pod" -c train || true; attached=1
    else                                                   # stream dropped while running: re-attach
      k logs -f --tail=0 "pod/$pod" -c train || true
    fi
    phase=$(k get pod "$pod" -o jsonpath='{.status.phase}' 2>/dev/null || true)
    [[ "$phase" == Running ]] || return 0
    timed_out && return 0
    sleep 1
  done
}

streamed=" "
while true; do
  state=$(job_state)
  for pod in $(pods_in_order); do
    [[ "$streamed" == *" $pod "* ]] && continue
    stream_pod "$pod"
    streamed+="$pod "
    state=$(job_state)
  done
  [[ -z "$state" ]] || break
  if timed_out; then
    log "gave up after ${timeout}s: job/$name is still running"
    exit 124
  fi
  sleep "$poll"
done

if [[ "$state" == Complete ]]; then
  log "job/$name completed"
  echo "final-output=$final_location"
  echo "Final model: $final_location"
  exit 0
fi

reason=$(k get job "$name" -o jsonpath='{.status.conditions[?(@.type=="Failed")].reason}')
message=$(k get job "$name" -o jsonpath='{.status.conditions[?(@.type=="Failed")].message}')
code=$(k get pods -l "batch.kubernetes.io/job-name=$name" --sort-by=.metadata.creationTimestamp \
  -o jsonpath='{range .items[*]}{.status.containerStatuses[?(@.name=="train")].state.terminated.exitCode}{"\n"}{end}' \
  | grep -E '^[0-9]+$' | tail -n1 || true)
case "$code" in
  64) meaning="bad configuration" ;;
  65) meaning="bad data (the log names file and line)" ;;
  66) meaning="input not found (dataset, model, bucket)" ;;
  69) meaning="storage unreachable after retries" ;;
  70) meaning="training failed (non-finite loss or CUDA out of memory)" ;;
  71) meaning="the node's NVIDIA driver is too old for the image's CUDA runtime" ;;
  74) meaning="local scratch disk full or too small" ;;
  77) meaning="access denied (storage credentials or Hub token)" ;;
  1) meaning="unexpected error (traceback in the log)" ;;
  *) meaning="" ;;
esac
log "job/$name failed: ${reason:-unknown reason}${message:+: $message}"
[[ -z "$code" ]] || log "last exit code $code${meaning:+: $meaning}"
log "checkpoints, if any, stay under ${output:-<run.output>}/$name/; rerun with --name $name to resume"
case "$code" in
  64|65|66|69|70|71|74|77) exit "$code" ;;
  *) exit 1 ;;
esac
