# syntax=docker/dockerfile:1
# ldm-serve: one image, three commands (README "Deploy"):
#   docker build -t ldm-serve:cuda .                              # CUDA build of PyTorch (default)
#   docker build --build-arg VARIANT=cpu -t ldm-serve:cpu .       # CPU only, no CUDA base
#   docker run --gpus all -p 8000:8000 -p 50051:50051 ldm-serve:cuda serve
#   ... ldm-serve:cuda api    |    ... ldm-serve:cuda worker --model tiny-shapes
# The install is the README's: PyTorch first (TORCH_SPEC, as the Makefile), then the exact versions of
# requirements.lock (`make lock`), then `pip install .` of the project without resolving anything again, which
# builds the wheel with its generated gRPC stubs (setup.py) and the shipped model; `pip check` fails the build
# if the lock and the project's requirements (or torch's) disagree.

ARG VARIANT=cuda
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG CPU_IMAGE=ubuntu:24.04

# ---------------------------------------------------------------------------------------------- base images
FROM ${CUDA_IMAGE} AS os-cuda
ARG CUDA_IMAGE
LABEL org.opencontainers.image.base.name="${CUDA_IMAGE}"

FROM ${CPU_IMAGE} AS os-cpu
ARG CPU_IMAGE
LABEL org.opencontainers.image.base.name="${CPU_IMAGE}"

# Ubuntu 24.04's Python 3.12 in both stages below, so the venv built in one runs in the other.
# (DL3006: os-${VARIANT} is one of the two stages above, each tagged; hadolint cannot resolve the variable.)
# hadolint ignore=DL3006
FROM os-${VARIANT} AS os
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------------------------------------- build
FROM os AS build
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/*
ARG VARIANT
ARG TORCH_SPEC="torch==2.13.0"
# empty = PyTorch's CUDA 12.8 index for VARIANT=cuda, its CPU index for VARIANT=cpu
ARG TORCH_INDEX_URL=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# (DL3013: TORCH_SPEC is a pinned requirement, torch==X.Y.Z; hadolint cannot see through the variable.)
# hadolint ignore=DL3013
RUN python3 -m venv /opt/venv \
 && flavour="$([ "${VARIANT}" = cpu ] && echo cpu || echo cu128)" \
 && python -m pip install --no-cache-dir "${TORCH_SPEC}" \
      --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/${flavour}}"
WORKDIR /src
COPY requirements.lock ./
RUN python -m pip install --no-cache-dir --requirement requirements.lock
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY proto/ proto/
COPY models/ models/
COPY service/ service/
RUN python -m pip install --no-cache-dir --no-deps . \
 && python -m pip check \
 && ldm --help > /dev/null

# ---------------------------------------------------------------------------------------------- runtime
FROM os AS runtime
ARG VARIANT
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="ldm-serve" \
      org.opencontainers.image.description="Latent Diffusion Model server: REST + gRPC API, Redis job queue, GPU workers" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT" \
      io.ldm-serve.variant="${VARIANT}"
RUN groupadd --system --gid 10001 ldm \
 && useradd --system --no-log-init --uid 10001 --gid ldm --home-dir /var/lib/ldm --create-home ldm \
 && install -d -o ldm -g ldm /models
COPY --from=build /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /usr/local/lib/ldm/healthcheck.py
# Containers listen on every interface; a worker serves /metrics on a fixed port so it can be scraped.
# (`ldm serve --workers N` with N > 1 in one container: set LDM_WORKER_METRICS_PORT=0, one port each.)
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/ldm \
    LDM_REST_HOST=0.0.0.0 \
    LDM_GRPC_HOST=0.0.0.0 \
    LDM_WORKER_METRICS_HOST=0.0.0.0 \
    LDM_WORKER_METRICS_PORT=8001 \
    LDM_DATA_DIR=/var/lib/ldm/data \
    TORCHINDUCTOR_CACHE_DIR=/var/lib/ldm/inductor-cache
# (TORCHINDUCTOR_CACHE_DIR: LDM_WORKER_GPU_MODE=compile's compiled kernels, kept in the volume across restarts)
# /models: your checkpoints (`ldm worker --model /models/sd15.safetensors`); the shipped tiny-shapes model is
# inside the installed package. /var/lib/ldm: the embedded Redis of `ldm serve` (append-only file).
VOLUME ["/models", "/var/lib/ldm"]
USER 10001:10001
WORKDIR /var/lib/ldm
# REST, gRPC, a worker's /metrics
EXPOSE 8000 50051 8001
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "/usr/local/lib/ldm/healthcheck.py"]
ENTRYPOINT ["ldm"]
CMD ["serve"]
