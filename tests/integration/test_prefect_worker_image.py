"""The GPU worker image installs with docker/install.sh, the script `make setup` (and so CI) runs
with CPU torch. Building the image takes minutes and a container engine, so the suite does not:
`make image` does (docs/prefect.md, "Building the image")."""

from __future__ import annotations

import re

import pytest

from .conftest import REPO

pytestmark = pytest.mark.integration


def test_dockerfile_installs_with_the_script_ci_runs():
    dockerfile = (REPO / "Dockerfile").read_text()
    runs = re.findall(r"^RUN (docker/install\.sh .*?)(?: \\)?$", dockerfile, flags=re.M)
    assert runs == ['docker/install.sh --torch "${TORCH}" --venv /opt/venv --team --deps-only',
                    'docker/install.sh --torch "${TORCH}" --venv /opt/venv --team']
    assert re.search(r"^ARG TORCH=cuda$", dockerfile, flags=re.M)  # the GPU image unless told otherwise
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim-bookworm$", dockerfile, flags=re.M)
    assert re.search(r"^USER qlora$", dockerfile, flags=re.M)
    assert "HEALTHCHECK" in dockerfile
