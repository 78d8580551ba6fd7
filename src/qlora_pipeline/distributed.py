"""Several ranks for one training: torchrun's processes, data-parallel (DDP) or sharded (FSDP2)
through the Trainer and accelerate.

    train:
      num_gpus: auto      # every visible GPU; or a number. Without a GPU, N > 1 runs N CPU ranks (gloo)
      distributed: auto   # ddp | fsdp | auto: ddp when the model and its smallest plan fit one GPU

`qlora train` (so `dvc repro` and the Prefect task too) relaunches itself under torchrun when the
run wants more than one rank. The launching process validates params, warms the model cache and
holds the checkpoint lock while the ranks train; a rank's failure ends the whole job (torchrun stops
the others) and comes back as one error that names that rank and its message.

The global batch is per_device_batch_size x gradient_accumulation_steps whatever the number of
ranks: each rank accumulates gradient_accumulation_steps / N micro-batches, and the Trainer's
DataLoader (accelerate) hands rank r micro-batches r, r+N, ... of the same shuffled order. So more
GPUs give the same optimizer steps faster, and a run resumed on another number of GPUs keeps its
batch. Rank 0 alone logs to MLflow, prints progress and writes outputs; the Trainer saves the
checkpoint's shared files from rank 0 and each rank's RNG state.

FSDP2 (strategy "fsdp") keeps 1/N of each decoder layer's 4-bit weights, LoRA weights and optimizer
state on each GPU and gathers a layer while it runs (accelerate's fsdp2_prepare_model, one unit per
decoder layer). The 4-bit weights must then be stored in the compute dtype (quant_storage); every
checkpoint still holds the full adapter as safetensors, gathered on rank 0.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from qlora_pipeline.errors import ConfigError, DistributedError

if TYPE_CHECKING:
    from qlora_pipeline.config import TrainConfig

log = logging.getLogger(__name__)

RANK_ERRORS_ENV = "QLORA_RANK_ERRORS"  # a folder where a failing rank leaves its error
STRATEGY_ENV = "QLORA_STRATEGY"  # the launching process's choice of ddp or fsdp, which the ranks follow
STOP_GRACE_S = 30.0


def launched() -> bool:
    """True inside a rank that torchrun started for a run of more than one rank."""
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    """This process's global rank; 0 outside torchrun."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if launched() else 0


