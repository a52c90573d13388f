# syntax=docker/dockerfile:1
#
# llmpipe's two images, from one Dockerfile:
#
#   docker build --target operator -t ghcr.io/llmpipe/llmpipe-operator:0.1.0 .
#   docker build --target stage    -t ghcr.io/llmpipe/llmpipe-stage:0.1.0 .
#
# operator: Kopf + lightkube, no torch (about 150 MB).
# stage:    torch (CPU build by default) + transformers + grpc, runs one pipeline stage.
#
# Build arguments:
#   PYTHON_IMAGE       base of the operator image and of the default stage image.
#   STAGE_BASE_IMAGE   base of the stage image. For GPU nodes (x86-64 or arm64 servers with
#                      NVIDIA GPUs) this is the documented path: a CUDA runtime image and the
#                      matching PyTorch wheel index,
#                        docker build --target stage -t ghcr.io/llmpipe/llmpipe-stage:0.1.0-cu128 \
#                          --build-arg STAGE_BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                          --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#                      (a base without Python gets the distribution's python3 installed; the
#                      CUDA 12.8 wheels need an NVIDIA driver >= 570 on the node). Stages
#                      planned on a GPU (plan device cuda) then load their layers onto it;
#                      the same image runs CPU stages too. docs/stage-runtime.md, "GPU stages".
#                      Jetson (arm64, JetPack): see "Jetson" in docs/stage-runtime.md; the
#                      stock arm64 CUDA wheels do not run on Orin's integrated GPU.
#   TORCH_INDEX_URL    where torch comes from; the default CPU index keeps the image free of
#                      the CUDA libraries (about 1 GB instead of 5 GB).
#
# Base images are pinned by exact tag. Pin them by digest too in your own builds
# (`docker buildx imagetools inspect python:3.11.11-slim-bookworm` prints it); this file
# does not carry a digest because none could be verified where it was written.
#
# Both images run as the unprivileged user 10001 (uid = gid), matching the Helm chart's and
# the operator's restricted securityContext (runAsNonRoot).

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG STAGE_BASE_IMAGE=${PYTHON_IMAGE}

# ---------------------------------------------------------------------------------------
# operator-build: a venv with llmpipe[operator], pinned by constraints.txt.
FROM ${PYTHON_IMAGE} AS operator-build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY llmpipe_cli ./llmpipe_cli
COPY llmpipe_common ./llmpipe_common
COPY operator ./operator
COPY stage_image ./stage_image
RUN python -m venv /opt/llmpipe \
 && /opt/llmpipe/bin/pip install -c constraints.txt ".[operator]"

# ---------------------------------------------------------------------------------------
# operator: what the Helm chart deploys (`python -m llmpipe_operator ...`).
FROM ${PYTHON_IMAGE} AS operator
LABEL org.opencontainers.image.title="llmpipe-operator" \
      org.opencontainers.image.description="llmpipe operator: plans and deploys LLMPipeline stages" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 llmpipe \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/llmpipe --create-home \
      --shell /usr/sbin/nologin llmpipe
COPY --from=operator-build /opt/llmpipe /opt/llmpipe
ENV PATH=/opt/llmpipe/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /home/llmpipe
# 8081: liveness (/healthz); 8080: Prometheus metrics (/metrics).
EXPOSE 8080 8081
ENTRYPOINT ["python", "-m", "llmpipe_operator"]
CMD ["--all-namespaces"]

# ---------------------------------------------------------------------------------------
# stage-base: the stage's base image with a Python >= 3.11 (installed if the base has none,
# as CUDA runtime images do).
FROM ${STAGE_BASE_IMAGE} AS stage-base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
      apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
           python3 python3-venv ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && python3 -c 'import sys; assert sys.version_info >= (3, 11), sys.version'

# ---------------------------------------------------------------------------------------
# stage-build: a venv with torch from TORCH_INDEX_URL, then llmpipe[stage] from PyPI.
FROM stage-base AS stage-build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
# torch first, from its own index: the version comes from constraints.txt (2.9.1 matches the
# index's 2.9.1+cpu), and the second install then keeps it instead of pulling PyPI's CUDA build.
RUN python3 -m venv /opt/llmpipe \
 && torch_pin=$(grep -E '^torch==' constraints.txt) \
 && /opt/llmpipe/bin/pip install --index-url "${TORCH_INDEX_URL}" "${torch_pin}"
COPY llmpipe_cli ./llmpipe_cli
COPY llmpipe_common ./llmpipe_common
COPY operator ./operator
COPY stage_image ./stage_image
RUN /opt/llmpipe/bin/pip install -c constraints.txt ".[stage]"

# ---------------------------------------------------------------------------------------
# stage: one pipeline stage (`python -m llmpipe_stage --config-dir ... --stage-index N ...`).
FROM stage-base AS stage
LABEL org.opencontainers.image.title="llmpipe-stage" \
      org.opencontainers.image.description="llmpipe stage runtime: a slice of a model's layers behind gRPC (and the OpenAI API on stage 0)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 llmpipe \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/llmpipe --create-home \
      --shell /usr/sbin/nologin llmpipe
COPY --from=stage-build /opt/llmpipe /opt/llmpipe
ENV PATH=/opt/llmpipe/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /home/llmpipe
# 50051: gRPC between stages; 8000: OpenAI API (stage 0), /healthz, /readyz, /metrics.
EXPOSE 50051 8000
ENTRYPOINT ["python", "-m", "llmpipe_stage"]
