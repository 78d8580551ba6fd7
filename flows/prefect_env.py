"""The Prefect settings every entry point sets before it imports prefect (it reads them once, then).

Flow runs send a heartbeat every HEARTBEAT_S; the automation `flows.deploy` creates marks a run of
the pipeline Crashed when CRASHED_AFTER_S pass without one (its worker or process was killed). A
flow-run process started elsewhere must send them as often: scripts/prefect-worker.sh and the
deployments' job variables set PREFECT_FLOWS_HEARTBEAT_FREQUENCY to it.
"""

from __future__ import annotations

import os
from pathlib import Path

HEARTBEAT_S = 30  # the least Prefect sends them at
CRASHED_AFTER_S = 3 * HEARTBEAT_S  # three heartbeats missed
HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"


def apply(project: Path) -> None:
    """State in the project's .prefect/, no usage data sent, heartbeats as the crash automation expects."""
    os.environ.setdefault("PREFECT_HOME", str(project / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault(HEARTBEAT_ENV, str(HEARTBEAT_S))
