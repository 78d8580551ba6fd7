"""train: 4-bit NF4 base + LoRA, trained with the transformers Trainer, tracked in MLflow.

    qlora train              # as `dvc repro train` runs it

Checkpoints go to checkpoints/<key>/, keyed by everything that shapes the run (params and the
prepared data), outside DVC's outputs: a killed run resumes from the last complete checkpoint,
and logs into the same MLflow run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlflow
from transformers import set_seed

from qlora_pipeline import distributed, tracking
from qlora_pipeline.atomic import atomic_dir, write_json_atomic
from qlora_pipeline.errors import DistributedError
from qlora_pipeline.core.data.collate import make_collator
from qlora_pipeline.core.data.store import load_prepared
from qlora_pipeline.core.model import apply_lora, base_config, base_model_revision, load_base_model, resolve_compute_dtype, resolve_model
from qlora_pipeline.core.fast.memory import ModelDims, leanest_plan_bytes
from qlora_pipeline.core.fast.graph_blockers import refuse_before_loading
from qlora_pipeline.core.fast.options import GIB, resolve_options
from qlora_pipeline.core.train import train_adapter
from qlora_pipeline.plots import loss_figure, save_png
from qlora_pipeline.stages.common import StageContext, base_tokenizer, write_csv_atomic

log = logging.getLogger(__name__)

LOSS_PLOT_FIELDS = ["step", "loss", "learning_rate", "grad_norm", "tokens_per_second"]
EVAL_PLOT_FIELDS = ["step", "eval_loss"]


def checkpoint_key(ctx: StageContext) -> str:
    """Same params and same prepared data -> same key -> resume; anything else starts afresh."""
    cfg = ctx.cfg
    shaping = {k: cfg.model_dump(mode="json")[k] for k in ("model", "quantization", "lora", "train")}
    shaping["data"] = {"packing": cfg.data.packing, "max_seq_len": cfg.data.max_seq_len}
    digest = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode())
    for name in ("train.parquet", "stats.json"):
        path = ctx.paths.prepared / name
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


FINISHED = "finished.json"  # in a checkpoint folder: its training saved its adapter
PLAN = "plan.json"  # in a checkpoint folder: the plan its training ran with (micro-batch, recompute, ...)


@contextmanager
def one_training_per_checkpoint(checkpoint_dir: Path) -> Iterator[None]:
    """Hold `<checkpoint_dir>.lock` while training into checkpoint_dir.

    Two runs with the same params share a checkpoint key: without the lock the second resumes
    from the first's checkpoints, both log into one MLflow run, and whichever ends first deletes
    the folder under the other. The second waits, then trains on its own: the checkpoints the
    first kept for its own rerun (release_checkpoints) are cleared first.
    """
    from filelock import FileLock, Timeout

    checkpoint_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(checkpoint_dir) + ".lock")
    try:
        lock.acquire(timeout=1.0)
        waited = False
    except Timeout:
        log.info("another training with the same params holds %s; waiting for it to finish", lock.lock_file)
        lock.acquire()
        waited = True
    try:
        if waited and (checkpoint_dir / FINISHED).is_file():
            shutil.rmtree(checkpoint_dir)
        yield
    finally:
        lock.release()


def _previous_run_id(checkpoint_dir: Path) -> str | None:
    info = checkpoint_dir / "mlflow_run.json"
    if any(checkpoint_dir.glob("checkpoint-*")) and info.is_file():
        return json.loads(info.read_text())["run_id"]
    return None


def _name_after_this_attempt(run, tags: dict[str, str]) -> None:
    """A resumed run finishes under the experiment (or flow run) that resumed it: its name and
    lineage tags become this attempt's, the killed attempt's name is kept as previous_run_name."""
    previous = run.info.run_name
    name = tracking.run_name(previous)
    if name != previous:
        mlflow.set_tags({"mlflow.runName": name, "previous_run_name": previous})
    mlflow.set_tags(tags)


def _record_rank_failure(checkpoint_dir: Path, message: str) -> None:
    """The failed ranks' cause on the training's MLflow run (`failure_reason`), where rank 0 left
    only what it saw, such as a connection reset by the rank that died; the run FAILED if rank 0
    could not end it."""
    info = checkpoint_dir / "mlflow_run.json"
    if not info.is_file():
        return
    try:
        from mlflow import MlflowClient

        run_id = json.loads(info.read_text())["run_id"]
        client = MlflowClient()
        client.set_tag(run_id, "failure_reason", message[:4000])
        client.set_tag(run_id, "stage.train.failure_reason", message[:4000])
        # Rank 0 ends its run when torchrun stops it; if it was killed before it could, end it here.
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "FAILED")
    except Exception as exc:  # noqa: BLE001 - the rank's error is the one to report
        log.warning("could not record the failure on the MLflow run (%s)", str(exc).splitlines()[0][:200])


def _fits_one_gpu(ctx: StageContext, resolved, budget_gib: float | None) -> bool:
    """Whether the base model and the leanest training plan fit one GPU's memory budget
    (train.distributed auto picks FSDP when they do not)."""
    quant = ctx.cfg.quantization
    config = base_config(ctx.cfg.model, resolved)
    element_bytes = resolve_compute_dtype(quant.compute_dtype).itemsize
    bits = (4.127 if quant.double_quant else 4.5) if quant.load_in_4bit else 8.5 if quant.load_in_8bit else 8.0 * element_bytes
    need = leanest_plan_bytes(
        ModelDims.from_config(config), ctx.cfg.data.max_seq_len, weight_bits=bits,
        tied=bool(getattr(config, "tie_word_embeddings", False)), lora_r=ctx.cfg.lora.r, element_bytes=element_bytes,
    )
    fits = budget_gib is None or need <= budget_gib * GIB
    log.info("the leanest plan on one GPU needs %.1f GiB of %s: %s", need / GIB, f"{budget_gib:.1f} GiB" if budget_gib else "no limit",
             "data-parallel (ddp)" if fits else "sharded (fsdp)")
    return fits


def run(ctx: StageContext) -> dict:
    """Train the adapter; on several ranks (train.num_gpus), relaunch under torchrun and wait.

    Raises:
        ConfigError: a fast-path switch this machine lacks, more GPUs than visible, accumulation
            steps that do not divide among the ranks.
        DistributedError: a rank of a training on several ranks failed.
    """
    cfg, paths = ctx.cfg, ctx.paths
    ranks = distributed.world_size(cfg.train)  # fail before loading anything big
    main = distributed.is_main()
    experiment_id = tracking.setup(paths, cfg.tracking.experiment) if main else None
    options = resolve_options(cfg.train)  # a fast-path switch forced on where this machine lacks it fails here
    how = distributed.strategy(  # fsdp where it cannot run fails here
        cfg.train, ranks, lambda: _fits_one_gpu(ctx, resolve_model(cfg.model, paths.cache, paths.root), options.memory_budget_gib)
    )
    resolved, tokenizer = base_tokenizer(ctx)  # also fills the model cache before the ranks read it
    if cfg.train.cuda_graphs is True and options.cuda_graphs:  # a model type the graphs cannot run: refused before loading
        refuse_before_loading(True, base_config(cfg.model, resolved))
    sharded = how == "fsdp"
    checkpoint_dir = paths.checkpoints / checkpoint_key(ctx)
    if ranks > 1 and not distributed.launched():
        with one_training_per_checkpoint(checkpoint_dir):  # held for the ranks, which do not take it
            try:
                distributed.launch(ctx.cli_args("train"), ranks, paths.root, how)
            except DistributedError as exc:  # rank 0 recorded its own symptom; the cause is this
                _record_rank_failure(checkpoint_dir, str(exc))
                raise
        return json.loads(paths.train_metrics.read_text())
    train_ds = load_prepared(paths.prepared, "train", tokenizer, cfg.model.name)
    eval_ds = load_prepared(paths.prepared, "eval", tokenizer, cfg.model.name) if cfg.train.eval_steps else None
    model = load_base_model(cfg.model, cfg.quantization, resolved, vocab_size=len(tokenizer), sharded=sharded)
    set_seed(cfg.train.seed)  # LoRA init draws random numbers: same seed, same adapter start (every rank)
    model = apply_lora(model, cfg.lora)
    collator = make_collator(tokenizer, cfg.data.packing, cfg.data.max_seq_len, padding_free=options.padding_free)
    # padded, not packed: the eval loss as the evaluate stage computes it on the same split
    eval_collator = make_collator(tokenizer, False, cfg.data.max_seq_len)
    train_cfg = distributed.per_rank(cfg.train, ranks)
    compute_dtype = resolve_compute_dtype(cfg.quantization.compute_dtype)
    if not main:  # rank > 0: trains its share; rank 0 keeps the records and writes the outputs
        train_adapter(
            model, tokenizer, train_ds, collator, train_cfg, checkpoint_dir, compute_dtype, eval_dataset=eval_ds,
            eval_collator=eval_collator, sharded=sharded,
        )
        return {}

    with contextlib.nullcontext() if distributed.launched() else one_training_per_checkpoint(checkpoint_dir):
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        resume_run_id = _previous_run_id(checkpoint_dir)
        tags = tracking.lineage_tags(paths, cfg, base_model_revision(model, resolved))
        start = (
            dict(run_id=resume_run_id, log_system_metrics=True)
            if resume_run_id
            else dict(experiment_id=experiment_id, run_name=tracking.run_name(f"qlora-{checkpoint_dir.name}"), log_system_metrics=True, tags=tags)
        )
        with tracking.active_run("train", **start) as run:
            run_id = run.info.run_id
            write_json_atomic(checkpoint_dir / "mlflow_run.json", {"run_id": run_id})
            if resume_run_id:
                _name_after_this_attempt(run, tags)
            else:
                mlflow.log_params(cfg.flat())
                mlflow.log_input(
                    mlflow.data.from_pandas(
                        train_ds.select_columns(["source"]).to_pandas(),
                        source=str(paths.prepared / "train.parquet"),
                        name="train",
                        digest=checkpoint_key(ctx),
                    ),
                    context="training",
                )
                tracking.log_data_report(paths)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            result = train_adapter(
                model,
                tokenizer,
                train_ds,
                collator,
                train_cfg,
                checkpoint_dir,
                compute_dtype,
                callbacks=[tracking.metrics_callback(resume_run_id)],
                eval_dataset=eval_ds,
                eval_collator=eval_collator,
                sharded=sharded,
            )
            summary = {
                "train_loss": result.train_loss,
                "global_step": result.global_step,
                "train_runtime_s": round(result.train_runtime_s, 2),
                "tokens_seen": result.tokens_seen,
                # the whole run, resumes included; not "tokens_per_second" (the per-step series, core/callbacks.py) nor
                # "train_tokens_per_second" (the Trainer's, this process only: tracking.TRAINER_SUMMARY)
                "run_tokens_per_second": round(result.tokens_seen / result.train_runtime_s, 2) if result.train_runtime_s else 0.0,
                "trainable_params": trainable,
            }
            if result.best_step is not None:  # train.eval_steps > 0: the adapter saved is this step's
                summary.update(best_step=result.best_step, best_eval_loss=result.best_eval_loss)
            if result.plan:  # what trained, where the fast path changed params (core/fast/)
                result.plan["ranks"] = ranks  # global batch: micro_batch_size x gradient_accumulation_steps x ranks
                result.plan["distributed"] = how
                write_json_atomic(checkpoint_dir / PLAN, result.plan)
            elif (checkpoint_dir / PLAN).is_file():  # nothing left to train: the plan the training ran with
                result.plan = json.loads((checkpoint_dir / PLAN).read_text())
            if result.plan:
                mlflow.set_tags({f"plan.{k}": str(v) for k, v in result.plan.items()})
                summary.update({f"plan_{k}": v for k, v in result.plan.items() if isinstance(v, (int, float))})
            tracking.log_metrics_once({k: float(v) for k, v in summary.items() if v is not None})
            if result.resumed_from:
                mlflow.set_tag("resumed_from", Path(result.resumed_from).name)

            with atomic_dir(paths.adapter) as tmp:
                # After FSDP the model holds shards: the adapter gathered whole (train_adapter) is saved.
                model.save_pretrained(tmp, safe_serialization=True, state_dict=result.adapter_state)
                tokenizer.save_pretrained(tmp)
                tracking.write_run_info(paths, run_id, run.info.experiment_id, target=tmp / "run.json", checkpoint_dir=checkpoint_dir)
            write_json_atomic(paths.train_metrics, summary)
            write_csv_atomic(paths.plots / "train_loss.csv", result.history, LOSS_PLOT_FIELDS)
            write_csv_atomic(paths.plots / "eval_loss.csv", result.eval_history, EVAL_PLOT_FIELDS)
            save_png(loss_figure(result.history, result.eval_history, result.best_step), paths.plots / "train_loss.png")
            mlflow.log_artifacts(str(paths.adapter), artifact_path="adapter")
        # The checkpoints stay until DVC has recorded this stage: evaluate deletes them (release_checkpoints).
        write_json_atomic(checkpoint_dir / FINISHED, {"run_id": run_id, "global_step": result.global_step})
    log.info("trained %s steps, loss %.4f; adapter in %s (MLflow run %s)", result.global_step, result.train_loss, paths.adapter, run_id)
    return summary
