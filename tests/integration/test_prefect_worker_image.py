"""The GPU worker image's install steps, run as CI runs them: docker/install.sh with CPU torch.

No Docker engine is available here, so the image is not built; this runs the same script the
Dockerfile runs, in a fresh venv, against a copy of the project.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import REPO, project_files

pytestmark = pytest.mark.integration


def test_dockerfile_installs_with_the_script_ci_runs():
    dockerfile = (REPO / "Dockerfile").read_text()
    runs = re.findall(r"^RUN (docker/install\.sh .*?)(?: \\)?$", dockerfile, flags=re.M)
    assert runs == ["docker/install.sh --torch cuda --venv /opt/venv --deps-only", "docker/install.sh --torch cuda --venv /opt/venv"]
    assert re.search(r"^USER qlora$", dockerfile, flags=re.M)
    assert "HEALTHCHECK" in dockerfile


def test_install_script_builds_a_working_cpu_environment(tmp_path):
    project = tmp_path / "project"
    for rel in project_files():
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, project / rel)
    venv = tmp_path / "venv"
    out = subprocess.run(
        ["bash", "docker/install.sh", "--torch", "cpu", "--venv", str(venv)], cwd=project,
        capture_output=True, text=True, timeout=1500,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert "install.sh: ok: torch 2.13.0" in out.stderr and "(CPU)" in out.stderr
    # The worker image's entry points exist and answer.
    for cmd in (["qlora", "--help"], ["prefect", "worker", "start", "--help"], ["dvc", "--version"]):
        subprocess.run([str(venv / "bin" / cmd[0]), *cmd[1:]], cwd=project, capture_output=True, check=True, timeout=120)
    editable = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import qlora_pipeline, sys; print(qlora_pipeline.__file__)"],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert Path(editable).is_relative_to(project / "src")  # a checkout mounted over it is what runs
