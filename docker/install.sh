#!/usr/bin/env bash
# Install the project and its runtime into a virtual environment. The Dockerfile runs this for
# the GPU worker image; CI runs it with --torch cpu to check the same steps on a CPU machine.
#
#   docker/install.sh --torch cuda --venv /opt/venv          # the image: CUDA PyTorch from PyPI
#   docker/install.sh --torch cpu --venv /tmp/venv --dev     # CI or a laptop (with the team stack's packages)
#   docker/install.sh --team ...                             # + the team stack's clients and servers (README)
#   docker/install.sh --deps-only ...                        # dependencies only (a cached image layer)
#
# TORCH_SPEC replaces the torch requirement; TORCH_INDEX_URL installs torch from that index
# (e.g. PyTorch's CPU wheel index, for a small CPU image).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${VIRTUAL_ENV:-$ROOT/.venv}"
TORCH=cuda
DEV=0
TEAM=0
DEPS_ONLY=0
PYTHON="${PYTHON:-python3}"

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) VENV="$2"; shift 2 ;;
    --torch) TORCH="$2"; shift 2 ;;
    --dev) DEV=1; shift ;;
    --team) TEAM=1; shift ;;
    --deps-only) DEPS_ONLY=1; shift ;;
    -h|--help) usage 0 ;;
    *) echo "install.sh: unknown option $1" >&2; usage 2 ;;
  esac
done

case "$TORCH" in
  # Same pins as the Makefile: 2.13.0 is the CPU wheel this project's CI machines carry; on PyPI
  # a plain Linux torch is the CUDA build, which bundles its CUDA runtime (the host needs a driver).
  cpu) TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"; EXTRAS="" ;;
  cuda) TORCH_SPEC="${TORCH_SPEC:-torch>=2.8,<2.15}"; EXTRAS="gpu" ;;
  *) echo "install.sh: --torch must be cpu or cuda, not $TORCH" >&2; exit 2 ;;
esac
# The tests run the team stack for real (PostgreSQL aside, which is a system package): its extras too.
[ "$DEV" = 1 ] && EXTRAS="${EXTRAS:+$EXTRAS,}dev,team,stack"
# The Triton kernels' tests run in triton's CPU interpreter; CUDA torch brings its own triton.
[ "$DEV" = 1 ] && [ "$TORCH" = cpu ] && EXTRAS="$EXTRAS,cpu-kernel-tests"
[ "$TEAM" = 1 ] && [ "$DEV" = 0 ] && EXTRAS="${EXTRAS:+$EXTRAS,}team"

step() { echo "install.sh: $*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade pip

step "installing $TORCH_SPEC"
"${PIP[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"

if [ "$DEPS_ONLY" = 1 ]; then
  # The dependencies pyproject.toml lists, without the project: a layer that survives code edits.
  step "installing the project's dependencies"
  "$VENV/bin/python" - "$ROOT/pyproject.toml" "$EXTRAS" > "$VENV/qlora-requirements.txt" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
extras = [e for e in sys.argv[2].split(",") if e]
print("\n".join(project["dependencies"] + [d for e in extras for d in project["optional-dependencies"][e]]))
PY
  "${PIP[@]}" -r "$VENV/qlora-requirements.txt"
  exit 0
fi

step "installing the project (editable: a checkout mounted over $ROOT is what runs)"
"${PIP[@]}" -e "$ROOT${EXTRAS:+[$EXTRAS]}"

step "checking the install"
(cd "$ROOT" && "$VENV/bin/python" - "$TORCH" <<'PY'
import sys
import bitsandbytes, dvc, mlflow, peft, prefect, torch, transformers  # noqa: F401
import flows.pipeline  # noqa: F401  (the flow a worker loads)
from qlora_pipeline.config import load_config

load_config("params.yaml")
wanted = sys.argv[1]
cuda_build = torch.version.cuda is not None
if wanted == "cuda" and not cuda_build:
    sys.exit(f"install.sh: torch {torch.__version__} is a CPU build; the GPU image needs a CUDA build")
print(f"install.sh: ok: torch {torch.__version__} ({'CUDA ' + torch.version.cuda if cuda_build else 'CPU'}), "
      f"prefect {prefect.__version__}, mlflow {mlflow.__version__}, dvc {dvc.__version__}", file=sys.stderr)
PY
)
"$VENV/bin/qlora" --help > /dev/null
