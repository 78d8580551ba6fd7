# syntax=docker/dockerfile:1
# The GPU worker image: CUDA PyTorch (from PyPI; the host needs an NVIDIA driver and the NVIDIA
# Container Toolkit), the project installed editable at /opt/qlora, a non-root user.
#
#   docker build -t qlora-worker:latest .
#   docker build --build-arg QLORA_UID=$(id -u) -t qlora-worker:latest .   # to write a mounted checkout
#
# As a process worker on a GPU box (flow runs are subprocesses of this container):
#   docker run -d --gpus all --network host -e PREFECT_API_URL=http://127.0.0.1:4200/api \
#     -v /srv/qlora:/opt/qlora qlora-worker:latest
# As the image of a Docker work pool (one container per flow run): docs/prefect.md.
# The install steps are docker/install.sh, which CI also runs (with --torch cpu). --team adds the
# team stack's packages (PostgreSQL and S3 clients, MLflow basic auth, dvc-s3): docker/compose.yaml
# runs the MLflow server from this image too.
#
# BASE_IMAGE: any Debian bookworm with Python 3.11 and its venv module (docker/base-image.sh makes
# one with debootstrap where no registry is reachable). TORCH=cpu (with TORCH_SPEC or
# TORCH_INDEX_URL, see docker/install.sh) builds a CPU image to check the build: `make image`.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG QLORA_UID=1000
ARG TORCH=cuda
ARG TORCH_SPEC
ARG TORCH_INDEX_URL
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PREFECT_HOME=/opt/qlora/.prefect \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1 \
    HF_HOME=/home/qlora/.cache/huggingface

# git: DVC and the per-run worktrees; tini: PID 1 that forwards signals and reaps children.
# ~/.cache/huggingface exists, the user's: a volume mounted there (docker/compose.yaml, the Docker
# pool's job variables) starts with its owner, where the engine would make it, and ~/.cache, root's.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid "${QLORA_UID}" qlora \
    && install -d -o qlora -g qlora /opt/venv /opt/qlora /home/qlora/.cache /home/qlora/.cache/huggingface

USER qlora
WORKDIR /opt/qlora

# Dependencies first: this layer is rebuilt only when pyproject.toml or the installer changes.
COPY --chown=qlora:qlora pyproject.toml README.md ./
COPY --chown=qlora:qlora docker/install.sh docker/install.sh
RUN docker/install.sh --torch "${TORCH}" --venv /opt/venv --team --deps-only

COPY --chown=qlora:qlora . .
RUN docker/install.sh --torch "${TORCH}" --venv /opt/venv --team \
    && git config --global --add safe.directory /opt/qlora

HEALTHCHECK --interval=60s --timeout=10s --start-period=60s --retries=3 CMD ["/opt/qlora/docker/healthcheck.sh"]
ENTRYPOINT ["tini", "--"]
CMD ["prefect", "worker", "start", "--pool", "gpu", "--type", "process", "--with-healthcheck"]
