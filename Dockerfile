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

# Layers: each image's dependencies (torch alone is gigabytes) are installed in a layer that
# depends only on the dependency lists and the pins, never on the sources: a source change
# rebuilds a wheel of llmpipe and one small layer installing it with --no-deps, and reuses the
# dependency layer from the build cache (docker build, buildah bud --layers).

# ---------------------------------------------------------------------------------------
# requirements: pyproject.toml's dependency lists, one file per image. Only their content
# goes on to the dependency layers, so editing pyproject.toml elsewhere (tool settings)
# rebuilds nothing heavy.
FROM ${PYTHON_IMAGE} AS requirements
WORKDIR /src
COPY pyproject.toml constraints.txt ./
RUN mkdir /requirements \
 && cp constraints.txt /requirements/ \
 && python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
[open(f"/requirements/{x}.txt", "w").write("\n".join(p["dependencies"] + p["optional-dependencies"][x]) + "\n") for x in ("operator", "stage")]'

# ---------------------------------------------------------------------------------------
# wheel: llmpipe itself, pure Python (one wheel for both images; any Python >= 3.11).
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The build backend (pyproject.toml's build-system) in a layer of its own: a source change
# neither creates the venv nor downloads setuptools again.
RUN python3 -m venv /tmp/build \
 && /tmp/build/bin/pip install setuptools==84.2.1 wheel==0.48.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY llmpipe_cli ./llmpipe_cli
COPY llmpipe_common ./llmpipe_common
COPY operator ./operator
COPY stage_image ./stage_image
RUN /tmp/build/bin/pip wheel --no-build-isolation --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------
# operator-deps: the user, and a venv with the operator's dependencies (no torch), pinned by
# constraints.txt.
FROM ${PYTHON_IMAGE} AS operator-deps
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 llmpipe \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/llmpipe --create-home \
      --shell /usr/sbin/nologin llmpipe
COPY --from=requirements /requirements/operator.txt /requirements/constraints.txt /opt/llmpipe-requirements/
RUN python -m venv /opt/llmpipe \
 && /opt/llmpipe/bin/pip install -c /opt/llmpipe-requirements/constraints.txt \
      -r /opt/llmpipe-requirements/operator.txt

# ---------------------------------------------------------------------------------------
# operator: what the Helm chart deploys (`python -m llmpipe_operator ...`).
FROM operator-deps AS operator
LABEL org.opencontainers.image.title="llmpipe-operator" \
      org.opencontainers.image.description="llmpipe operator: plans and deploys LLMPipeline stages" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=wheel /wheels /tmp/wheels
RUN /opt/llmpipe/bin/pip install --no-index --no-deps /tmp/wheels/*.whl \
 && rm -rf /tmp/wheels
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
# stage-deps: the user, and a venv with torch from TORCH_INDEX_URL, then the stage's other
# dependencies from PyPI (pinned by constraints.txt). The gigabytes of the image, built once.
FROM stage-base AS stage-deps
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 llmpipe \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/llmpipe --create-home \
      --shell /usr/sbin/nologin llmpipe
COPY --from=requirements /requirements/stage.txt /requirements/constraints.txt /opt/llmpipe-requirements/
# torch first, from its own index: the version comes from constraints.txt (2.9.1 matches the
# index's 2.9.1+cpu), and the second install then keeps it instead of pulling PyPI's CUDA build.
RUN python3 -m venv /opt/llmpipe \
 && torch_pin=$(grep -E '^torch==' /opt/llmpipe-requirements/constraints.txt) \
 && /opt/llmpipe/bin/pip install --index-url "${TORCH_INDEX_URL}" "${torch_pin}" \
 && /opt/llmpipe/bin/pip install -c /opt/llmpipe-requirements/constraints.txt \
      -r /opt/llmpipe-requirements/stage.txt

# ---------------------------------------------------------------------------------------
# stage-kernel: llmpipe's decode product kernel (stage_image/llmpipe_stage/kernels), compiled
# here with g++ and ninja so that the stage image carries the library and no compiler (about
# 200 MB of toolchain kept out of it). The library's name hashes its source, torch's version
# and the flags, so it matches the torch of stage-deps exactly; it needs AVX-512 + AVX512_BF16
# only where it runs (a stage on another CPU logs that and runs torch's products). On arm64
# nothing is built.
FROM stage-deps AS stage-kernel
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++ ninja-build \
 && rm -rf /var/lib/apt/lists/*
COPY --from=wheel /wheels /tmp/wheels
RUN /opt/llmpipe/bin/pip install --no-index --no-deps /tmp/wheels/*.whl \
 && mkdir -p /opt/llmpipe-kernels \
 && /opt/llmpipe/bin/python -m llmpipe_stage.kernels --build /opt/llmpipe-kernels \
 && rm -rf /opt/llmpipe-kernels/*.build

# ---------------------------------------------------------------------------------------
# stage: one pipeline stage (`python -m llmpipe_stage --config-dir ... --stage-index N ...`).
FROM stage-deps AS stage
LABEL org.opencontainers.image.title="llmpipe-stage" \
      org.opencontainers.image.description="llmpipe stage runtime: a slice of a model's layers behind gRPC (and the OpenAI API on stage 0)" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=wheel /wheels /tmp/wheels
RUN /opt/llmpipe/bin/pip install --no-index --no-deps /tmp/wheels/*.whl \
 && rm -rf /tmp/wheels
COPY --from=stage-kernel /opt/llmpipe-kernels /opt/llmpipe-kernels
ENV PATH=/opt/llmpipe/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LLMPIPE_KERNEL_DIR=/opt/llmpipe-kernels
USER 10001:10001
WORKDIR /home/llmpipe
# 50051: gRPC between stages; 8000: OpenAI API (stage 0), /healthz, /readyz, /metrics.
EXPOSE 50051 8000
ENTRYPOINT ["python", "-m", "llmpipe_stage"]
