# syntax=docker/dockerfile:1
# kubetune's two images, one per target:
#
#   docker build --target operator -t ghcr.io/kubetune/operator:0.1.0 .   # kopf operator: no torch
#   docker build --target trainer  -t ghcr.io/kubetune/trainer:0.1.0 .    # training and serving pods
#
# Both install the project with the versions pinned in constraints.txt into a virtual environment in
# a build stage and copy only that environment into the final stage: no compilers, no sources, no
# pip cache. Both run as the unprivileged user 1000, the UID the operator gives training pods.

# ----------------------------------------------------------------------------------------- base
# Python 3.11: the version constraints.txt is locked on and CI runs.
FROM python:3.11-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/kubetune \
    PATH=/opt/kubetune/bin:$PATH
RUN groupadd --gid 1000 kubetune \
    && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin kubetune

# -------------------------------------------------------------------------------------- sources
# What `pip install .` needs: the metadata (pyproject.toml names README.md as the readme), the pins,
# and the five package folders setuptools looks in.
FROM base AS sources
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY api/ api/
COPY operator/ operator/
COPY trainer/ trainer/
COPY local/ local/
COPY cli/ cli/

# ----------------------------------------------------------------------------------- operator
FROM sources AS operator-build
# The operator extra only (kopf, the Kubernetes client, prometheus-client): the operator imports
# the torch-free kubetune_api and nothing of the trainer, so the image carries no ML stack.
RUN python -m venv /opt/kubetune \
    && pip install --no-cache-dir --constraint constraints.txt ".[operator]"

FROM base AS operator
COPY --from=operator-build /opt/kubetune /opt/kubetune
USER 1000:1000
WORKDIR /home/kubetune
# 8080: Prometheus metrics (--metrics-port); 8081: kopf's /healthz (the liveness probe).
EXPOSE 8080 8081
ENTRYPOINT ["kubetune"]
CMD ["operator"]

# ------------------------------------------------------------------------------------ trainer
FROM sources AS trainer-build
# torch from PyPI is the CUDA build: its wheels bring the CUDA runtime, cuBLAS, cuDNN and NCCL
# (the nvidia-* and cuda-toolkit pins in constraints.txt), and it trains on CPUs with gloo too.
RUN python -m venv /opt/kubetune \
    && pip install --no-cache-dir --constraint constraints.txt ".[trainer]"

# The CUDA user-space libraries come with torch's wheels (above), so the base is the same slim
# Python as the operator's rather than an nvidia/cuda image, which would add a second copy of them
# and a different Python (Ubuntu's 3.10 or 3.12) from the 3.11 the pins are locked on. The driver
# (libcuda) comes from the GPU node through the NVIDIA container toolkit, which reads these
# variables, the ones nvidia/cuda images set; the requirement refuses a node whose driver is older
# than CUDA 13 with a clear error instead of a failure inside torch.
FROM base AS trainer
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NVIDIA_REQUIRE_CUDA="cuda>=13.0" \
    HF_HOME=/home/kubetune/.cache/huggingface
COPY --from=trainer-build /opt/kubetune /opt/kubetune
USER 1000:1000
WORKDIR /home/kubetune
# The operator sets the command of every training pod (`kubetune train --config ...`) and serving
# pod (`kubetune serve ...`); on its own the image prints what it can do.
ENTRYPOINT ["kubetune"]
CMD ["--help"]
