"""register: merge the adapter, check the merge, log and register the model, gate promotion.

    qlora register           # as `dvc repro register` runs it

The new version gets alias `challenger`. It becomes `champion` only if it beats the base model
and the current champion on register.metric by register.min_improvement, where the challenger
and the champion are scored on the same eval split in this run. Re-running for the same training
run registers nothing new.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.models import set_signature

from qlora_pipeline import serving, tracking
from qlora_pipeline.atomic import atomic_dir, write_json_atomic
from qlora_pipeline.config import RegisterConfig
from qlora_pipeline.core.data import make_collator
from qlora_pipeline.core.evaluate import score_model, set_stop_tokens
from qlora_pipeline.core.merge import check_saved, merge_adapter
from qlora_pipeline.core.model import base_model_revision, load_base_model
from qlora_pipeline.errors import NonFiniteMetricError, RegistryError, TransientError
from qlora_pipeline.stages.common import StageContext, base_tokenizer
from qlora_pipeline.stages.evaluate import eval_split, sample_rows

log = logging.getLogger(__name__)

FAIL_ONCE_ENV = "QLORA_FAIL_ONCE_REGISTER"
MERGE_CHECK_ROWS = 4


def beats(candidate: float, reference: float, cfg: RegisterConfig) -> bool:
    """True if candidate is better than reference by at least min_improvement (both must be finite)."""
    require_finite(cfg.metric, candidate=candidate, reference=reference)
    gain = candidate - reference if cfg.greater_is_better else reference - candidate
    return gain >= cfg.min_improvement and gain > 0


def merge_and_check(ctx: StageContext, resolved, tokenizer, eval_ds):
    """Merge into a dequantized copy, check it against the adapter model, save it, check the files."""
    cfg = ctx.cfg
    quantized = load_base_model(cfg.model, cfg.quantization, resolved, vocab_size=len(tokenizer))
    revision = base_model_revision(quantized, resolved)
    rows = eval_ds.select(range(min(MERGE_CHECK_ROWS, len(eval_ds))))
    inputs = [torch.tensor([row["input_ids"][: cfg.data.max_seq_len]]) for row in rows]
    merged, check = merge_adapter(
        quantized, str(ctx.paths.adapter), getattr(torch, cfg.register.merge_dtype), inputs, cfg.register.merge_tolerance
    )
    set_stop_tokens(merged, tokenizer)  # generation (and the served model) stops at end of turn too
    with atomic_dir(ctx.paths.merged) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        check_saved(tmp, merged)
    return merged, check, revision


def serving_requirements() -> list[str]:
    """What serving the merged model needs (MLflow's default list wants torchvision)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in ("torch", "transformers", "accelerate", "safetensors", "tokenizers")]


def load_champion(model_name: str, dtype: torch.dtype):
    components = mlflow.transformers.load_model(f"models:/{model_name}@{tracking.CHAMPION}", return_type="components", torch_dtype=dtype)
    model = components["model"]
    return model.to("cuda") if torch.cuda.is_available() else model


def score_champion(reg: RegisterConfig, champion, tokenizer, eval_ds, collator, evaluate_cfg, samples) -> float | None:
    """The champion's score on this eval split; None when its registered files do not load (a
    champion that cannot be served loses its place to any challenger that beats the base)."""
    try:
        champion_model = load_champion(reg.model_name, getattr(torch, reg.merge_dtype))
    except (OSError, ValueError, RuntimeError) as exc:
        log.warning("champion v%s does not load (%s); scoring the challenger against the base only", champion.version, str(exc).splitlines()[0][:300])
        return None
    score = score_model(champion_model, tokenizer, eval_ds, collator, evaluate_cfg, samples).metrics[reg.metric]
    del champion_model
    return score


def _inject_transient_failure() -> None:
    """Test hook for orchestration retries: fail once, before anything is registered."""
    marker = os.environ.get(FAIL_ONCE_ENV)
    if marker and not Path(marker).exists():
        Path(marker).write_text("failed once\n")
        raise TransientError("injected transient registry failure (QLORA_FAIL_ONCE_REGISTER); run register again")


def require_finite(metric: str, **scores: float | None) -> None:
    """A NaN compares false with everything, so it would pass or fail a gate silently: refuse it."""
    bad = [f"{who} {metric} is {float(v)}" for who, v in scores.items() if v is not None and not math.isfinite(v)]
    if bad:
        raise NonFiniteMetricError(
            f"{'; '.join(bad)}: a non-finite metric cannot be compared, nothing is promoted. A NaN eval metric "
            "means the adapter diverged: retrain with a lower train.learning_rate or quantization.compute_dtype "
            "bfloat16 (or float32), then run evaluate again"
        )


def gate(reg: RegisterConfig, eval_metrics: dict, challenger_score: float, champion, champion_score: float | None):
    """Promote only if the tuned model beats the base and the challenger beats the champion."""
    require_finite(
        reg.metric,
        tuned=eval_metrics[reg.metric],
        base=eval_metrics[f"base_{reg.metric}"],
        challenger=challenger_score,
        **{f"champion v{getattr(champion, 'version', '?')}": champion_score},
    )
    beats_base = beats(eval_metrics[reg.metric], eval_metrics[f"base_{reg.metric}"], reg)
    beats_champion = champion_score is None or beats(challenger_score, champion_score, reg)
    reason = (
        f"{reg.metric}: tuned {eval_metrics[reg.metric]:.4f} vs base {eval_metrics['base_' + reg.metric]:.4f}; "
        f"challenger {challenger_score:.4f} vs champion "
        + (f"v{champion.version} {champion_score:.4f}" if champion_score is not None else (f"v{champion.version} (does not load)" if champion is not None else "none"))
        + f" (min_improvement {reg.min_improvement})"
    )
    return beats_base and beats_champion, beats_base, beats_champion, reason


def register_version(ctx: StageContext, client, run_id: str, merged, tokenizer, revision: str, check, eval_metrics: dict):
    """The version registered from this training run: the existing one, or a new one with lineage."""
    cfg, reg = ctx.cfg, ctx.cfg.register
    version = tracking.retry(lambda: tracking.version_for_run(client, reg.model_name, run_id), "searching model versions")
    if version is not None:
        return version
    tags = {
        **tracking.lineage_tags(ctx.paths, cfg, revision),
        "train_run_id": run_id,
        "params": json.dumps(cfg.model_dump(mode="json"), sort_keys=True),
        "merge_max_abs_logit_diff": f"{check.max_abs_logit_diff:.6g}",
        "merge_relative_diff": f"{check.relative_diff:.6g}",
        "merge_tolerance": str(reg.merge_tolerance),
        f"eval.{reg.metric}": f"{eval_metrics[reg.metric]:.6g}",
        f"eval.base_{reg.metric}": f"{eval_metrics['base_' + reg.metric]:.6g}",
    }
    # Logged as a chat endpoint: the template training used, greedy unless a request sets do_sample
    # (serving.py's docstring says why MLflow needs the generation_config and the signature param).
    chat_tok = serving.chat_tokenizer(tokenizer, cfg.data.chat_template)
    with serving.greedy_by_default(merged):
        info = mlflow.transformers.log_model(
            transformers_model={"model": merged, "tokenizer": chat_tok},
            name="model",
            task=serving.CHAT_TASK,
            torch_dtype=getattr(torch, reg.merge_dtype),
            model_config=serving.chat_model_config(chat_tok),
            pip_requirements=serving_requirements(),
        )
    tracking.retry(
        lambda: set_signature(info.model_uri, serving.chat_signature(info.signature)), "setting the chat signature"
    )
    return tracking.retry(
        lambda: mlflow.register_model(info.model_uri, reg.model_name, tags=tags), "registering the model version"
    )


def run(ctx: StageContext) -> dict:
    cfg, paths = ctx.cfg, ctx.paths
    reg = cfg.register
    tracking.setup(paths, cfg.tracking.experiment)
    run_id = tracking.read_run_id(paths)
    eval_metrics = json.loads((paths.metrics / "eval.json").read_text())
    if reg.metric not in eval_metrics:
        raise RegistryError(
            f"register.metric {reg.metric!r} is not in metrics/eval.json (has {sorted(eval_metrics)}); "
            "exact_match and chrf need eval rows with prompts and evaluate.num_samples > 0"
        )
    resolved, tokenizer = base_tokenizer(ctx)
    eval_ds = eval_split(ctx)
    collator = make_collator(tokenizer, False, cfg.data.max_seq_len)
    samples = sample_rows(eval_ds, cfg.evaluate.num_samples)
    client = MlflowClient()

    with tracking.active_run(run_id=run_id):
        merged, check, revision = merge_and_check(ctx, resolved, tokenizer, eval_ds)
        mlflow.log_metrics({
            "merge_max_abs_logit_diff": check.max_abs_logit_diff,
            "merge_mean_abs_logit_diff": check.mean_abs_logit_diff,
            "merge_relative_diff": check.relative_diff,
        })

        challenger_score = score_model(merged, tokenizer, eval_ds, collator, cfg.evaluate, samples).metrics[reg.metric]
        champion = tracking.retry(lambda: tracking.alias_version(client, reg.model_name, tracking.CHAMPION), "reading the champion alias")
        champion_score = None
        if champion is not None:
            champion_score = score_champion(reg, champion, tokenizer, eval_ds, collator, cfg.evaluate, samples)

        _inject_transient_failure()
        version = register_version(ctx, client, run_id, merged, tokenizer, revision, check, eval_metrics)
        tracking.retry(lambda: client.set_registered_model_alias(reg.model_name, tracking.CHALLENGER, version.version), "setting the challenger alias")

        already = champion is not None and champion.version == version.version
        promoted, beats_base, beats_champion, reason = gate(reg, eval_metrics, challenger_score, champion, champion_score)
        promoted = promoted and not already
        if promoted:
            tracking.retry(lambda: tracking.promote(client, reg.model_name, version.version, f"gate passed: {reason}"), "promoting to champion")
        client.set_model_version_tag(reg.model_name, version.version, "gate", ("passed: " if promoted or already else "not promoted: ") + reason)
        current = tracking.alias_version(client, reg.model_name, tracking.CHAMPION)
        result = {
            "model_name": reg.model_name,
            "version": int(version.version),
            "run_id": run_id,
            "promoted": promoted,
            "champion_version": int(current.version) if current else None,
            "metric": reg.metric,
            "challenger_score": challenger_score,
            "champion_score": champion_score,
            "beats_base": beats_base,
            "beats_champion": beats_champion,
            "merge_max_abs_logit_diff": check.max_abs_logit_diff,
            "merge_relative_diff": check.relative_diff,
            "reason": reason,
        }
        mlflow.set_tags({"registered_version": str(version.version), "promoted": str(promoted)})
        write_json_atomic(paths.metrics / "register.json", result)
    log.info("registered %s v%s (%s); %s", reg.model_name, version.version, "promoted to champion" if promoted else "not promoted", reason)
    return result


def promote_by_hand(ctx: StageContext, version: str | None, alias: str | None, reason: str) -> dict:
    """`qlora promote`: move champion to a version (or to the version another alias points to)."""
    from mlflow.exceptions import MlflowException

    reg = ctx.cfg.register
    tracking.setup(ctx.paths, ctx.cfg.tracking.experiment)
    client = MlflowClient()
    try:
        client.get_registered_model(reg.model_name)
    except MlflowException:
        raise RegistryError(f"registered model {reg.model_name!r} does not exist; check register.model_name or run the pipeline first") from None
    if alias:
        target = tracking.alias_version(client, reg.model_name, alias)
        if target is None:
            raise RegistryError(f"{reg.model_name} has no alias {alias!r}; aliases in use: challenger, champion")
        version = target.version
    try:
        client.get_model_version(reg.model_name, str(version))
    except MlflowException:
        raise RegistryError(f"{reg.model_name} has no version {version}; list them in the MLflow UI (Models tab)") from None
    previous = tracking.alias_version(client, reg.model_name, tracking.CHAMPION)
    who = os.environ.get("USER", "unknown")
    tracking.promote(client, reg.model_name, str(version), f"manual by {who}: {reason}")
    log.info("champion: %s -> v%s (manual, %s)", f"v{previous.version}" if previous else "none", version, reason)
    return {"model_name": reg.model_name, "champion_version": int(version), "previous": int(previous.version) if previous else None}
