# syntax=docker/dockerfile:1.7
#
# sft-job training image.
#
#   CUDA 13.0 user space (nvidia/cuda base): one image for Blackwell (RTX PRO 6000, sm_120),
#   Hopper (sm_90) and Ampere (sm_80/86). The CUDA libraries torch uses come from the wheels
#   pinned in uv.lock (PyPI's torch 2.13.0 for linux x86_64 is the CUDA 13.0 build); the base
#   image's CUDA version is what the NVIDIA container runtime checks against the host driver
#   (CUDA 13.0 needs driver >= 580). See docs/deployment.md.
#   Training stack installed with `uv sync --locked` from uv.lock: the lock is for this image
#   only; CI and development install CPU torch with pip.
#   tini is PID 1 (exec form, no shell): SIGTERM reaches Python, zombies are reaped.
#   Non-root numeric user 10001; everything the job writes (scratch, HF/torch/triton caches)
#   lives under /scratch, so the root filesystem can be read-only.
#
# Build (BuildKit; linux/amd64 only, the lock is resolved for linux x86_64):
#   docker build -t sft-job:"$(git rev-parse --short HEAD)" \
#     --build-arg VCS_REF="$(git rev-parse HEAD)" --build-arg VERSION=0.1.0 \
#     --build-arg BUILD_DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
#     --build-arg SOURCE_URL=https://github.com/your-org/sft-job .
#
# Bake a base model into /models/base for air-gapped clusters (then `model.source: /models/base`):
#   docker build --build-arg BAKE_MODEL=yes --build-arg BASE_MODEL_DIR=models/Mistral-7B-v0.3 ...
#   (BASE_MODEL_DIR is a directory inside the build context), or, without copying it into the
#   context: docker build --build-context base-model=/data/Mistral-7B-v0.3 ...

ARG CUDA_VERSION=13.0.1
ARG UBUNTU_VERSION=24.04
ARG UV_VERSION=0.13.9
ARG BAKE_MODEL=no

FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

# ---------------------------------------------------------------- build the virtual environment
FROM nvidia/cuda:${CUDA_VERSION}-base-ubuntu${UBUNTU_VERSION} AS builder

# Ubuntu 24.04's python3 is 3.12; the runtime stage installs the same interpreter at the same
# path, so the venv's interpreter link stays valid.
# DL3008: the base image is pinned by tag; Ubuntu's archive drops superseded package versions,
# so exact apt pins would break rebuilds without making them more reproducible.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

COPY --from=uv /uv /usr/local/bin/uv

ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/bin/python3 \
    UV_PROJECT_ENVIRONMENT=/opt/venv

WORKDIR /src

# Dependencies only, exactly as locked, without the project: this step sees pyproject.toml, uv.lock and
# the layer splitter, never job/, so a code change does not re-run it. Extras: `liger` (Liger's Triton
# kernels, model.liger_kernels) and the trackers train.report_to may name; nothing is fetched at run time.
# Then torch, triton and the nvidia-*/cuda-* wheels (~2.7 GB of the ~2.9 GB compressed) are moved to
# /layers/cuda, copied as a layer of their own that changes only when torch does
# (scripts/layer_sizes.py: the same grouping estimates each layer's size from uv.lock).
# The optional `ca-bundle` secret is for builds behind a TLS-intercepting proxy (never in a layer).
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=bind,source=pyproject.toml,target=/src/pyproject.toml \
    --mount=type=bind,source=uv.lock,target=/src/uv.lock \
    --mount=type=bind,source=scripts/layer_sizes.py,target=/tmp/layer_sizes.py \
    --mount=type=secret,id=ca-bundle,target=/run/secrets/ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export SSL_CERT_FILE=/run/secrets/ca-bundle; fi \
    && uv sync --locked --no-dev --no-install-project \
        --extra liger --extra tensorboard --extra mlflow --extra wandb \
    && /opt/venv/bin/python /tmp/layer_sizes.py split /opt/venv /layers/cuda \
    && site="$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    && echo /app > "$site/sft_job_app.pth"

# ---------------------------------------------------------------- optional baked base model
# Default: an empty stage (nothing baked). BAKE_MODEL=yes copies BASE_MODEL_DIR from the build
# context; `--build-context base-model=DIR` replaces the `base-model` stage altogether.
FROM scratch AS bake-model-no

FROM scratch AS bake-model-yes
ARG BASE_MODEL_DIR=models/base
COPY ${BASE_MODEL_DIR}/ /

