#!/usr/bin/env bash
# make image-check: build the image with podman and run it the way a cluster does, on a machine
# without a Docker daemon or registry access (root needed: apt, debootstrap, rootful podman).
#
#   1. stand-ins for the base images: Debian bookworm (debootstrap from Debian's archive) tagged as
#      the Dockerfile's nvidia/cuda base, and the uv image from PyPI's `uv` wheel (/uv, /uvx);
#   2. a cold build (--no-cache), then a warm one (nothing changed);
#   3. the CPU demo as uid 10001 with a read-only root and a scratch volume: exit 0, final model written;
#   4. the demo again under a new run name, SIGTERM through tini after training started: exit 75;
#   5. a one-line change under job/, rebuilt: every dependency layer keeps its digest.
#
# It builds from a copy of the checkout (git's tracked and untracked, not ignored, files) so the code
# change never touches the working tree. Work files and the podman config live in IMAGE_CHECK_DIR.
# What it cannot prove: the real CUDA base (Ubuntu 24.04, python 3.12) and anything on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${IMAGE_CHECK_DIR:-/var/tmp/sft-image-check}
TAG=${IMAGE_CHECK_TAG:-localhost/sft-job:image-check}
CA_BUNDLE=${IMAGE_CHECK_CA_BUNDLE:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
started=$(date +%s)

arg() { sed -n "s/^ARG $1=//p" Dockerfile | head -1; }
CUDA_BASE="docker.io/nvidia/cuda:$(arg CUDA_VERSION)-base-ubuntu$(arg UBUNTU_VERSION)"
UV_VERSION=$(arg UV_VERSION)
UV_IMAGE="ghcr.io/astral-sh/uv:${UV_VERSION}"
say() { printf '[image-check %4ss] %s\n' "$(($(date +%s) - started))" "$*"; }

# ------------------------------------------------------------------ tools and podman's configuration
missing=()
for tool in podman:podman runc:runc debootstrap:debootstrap newuidmap:uidmap fuse-overlayfs:fuse-overlayfs; do
    command -v "${tool%%:*}" >/dev/null || missing+=("${tool##*:}")
done
if ((${#missing[@]})); then
    [ "$(id -u)" = 0 ] || { echo "image-check: needs root to install ${missing[*]}" >&2; exit 1; }
    say "installing ${missing[*]} with apt"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >/dev/null
fi
mkdir -p "$WORK"
# crun refuses the hybrid cgroup hierarchy of these machines: runc with the cgroupfs manager. The default
# ulimits (nofile, nproc) cannot be raised inside this machine's own container: drop them.
export CONTAINERS_CONF="$WORK/containers.conf"
printf '[containers]\ndefault_ulimits = []\n' >"$CONTAINERS_CONF"
PODMAN=(podman --runtime runc --cgroup-manager=cgroupfs)
exists() { "${PODMAN[@]}" image exists "$1"; }

# ------------------------------------------------------------------ stand-ins for the base images
if ! exists "$CUDA_BASE"; then
    say "stand-in for $CUDA_BASE: Debian bookworm (python 3.11) from $DEBIAN_MIRROR"
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase bookworm "$WORK/rootfs" "$DEBIAN_MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log"; exit 1; }
    tar -C "$WORK/rootfs" -c . | "${PODMAN[@]}" import --quiet - "$CUDA_BASE" >/dev/null
    rm -rf "$WORK/rootfs"
fi
if ! exists "$UV_IMAGE"; then
    say "stand-in for $UV_IMAGE: /uv and /uvx from PyPI's uv==$UV_VERSION wheel"
    rm -rf "$WORK/uv" && mkdir -p "$WORK/uv"
    python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_17_x86_64 \
        --dest "$WORK/uv" "uv==$UV_VERSION" 2>/dev/null
    (cd "$WORK/uv" && python3 - <<'PY'
import glob, os, zipfile
(wheel,) = glob.glob("uv-*.whl")
with zipfile.ZipFile(wheel) as archive:
    for name in ("uv", "uvx"):
        (member,) = [m for m in archive.namelist() if m.endswith(f".data/scripts/{name}")]
        with open(name, "wb") as out:
            out.write(archive.read(member))
        os.chmod(name, 0o755)
PY
    )
    tar -C "$WORK/uv" -c uv uvx | "${PODMAN[@]}" import --quiet - "$UV_IMAGE" >/dev/null
fi
# podman 4.3 (Debian 12) reads `FROM bake-model-${BAKE_MODEL}` as an image name, not a stage: an empty
# image of that name stands for the empty stage (BuildKit resolves the stage and never looks for it).
if ! exists localhost/bake-model-no; then
    mkdir -p "$WORK/empty"
    tar -C "$WORK/empty" -c . | "${PODMAN[@]}" import --quiet - localhost/bake-model-no >/dev/null
fi

# ------------------------------------------------------------------ build context: a copy of the checkout
rm -rf "$WORK/context" && mkdir -p "$WORK/context"
if git rev-parse --git-dir >/dev/null 2>&1; then
    git ls-files -z --cached --others --exclude-standard | tar --null -T - -c | tar -x -C "$WORK/context"
else
    tar --exclude=.venv --exclude=.git -c . | tar -x -C "$WORK/context"
fi

# uv.lock's URLs (PyPI's files) are what `uv sync --locked` fetches; behind a TLS-intercepting proxy the
# build needs the CA bundle this machine trusts: a build secret, mounted for that one RUN, in no layer.
BUILD=("${PODMAN[@]}" build --pull=never --network=host --layers
    --secret "id=ca-bundle,src=$CA_BUNDLE"
    --build-arg VCS_REF=image-check --build-arg BUILD_DATE=1970-01-01T00:00:00Z)
build() { # build LOG [extra podman build args]: seconds on stdout
    local log=$1 t0
    shift
    t0=$(date +%s)
    if ! "${BUILD[@]}" "$@" -t "$TAG" "$WORK/context" >"$WORK/$log" 2>&1; then
        tail -30 "$WORK/$log" >&2
        echo "image-check: build failed (log: $WORK/$log)" >&2
        exit 1
    fi
    echo $(($(date +%s) - t0))
}
layers() { "${PODMAN[@]}" image inspect --format '{{range .RootFS.Layers}}{{println .}}{{end}}' "$TAG" | grep .; }

# podman 4.3 does not key a RUN's cache on its bind-mounted files (uv.lock): the first build takes no cache.
say "cold build (--no-cache): $TAG"
cold=$(build build-cold.log --no-cache)
say "cold build: ${cold} s; warm build (nothing changed)"
warm=$(build build-warm.log)
layers >"$WORK/layers-before"
size=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$TAG")

# ------------------------------------------------------------------ the CPU demo, as the cluster runs it
scratch="$WORK/scratch"
rm -rf "$scratch" && mkdir -p "$scratch" && chown 10001:10001 "$scratch"
RUN=("${PODMAN[@]}" run --network=none --user 10001:10001 --read-only -v "$scratch:/scratch"
    -e SFT_RUN__OUTPUT=/scratch/outputs -e SFT_LOG_FORMAT=json)
say "CPU demo: uid 10001, read-only root, scratch volume"
t0=$(date +%s)
set +e
"${RUN[@]}" --rm "$TAG" train --config /app/examples/cpu-demo.yaml >"$WORK/demo.log" 2>&1
demo_rc=$?
set -e
demo_s=$(($(date +%s) - t0))
final=$(find "$scratch/outputs" -path '*/final/*.safetensors' 2>/dev/null | head -1)
[ "$demo_rc" = 0 ] && [ -n "$final" ] || { tail -20 "$WORK/demo.log"; echo "image-check: demo rc=$demo_rc, final model: ${final:-none}" >&2; exit 1; }

say "SIGTERM through tini 3 s after training_started (new run name)"
name=image-check-sigterm
"${PODMAN[@]}" rm -f "$name" >/dev/null 2>&1 || true
"${RUN[@]}" -d --name "$name" -e SFT_RUN__NAME=cpu-demo-sigterm "$TAG" train --config /app/examples/cpu-demo.yaml >/dev/null
for _ in $(seq 240); do # the Trainer's first callback, then a few seconds of steps
    "${PODMAN[@]}" logs "$name" 2>&1 | grep -q training_started && break
    sleep 0.5
done
sleep 3
"${PODMAN[@]}" kill --signal TERM "$name" >/dev/null
term_rc=$("${PODMAN[@]}" wait "$name")
"${PODMAN[@]}" logs "$name" >"$WORK/sigterm.log" 2>&1
"${PODMAN[@]}" rm -f "$name" >/dev/null
[ "$term_rc" = 75 ] || { tail -20 "$WORK/sigterm.log"; echo "image-check: SIGTERM exit $term_rc, not 75" >&2; exit 1; }

# ------------------------------------------------------------------ a code change rebuilds one small layer
say "code change under job/: rebuild"
echo "# image-check $(date +%s)" >>"$WORK/context/job/__init__.py"
code=$(build build-code.log)
layers >"$WORK/layers-after"
changed=$(diff <(cat "$WORK/layers-before") <(cat "$WORK/layers-after") | grep -c '^>' || true)
total=$(wc -l <"$WORK/layers-after")
same_prefix=$(paste -d' ' "$WORK/layers-before" "$WORK/layers-after" | awk '$1 != $2 {print NR - 1; exit}')
# Every layer above the project's (the last COPY) must be identical: the dependencies are not pulled again.
[ "$changed" = 1 ] && [ "${same_prefix:-$total}" = $((total - 1)) ] || {
    echo "image-check: a code change changed $changed of $total layers (first at $((same_prefix + 1)))" >&2
    exit 1
}

# ------------------------------------------------------------------ summary
mb() { awk -v b="$1" 'BEGIN { printf "%.0f MB", b / 1e6 }'; }
echo
echo "| check | result |"
echo "|---|---|"
echo "| base images | stand-ins: Debian bookworm as $CUDA_BASE, uv $UV_VERSION from PyPI |"
echo "| build, cold (--no-cache) / warm / after a code change | ${cold} s / ${warm} s / ${code} s |"
echo "| image size (podman image inspect .Size, uncompressed) | $(mb "$size") |"
echo "| CPU demo (uid 10001, --read-only, scratch volume) | exit $demo_rc in ${demo_s} s; ${final#"$scratch"/} |"
echo "| SIGTERM through tini after training started | exit $term_rc |"
echo "| layers changed by a code change | $changed of $total (the last: job/) |"
echo "| total | $(($(date +%s) - started)) s |"
echo
echo "Layers (podman history, uncompressed):"
"${PODMAN[@]}" history --format '{{.Size}}\t{{.CreatedBy}}' "$TAG" | awk -F'\t' '$1 != "0B" && $1 != "0 B"' \
    | cut -c1-150
