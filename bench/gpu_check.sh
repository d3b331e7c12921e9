#!/usr/bin/env bash
# The one prepared device check (issue 16): bench/gpu_throughput.py and bench/gpu_job.py on one GPU,
# every part under its own time limit so the whole script ends inside 9 minutes even when a part hangs.
# All JSON goes under $OUT; one short table is printed last.
#
#   bash bench/gpu_check.sh wheels   # here, with network: fill .whl/ (ignored through .git/info/exclude)
#   bash bench/gpu_check.sh          # on the device, with .whl/ carried: install, run, summarise
#
# Wheels. The device image (Python 3.12, CUDA torch 2.11, transformers 5.17, accelerate 1.15, pyarrow,
# pandas, matplotlib, click, pyyaml, regex, xxhash, psutil, fsspec, jinja2, huggingface_hub 1.33,
# tokenizers 0.23.2, safetensors 0.8) lacks what the job needs on top: transformers 5.24.0 (the job's),
# trl 1.16.0, datasets 5.2.0 and its dill 0.4.1 and multiprocess 0.70.19, structlog 26.1.0. `wheels`
# downloads exactly those (cp312 manylinux; 15.4 MB: transformers 13.5, trl 0.95, datasets 0.61,
# multiprocess 0.15, dill 0.12, structlog 0.07). Left out on purpose: boto3, botocore, s3transfer and
# jmespath (17.1 MB, only an s3:// store imports them; the runs here use local stores) and pyarrow
# (55 MB, the image has it; with it the carried tree would pass its 64 MiB limit). The working tree that
# travels is ~2 MB plus .whl/.
#
# Device call: carry [".whl"], timeout_s 600, command `bash bench/gpu_check.sh`.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "wheels" ]]; then
    if [[ -d .git/info ]]; then grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude; fi
    mkdir -p .whl
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
        transformers==5.24.0 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 structlog==26.1.0
    du -sh .whl
    exit
fi

OUT="${OUT:-gpu-check-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
BUDGET=${GPU_CHECK_BUDGET:-530}  # seconds for the whole script (the device call gets 9 minutes of it)
LOG="$OUT/gpu_check.log"

# The seconds a part may take: its own limit, or what is left of the budget less the summary's 10 s.
limit() {
    local left=$((BUDGET - SECONDS - 10))
    ((left < $1)) && echo $((left > 10 ? left : 10)) || echo "$1"
}

part() {  # part NAME SECONDS COMMAND...: run under `timeout`, note its exit code and seconds
    local name=$1 seconds
    seconds=$(limit "$2")
    shift 2
    local started=$SECONDS
    echo "== $name (limit ${seconds}s): $*" | tee -a "$LOG"
    timeout --signal=TERM --kill-after=15 "$seconds" "$@" 2>&1 | tee -a "$LOG" | grep -v '^{' | tail -n 40
    local code=${PIPESTATUS[0]}
    echo "{\"part\": \"$name\", \"exit\": $code, \"seconds\": $((SECONDS - started)), \"limit\": $seconds}" \
        >> "$OUT/parts.jsonl"
}

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site || { echo "wheel install failed"; exit 1; }
fi
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c 'import platform, importlib.metadata as m
def v(n):
    try:
        return m.version(n)
    except m.PackageNotFoundError:
        return "absent"
print("python", platform.python_version(), *(f"{n} {v(n)}" for n in
      ("torch", "transformers", "trl", "datasets", "accelerate", "structlog", "pyarrow", "triton")))'
    df -h . /tmp /dev/shm | tail -n +2
} 2>&1 | tee "$OUT/environment.txt"

# GPU_CHECK_DRY_RUN=1: the same script on a CPU machine, every part a dry run (checks the script itself).
if [[ -n "${GPU_CHECK_DRY_RUN:-}" ]]; then
    sizes=(--dry-run) dry=(--dry-run)
else
    sizes=(--seq 2048 4096 --warmup 1 --steps 2) dry=()
fi
# Limits from estimates, not measurements (no GPU run yet): the throughput runs compile each length once
# (~1 min), the 7B job builds and loads 14.5 GB and compiles, the resume runs write ~5.6 GB checkpoints.
part throughput 220 python3 bench/gpu_throughput.py "${sizes[@]}" --no-fsdp-check --out "$OUT/gpu_throughput.json"
part job-7b 150 python3 bench/gpu_job.py "${dry[@]}" --only 7b --job-timeout 140 --out "$OUT/gpu_job_7b.json"
part job-resume 150 python3 bench/gpu_job.py "${dry[@]}" --only resume --job-timeout 140 \
    --out "$OUT/gpu_job_resume.json"

python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return {}
def f(v, p=""):
    return "n/a" if v is None else format(v, p)

print("\n== summary", (out / "environment.txt").read_text().splitlines()[0] if (out / "environment.txt").exists() else "")
for line in (out / "parts.jsonl").read_text().splitlines():
    p = json.loads(line)
    print(f"part {p['part']:<11} exit {p['exit']:>4}  {p['seconds']:>4} s (limit {p['limit']})")
gt = load("gpu_throughput.json")
print(f"{'run':<22}{'split':<7}{'ckpt':<9}{'tok/s':>8}{'MFU':>7}{'peak':>7}{'opt ms':>8}  status")
for r in gt.get("runs", []):
    print(f"{r['recipe'] + ' ' + str(r['seq']):<22}{str(r['batch']) + 'x' + str(r['accum']):<7}{r['checkpointing']:<9}"
          f"{f(r['tokens_per_second'], ',.0f'):>8}{f(r['mfu'], '.1%'):>7}{f(r['peak_allocated_gib'], '.1f'):>7}"
          f"{f(r['optimizer_ms'], '.1f'):>8}  {r['status'][:30]}")
for t in gt.get("targets", []):
    verdicts = " ".join(f"{k}={ {True: 'pass', False: 'FAIL', None: 'n/a'}[v['pass']] }" for k, v in t.items()
                        if isinstance(v, dict))
    print(f"targets {t['recipe']} {t['seq']}: {verdicts}")
big = load("gpu_job_7b.json").get("7b", {})
print(f"job 7B default config: exit {big.get('exit_code')}, {f(big.get('tokens_per_second'), ',.0f')} tok/s, "
      f"MFU {f(big.get('mfu'), '.1%')}, peak {f(big.get('peak_memory_gib'))} GiB, "
      f"{(big.get('fast_path') or {}).get('activation_checkpointing')} batch {(big.get('fast_path') or {}).get('batch')}"
      f"x{(big.get('fast_path') or {}).get('grad_accum')}; cap: {load('gpu_job_7b.json').get('memory_cap', {}).get('why')}")
res = load("gpu_job_resume.json").get("resume", {})
print(f"job resume: exits {res.get('exit_uninterrupted')}/{res.get('exit_sigterm')}/{res.get('exit_restart')}, "
      f"SIGTERM->exit {res.get('sigterm_to_exit_seconds')} s (grace {res.get('grace_seconds')}), "
      f"max|dw| {f(res.get('max_abs_dw'), '.3g')}, losses equal {res.get('losses_equal')}, "
      f"blocked s {(res.get('checkpoints') or {}).get('blocked_seconds')}")
for name in ("gpu_job_7b.json", "gpu_job_resume.json"):
    failed = [k for k, ok in load(name).get("checks", {}).items() if not ok]
    print(f"{name}: {'all checks ok' if not failed else 'FAILED: ' + ', '.join(failed)}")
EOF