# DL3006: this FROM names one of the two stages above (chosen by the BAKE_MODEL build arg),
# not an image from a registry, so there is no tag to pin.
# hadolint ignore=DL3006
FROM bake-model-${BAKE_MODEL} AS base-model

# ---------------------------------------------------------------- runtime
FROM nvidia/cuda:${CUDA_VERSION}-base-ubuntu${UBUNTU_VERSION} AS runtime
ARG CUDA_VERSION
ARG UBUNTU_VERSION

# tini: PID 1. gcc, libc6-dev and python3-dev: Triton JIT-compiles a small C launcher the first
# time a Triton kernel runs (torch.compile, torchao optimizers); without them those paths fail.
# DL3008: the base image is pinned by tag; Ubuntu's archive drops superseded package versions,
# so exact apt pins would break rebuilds without making them more reproducible.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates tini python3 python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# Numeric user and group 10001 (Kubernetes `runAsNonRoot` can verify a numeric USER only).
RUN groupadd --system --gid 10001 sft \
    && useradd --system --uid 10001 --gid 10001 --home-dir /scratch/home --no-create-home \
        --shell /usr/sbin/nologin sft \
    && mkdir -p /scratch /models/base \
    && chown 10001:10001 /scratch

# Layers from the least to the most often changed, so a change re-creates (and a node pulls) only the layers
# below it: the baked model (empty by default), torch + CUDA wheels (~2.7 GB compressed; changes with
# torch), the other dependencies (~0.2 GB; with uv.lock), then the project (~1 MB; with every commit).
# The project is not installed: job/ sits in /app, importable through sft_job_app.pth in the venv.
COPY --from=base-model / /models/base/
COPY --from=builder /layers/cuda/ /opt/venv/
COPY --from=builder /opt/venv /opt/venv
COPY examples /app/examples
COPY entrypoint.py /app/entrypoint.py
COPY job /app/job

# Everything the job and its libraries write goes under the scratch mount (/scratch): the root
# filesystem can be mounted read-only. SFT_RUN__SCRATCH is an environment override, so it beats
# run.scratch in a config file: in a container the scratch directory is the mount's, not the
# recipe's (change it with -e SFT_RUN__SCRATCH=... together with the mount).
# DL3064: the only name it flags is TOKENIZERS_PARALLELISM, a switch (no value is secret here;
# credentials come from the environment at run time, never from the image).
# hadolint ignore=DL3064
ENV PATH=/opt/venv/bin:${PATH} \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SFT_RUN__SCRATCH=/scratch \
    HOME=/scratch/home \
    XDG_CACHE_HOME=/scratch/cache \
    XDG_CONFIG_HOME=/scratch/cache/config \
    HF_HOME=/scratch/cache/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HF_HUB_DISABLE_PROGRESS_BARS=1 \
    DO_NOT_TRACK=1 \
    TORCH_HOME=/scratch/cache/torch \
    TORCHINDUCTOR_CACHE_DIR=/scratch/cache/torchinductor \
    TRITON_CACHE_DIR=/scratch/cache/triton \
    CUDA_CACHE_PATH=/scratch/cache/nv \
    MPLCONFIGDIR=/scratch/cache/matplotlib \
    TOKENIZERS_PARALLELISM=false \
    PYTORCH_ALLOC_CONF=expandable_segments:True

WORKDIR /app
USER 10001:10001

# Exec form, no shell: tini is PID 1 and forwards SIGTERM to Python only (no -g: dataloader
# workers must not get SIGTERM before the main process has decided whether to save); tini reaps
# them when they exit. Arguments are the CLI's: `train --config FILE`, `validate`, `plan`, ...
ENTRYPOINT ["/usr/bin/tini", "--", "/opt/venv/bin/python", "/app/entrypoint.py"]
CMD ["--help"]

# Provenance, from build args (set by CI): last, so a new commit does not invalidate the layers.
ARG VCS_REF=unknown
ARG VERSION=0.1.0
ARG BUILD_DATE=unknown
ARG SOURCE_URL=https://github.com/your-org/sft-job
ARG BASE_MODEL_ID=""
LABEL org.opencontainers.image.title="sft-job" \
      org.opencontainers.image.description="Full-parameter SFT of a ~7B causal LM on one 96 GB GPU" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.base.name="nvidia/cuda:${CUDA_VERSION}-base-ubuntu${UBUNTU_VERSION}" \
      io.github.sft-job.base-model="${BASE_MODEL_ID}"
ENV IMAGE_REVISION=${VCS_REF} \
    IMAGE_VERSION=${VERSION}