def is_main() -> bool:
    """Rank 0, or the only process: the one that logs, prints and writes outputs."""
    return rank() == 0


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def world_size(cfg: TrainConfig) -> int:
    """How many ranks train: train.num_gpus resolved for this machine.

    auto: every visible GPU (1 on a machine without one). N: N ranks, each on a GPU of its own, or
    on a machine without a GPU N CPU ranks (gloo), which is how the CPU tests run several ranks.

    Raises:
        ConfigError: N is more than the GPUs visible, or gradient_accumulation_steps is not a
            multiple of the number of ranks (the global batch must divide among them).
    """
    visible = visible_gpus()
    ranks = max(1, visible) if cfg.num_gpus == "auto" else int(cfg.num_gpus)
    if visible and ranks > visible:
        raise ConfigError(
            f"train.num_gpus is {ranks} but {visible} GPU(s) are visible (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); set train.num_gpus to auto or at most {visible}"
        )
    if ranks > 1 and cfg.gradient_accumulation_steps % ranks:
        fits = (cfg.gradient_accumulation_steps // ranks + 1) * ranks
        raise ConfigError(
            f"train.gradient_accumulation_steps ({cfg.gradient_accumulation_steps}) must be a multiple of the number of "
            f"ranks ({ranks}): the global batch (per_device_batch_size x gradient_accumulation_steps) is divided among "
            f"them; set it to {fits}, or train.num_gpus to a divisor of it"
        )
    return ranks


def strategy(cfg: TrainConfig, ranks: int, fits_one_gpu: Callable[[], bool] = lambda: True) -> str:
    """How `ranks` ranks share the training: "single" (one rank), "ddp" or "fsdp".

    train.distributed auto: ddp when fits_one_gpu() (the whole model and the smallest training plan
    fit one GPU's memory budget), fsdp otherwise; ddp on CPU ranks. Inside a rank, the launching
    process's choice (STRATEGY_ENV).

    Raises:
        ConfigError: fsdp asked for on a machine without CUDA GPUs (accelerate runs FSDP on CUDA only),
            or where only one rank would train (nothing to shard across).
    """
    on_gpu = visible_gpus() > 0
    if ranks <= 1 and cfg.distributed == "fsdp" and on_gpu:
        raise ConfigError(
            f"train.distributed is fsdp but one rank would train (train.num_gpus {cfg.num_gpus}, {visible_gpus()} GPU(s) "
            "visible): FSDP shards the model across several GPUs; set train.distributed to auto or ddp here, or run "
            "where two or more GPUs are visible"
        )
    if ranks <= 1 and cfg.distributed != "fsdp":
        return "single"
    if launched() and os.environ.get(STRATEGY_ENV) in ("ddp", "fsdp"):
        return os.environ[STRATEGY_ENV]
    if cfg.distributed == "fsdp":
        if not on_gpu:
            raise ConfigError(
                "train.distributed is fsdp but no CUDA GPU is visible: FSDP runs on CUDA GPUs only (accelerate runs "
                "CPU ranks as plain data-parallel); set train.distributed to ddp or auto on this machine"
            )
        return "fsdp"
    if cfg.distributed == "ddp" or not on_gpu:
        return "ddp"
    return "ddp" if fits_one_gpu() else "fsdp"


def per_rank(cfg: TrainConfig, ranks: int) -> TrainConfig:
    """The train config one of `ranks` ranks trains with: its share of the accumulation steps."""
    if ranks <= 1:
        return cfg
    return cfg.model_copy(update={"gradient_accumulation_steps": cfg.gradient_accumulation_steps // ranks})


def setup_rank() -> None:
    """In a rank: its own GPU (before any model is loaded), quieter logs on ranks other than 0."""
    if not launched():
        return
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    if not is_main():
        logging.getLogger().setLevel(logging.WARNING)


def record_failure(exc: BaseException) -> None:
    """In a rank: leave this rank's error where the launching process reads it (RANK_ERRORS_ENV)."""
    folder = os.environ.get(RANK_ERRORS_ENV)
    if not launched() or not folder:
        return
    # SIGTERM from torchrun after another rank failed, or a collective that broke because a peer died
    stopped = isinstance(exc, KeyboardInterrupt) or lost_peer(exc)
    message = str(exc).strip() or type(exc).__name__
    if not stopped and not message.startswith(type(exc).__name__) and not hasattr(exc, "exit_code"):
        message = f"{type(exc).__name__}: {message}"
    path = Path(folder) / f"rank{rank()}.json"
    path.write_text(json.dumps({"rank": rank(), "time": time.time(), "stopped": stopped, "message": message}))


PEER_LOST = (
    "Connection reset by peer", "Connection closed by peer", "Broken pipe", "remote process exited",
    "NCCL communicator was aborted", "Socket Timeout", "Timed out waiting",
)


def lost_peer(exc: BaseException) -> bool:
    """True for a gloo / NCCL error that only says another rank went away (not this rank's fault)."""
    text = str(exc)
    return any(marker in text for marker in PEER_LOST)


def failure_message(folder: Path, ranks: int, exit_code: int) -> str:
    """Which rank failed and why, from what the ranks left in folder (record_failure).

    The first rank to fail on its own is named with its message. A rank that left nothing died
    without running any handler (SIGKILL, the kernel's OOM killer, a crash in native code) and is
    named as such; the others only report that torchrun stopped them.
    """
    reports = []
    for path in folder.glob("rank*.json"):
        try:
            reports.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    failed = [r for r in reports if not r["stopped"]]
    if failed:
        first = min(failed, key=lambda r: r["time"])
        return f"rank {first['rank']} of {ranks} failed: {first['message']}"
    silent = sorted(set(range(ranks)) - {r["rank"] for r in reports})
    if silent:
        which = ", ".join(str(r) for r in silent)
        return (
            f"rank {which} of {ranks} ended without an error of its own (killed by a signal such as SIGKILL, the "
            f"out-of-memory killer, or a crash in native code; torchrun exit code {exit_code}); torchrun stopped the "
            "others. Run the stage again: it resumes from the last complete checkpoint"
        )
    return f"training on {ranks} ranks was stopped (torchrun exit code {exit_code}); run the stage again to resume"


def launch(argv: list[str], ranks: int, cwd: Path, how: str = "ddp") -> None:
    """Run `qlora <argv>` as `ranks` ranks under torchrun on this host and wait for them; `how`
    (strategy's ddp or fsdp) is passed to the ranks.

    Raises:
        DistributedError: a rank failed (its message, or torchrun's exit code when none was left).
        KeyboardInterrupt: this process was interrupted; the ranks were stopped first.
    """
    with tempfile.TemporaryDirectory(prefix="qlora-ranks-") as folder:
        env = {**os.environ, RANK_ERRORS_ENV: folder, STRATEGY_ENV: how}
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
            "--module", "qlora_pipeline.cli", *argv,
        ]
        log.info("training on %d ranks (%s, %s)", ranks, "GPUs" if visible_gpus() else "CPU processes, gloo", how)
        proc = subprocess.Popen(command, cwd=cwd, env=env)
        try:
            code = proc.wait()
        except BaseException:
            _stop(proc)
            raise
        if code != 0:
            raise DistributedError(failure_message(Path(folder), ranks, code))


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM torchrun (it stops its ranks), then SIGKILL after STOP_GRACE_S."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
