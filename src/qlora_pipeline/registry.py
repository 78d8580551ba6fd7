"""The MLflow model registry: a training run's version, aliases, the promotion lock, promotion.

`champion` is the version people serve; `challenger` the newest registered one. Promotion moves
`champion` under a lock per model name (promotion_lock), so two registrations never both decide
against the same old champion.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from qlora_pipeline.errors import RegistryError

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"


def version_for_run(client, model_name: str, run_id: str):
    """The version already registered from this training run, if any (makes register idempotent)."""
    for mv in client.search_model_versions(f"name='{model_name}'"):
        if mv.tags.get("train_run_id") == run_id:
            return mv
    return None


def alias_version(client, model_name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None


PROMOTION_LOCK_TIMEOUT_S = 3600.0  # a registration waits this long for another one's decision


def promotion_lock_path(model_name: str) -> Path:
    """One lock file per registered model name for every project and store on this host.

    Keyed by the name alone: two stores holding the same name share a lock, which costs a wait,
    never a wrong decision. Set QLORA_LOCK_DIR to share it over a network file system.
    """
    import hashlib
    import tempfile

    folder = Path(os.environ.get("QLORA_LOCK_DIR") or Path(tempfile.gettempdir()) / "qlora-locks")
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"promote-{hashlib.sha256(model_name.encode()).hexdigest()[:16]}.lock"


@contextmanager
def promotion_lock(model_name: str, timeout_s: float = PROMOTION_LOCK_TIMEOUT_S) -> Iterator[None]:
    """Held from reading the champion to moving the alias, so no decision is made on a stale one.

    Raises:
        RegistryError: another registration held the lock for longer than timeout_s.
    """
    from filelock import FileLock, Timeout

    lock = FileLock(str(promotion_lock_path(model_name)))
    try:
        lock.acquire(timeout=1.0)
    except Timeout:
        log.info("waiting for another registration of %s to finish its promotion decision", model_name)
        try:
            lock.acquire(timeout=timeout_s)
        except Timeout:
            raise RegistryError(
                f"another registration of {model_name} held the promotion lock {lock.lock_file} for over "
                f"{timeout_s:.0f}s; if no qlora register is running, delete that file and run register again"
            ) from None
    try:
        yield
    finally:
        lock.release()


def promote(client, model_name: str, version: str, reason: str) -> None:
    """Point `champion` at version and record why on the version."""
    client.set_registered_model_alias(model_name, CHAMPION, version)
    client.set_model_version_tag(model_name, version, "promotion_reason", reason)
    client.set_model_version_tag(model_name, version, "promoted_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
