# syntax=docker/dockerfile:1
#
# Two images from one file (docs/install.md):
#   docker build --target trainer  -t difftrain-trainer:VERSION .
#   docker build --target operator -t difftrain-operator:VERSION .
#
# The trainer runs `python -m difftrain.launch` (torchrun) as user 1000 on a read-only
# root filesystem: everything it writes goes to the pod's emptyDirs (/scratch, /cache,
# /tmp, /dev/shm). The operator runs `difftrain operator`. Neither holds a secret: S3
# credentials reach the trainer pods through secretKeyRef only.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG TORCH_VERSION=2.13.0
ARG TORCHVISION_VERSION=0.28.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

# The wheel of this project, built once for both images.
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS operator
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-cache-dir "$(ls /wheels/difftrain-*.whl)[operator]"
USER 1000:1000
EXPOSE 8080 8081
ENTRYPOINT ["difftrain", "operator"]

FROM ${CUDA_IMAGE} AS trainer
ARG TORCH_VERSION
ARG TORCHVISION_VERSION
ARG TORCH_INDEX
ENV DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    HF_HOME=/cache/huggingface \
    DIFFTRAIN_SCRATCH=/scratch \
    DIFFTRAIN_CACHE=/cache
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
# torch (and torchvision, which the FID's Inception needs) first, from the CUDA index:
# the trainer extra then finds them installed.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" \
    "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-cache-dir "$(ls /wheels/difftrain-*.whl)[trainer]"
# A numeric user, as the pods' securityContext runs it; no passwd entry is needed.
USER 1000:1000
WORKDIR /scratch
EXPOSE 9400 29500
CMD ["python", "-m", "difftrain.launch"]
