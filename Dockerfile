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
FROM python:3.11-slim-bookworm

ARG QLORA_UID=1000
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
RUN apt-get update \
    && apt-get install -y --no-install-recommends git tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid "${QLORA_UID}" qlora \
    && install -d -o qlora -g qlora /opt/venv /opt/qlora

USER qlora
WORKDIR /opt/qlora

# Dependencies first: this layer is rebuilt only when pyproject.toml or the installer changes.
COPY --chown=qlora:qlora pyproject.toml README.md ./
COPY --chown=qlora:qlora docker/install.sh docker/install.sh
RUN docker/install.sh --torch cuda --venv /opt/venv --team --deps-only

COPY --chown=qlora:qlora . .
RUN docker/install.sh --torch cuda --venv /opt/venv --team \
    && git config --global --add safe.directory /opt/qlora

HEALTHCHECK --interval=60s --timeout=10s --start-period=60s --retries=3 CMD ["/opt/qlora/docker/healthcheck.sh"]
ENTRYPOINT ["tini", "--"]
CMD ["prefect", "worker", "start", "--pool", "gpu", "--type", "process", "--with-healthcheck"]
