"""The GPU slot: a Prefect global concurrency limit, one slot per GPU host, that the GPU stages hold."""

from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from typing import Iterator

import httpx
from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

GPU_LIMIT_ENV = "QLORA_GPU_LIMIT"
# A held slot is a lease the run renews every 3/4 of this; when the run dies (a killed worker) the
# server takes the slot back once the lease lapses. Prefect's API takes 60 s at least.
GPU_LEASE_ENV = "QLORA_GPU_LEASE_S"
DEFAULT_GPU_LEASE_S = 300
# How long a stage waits for the GPU slot: 1.5 x the longest stage timeout (train, 48 h), so a
# queued run outwaits one whole training but not a slot that never comes free.
DEFAULT_SLOT_TIMEOUT_S = 72 * 3600


class SlotTimeout(TimeoutError):
    """A GPU stage waited slot_timeout_s for a slot of the GPU concurrency limit and got none."""


def gpu_limit_name() -> str:
    """One slot per GPU host: `gpu-<hostname>` unless QLORA_GPU_LIMIT names another limit."""
    return os.environ.get(GPU_LIMIT_ENV) or f"gpu-{socket.gethostname()}"


def ensure_limit(name: str, slots: int = 1) -> None:
    """Create the global concurrency limit if it does not exist (an existing one keeps its slots)."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
            except ObjectAlreadyExists:
                pass  # another run created it first


def gpu_lease_s() -> float:
    """Seconds a GPU slot outlives its run's last renewal (QLORA_GPU_LEASE_S, default 300, at least 60)."""
    return max(60.0, float(os.environ.get(GPU_LEASE_ENV) or DEFAULT_GPU_LEASE_S))


@contextmanager
def gpu_slot(name: str, stage: str, timeout_s: float = DEFAULT_SLOT_TIMEOUT_S, logger=None) -> Iterator[None]:
    """Hold one slot of the GPU limit for a stage; waiting here does not count against its timeout,
    and ends with SlotTimeout after timeout_s."""
    logger = logger or get_run_logger()
    lease_s = gpu_lease_s()
    logger.info("%s: waiting for a slot of concurrency limit %r (at most %.0fs)", stage, name, timeout_s)
    waited = time.monotonic()
    acquired = False
    try:
        # A renewal that fails (the server restarting) must not stop a training: the lease then
        # lapses at worst, and the server takes the slot back.
        with concurrency(name, occupy=1, timeout_seconds=timeout_s, lease_duration=lease_s, strict=True,
                         raise_on_lease_renewal_failure=False):
            acquired = True
            logger.info("%s: got the slot after %.0fs", stage, time.monotonic() - waited)
            yield
    except TimeoutError:
        if acquired:
            raise  # the stage's own timeout
        raise SlotTimeout(_slot_timeout_message(name, stage, timeout_s, lease_s)) from None


def _slot_timeout_message(name: str, stage: str, timeout_s: float, lease_s: float) -> str:
    try:
        with get_client(sync_client=True) as client:
            limit = client.read_global_concurrency_limit_by_name(name)
        held = f"; {limit.active_slots} of its {limit.limit} slot(s) are held"
    except (httpx.HTTPError, ObjectNotFound):
        held = ""
    return (
        f"{stage}: no slot of concurrency limit {name!r} came free within {timeout_s:.0f}s (slot_timeout_s){held}. "
        f"Another run is using the GPU, or a run that died still holds its slot until its lease lapses "
        f"({lease_s:.0f}s after its last renewal); see Concurrency in the UI or `prefect gcl inspect {name}`."
    )
