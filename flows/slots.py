"""The GPU slots: a Prefect global concurrency limit per GPU host, one slot per GPU, that the GPU
stages hold: a training on N ranks (train.num_gpus) holds N slots, evaluate and register one."""

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


def host_gpus() -> int:
    """The GPUs this worker sees (CUDA_VISIBLE_DEVICES applies); 0 on a host without one."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def slots_for(stage: str, num_gpus: int | str, host: int) -> int:
    """Slots of the host's GPU limit a stage holds: train.num_gpus for train (auto: every GPU the
    worker sees), one for the other GPU stages, and one on a host without a GPU (host 0: its
    ranks are CPU processes; the limit then has one slot).

    Raises:
        ValueError: the training wants more GPUs than the host's limit has slots; it would wait forever.
    """
    if stage != "train" or host == 0:
        return 1
    wanted = host if num_gpus == "auto" else int(num_gpus)
    if wanted > host:
        raise ValueError(
            f"train.num_gpus is {wanted} but this worker sees {host} GPU(s); run it on a worker with {wanted} GPUs "
            "(CUDA_VISIBLE_DEVICES), or set train.num_gpus to auto or at most the GPUs a worker has"
        )
    return wanted


def ensure_limit(name: str, slots: int = 1) -> None:
    """Create the global concurrency limit if it does not exist (an existing one keeps its slots);
    slots: one per GPU of the host (host_gpus)."""
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
def gpu_slot(name: str, stage: str, timeout_s: float = DEFAULT_SLOT_TIMEOUT_S, logger=None, occupy: int = 1) -> Iterator[None]:
    """Hold `occupy` slots (GPUs) of the GPU limit for a stage; waiting here does not count against
    its timeout, and ends with SlotTimeout after timeout_s."""
    logger = logger or get_run_logger()
    lease_s = gpu_lease_s()
    logger.info("%s: waiting for %d slot(s) of concurrency limit %r (at most %.0fs)", stage, occupy, name, timeout_s)
    waited = time.monotonic()
    acquired = False
    try:
        # A renewal that fails (the server restarting) must not stop a training: the lease then
        # lapses at worst, and the server takes the slot back.
        with concurrency(name, occupy=occupy, timeout_seconds=timeout_s, lease_duration=lease_s, strict=True,
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
