"""Credentials out of what a flow run shows: URIs in log lines, artifacts and messages.

    redact("View run at: http://user:secret@mlflow:5000/#/runs/1")   # 'View run at: http://***@mlflow:5000/#/runs/1'

`MLFLOW_TRACKING_URI=https://user:password@host` is how MLflow takes basic-auth credentials, and a
stage prints its tracking URI (MLflow's "View run at" line); everything a flow run logs or publishes
goes to the Prefect server's database and the worker's log, so it passes through here first.
"""

from __future__ import annotations

import re

MASK = "***"
# scheme://userinfo@ : the user name too, since a token is often passed as one (https://TOKEN@host)
_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@?#]+@")
# ?password=...&token=... in a query string
_SECRET_PARAMS = re.compile(
    r"([?&;](?:password|passwd|pwd|token|access_token|auth_token|api_key|apikey|secret|sig|signature)=)[^&;#\s]+",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """The text with the credentials of every URI in it masked: `user:secret@` -> `***@`, `token=x` -> `token=***`."""
    return _SECRET_PARAMS.sub(rf"\1{MASK}", _USERINFO.sub(rf"\1{MASK}@", text))
