"""The GPU worker image installs with docker/install.sh, the script `make setup` (and so CI) runs
with CPU torch. No Docker engine is available here, so the image itself is not built."""

from __future__ import annotations

import re

import pytest

from .conftest import REPO

pytestmark = pytest.mark.integration


def test_dockerfile_installs_with_the_script_ci_runs():
    dockerfile = (REPO / "Dockerfile").read_text()
    runs = re.findall(r"^RUN (docker/install\.sh .*?)(?: \\)?$", dockerfile, flags=re.M)
    assert runs == ["docker/install.sh --torch cuda --venv /opt/venv --team --deps-only",
                    "docker/install.sh --torch cuda --venv /opt/venv --team"]
    assert re.search(r"^USER qlora$", dockerfile, flags=re.M)
    assert "HEALTHCHECK" in dockerfile
