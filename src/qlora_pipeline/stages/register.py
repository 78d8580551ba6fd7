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
import os
from pathlib import Path

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.models import set_signature

from qlora_pipeline import registry, serving, tracking
from qlora_pipeline.atomic import atomic_dir, write_json_atomic
from qlora_pipeline.config import RegisterConfig, registered_name
from qlora_pipeline.core.data.collate import make_collator
from qlora_pipeline.core.evaluate import sample_rows, score_model, set_stop_tokens
from qlora_pipeline.core.gate import Contest, GateDecision, decide
from qlora_pipeline.core.merge import check_saved, merge_adapter
from qlora_pipeline.core.model import base_model_revision, load_base_model
from qlora_pipeline.errors import RegistryError, TransientError
from qlora_pipeline.stages.common import StageContext, base_tokenizer, eval_split

log = logging.getLogger(__name__)

FAIL_ONCE_ENV = "QLORA_FAIL_ONCE_REGISTER"
MERGE_CHECK_ROWS = 4


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
        write_json_atomic(tmp / MERGED_FROM, {"run_id": tracking.read_run_id(ctx.paths)})
    return merged, check, revision


MERGED_FROM = "merged_from.json"  # in models/merged: the training run whose adapter it holds


def merged_from(ctx: StageContext) -> str | None:
    """The training run whose merge is in models/merged, or None (none there, or an older one)."""
    try:
        return json.loads((ctx.paths.merged / MERGED_FROM).read_text())["run_id"]
    except (OSError, ValueError, KeyError):
        return None


def serving_requirements() -> list[str]:
    """What serving the merged model needs (MLflow's default list wants torchvision)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in ("torch", "transformers", "accelerate", "safetensors", "tokenizers")]


def load_champion(model_name: str, dtype: torch.dtype):
    components = mlflow.transformers.load_model(f"models:/{model_name}@{registry.CHAMPION}", return_type="components", torch_dtype=dtype)
    model = components["model"]
    return model.to("cuda") if torch.cuda.is_available() else model


def score_champion(reg: RegisterConfig, champion, score) -> float | None:
    """The champion's score on this eval split; None when its registered files do not load (a
    champion that cannot be served loses its place to any challenger that beats the base)."""
    try:
        champion_model = load_champion(reg.model_name, getattr(torch, reg.merge_dtype))
    except (OSError, ValueError, RuntimeError) as exc:
        log.warning("champion v%s does not load (%s); scoring the challenger against the base only", champion.version, str(exc).splitlines()[0][:300])
        return None
    value = score(champion_model)
    del champion_model
    return value


def _inject_transient_failure() -> None:
    """Test hook for orchestration retries: fail once, before anything is registered."""
    marker = os.environ.get(FAIL_ONCE_ENV)
    if marker and not Path(marker).exists():
        Path(marker).write_text("failed once\n")
        raise TransientError("injected transient registry failure (QLORA_FAIL_ONCE_REGISTER); run register again")


def register_version(ctx: StageContext, client, run_id: str, merged, tokenizer, revision: str, check, eval_metrics: dict):
    """The version registered from this training run: the existing one, or a new one with lineage."""
    cfg, reg = ctx.cfg, ctx.cfg.register
    version = tracking.retry(lambda: registry.version_for_run(client, reg.model_name, run_id), "searching model versions")
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


def refuse_another_base(champion, base_model: str, model_name: str) -> None:
    """A champion fine-tuned from another base model (another tokenizer, another loss scale) is not
    scored on this run's eval split: its version would win or lose on token ids it never saw.

    Raises:
        RegistryError: the champion's `base_model` tag names another model than base_model
            (compared as registered_name does: file or repo name, so paths to one file agree).
    """
    theirs = champion.tags.get("base_model") if champion is not None else None
    if theirs and registered_name(theirs) != registered_name(base_model):
        raise RegistryError(
            f"the champion of {model_name} (v{champion.version}) was fine-tuned from {theirs}, this run from {base_model}: "
            "their scores are not comparable. Register under a name of its own (register.model_name: auto gives "
            f"{registered_name(base_model)}), or, to replace that model on purpose, register under a new name and "
            f"point serving at it, or promote by hand after comparing: qlora promote --name {model_name} --version N"
        )


def contest(ctx: StageContext, client, version: str, score_rival) -> Contest:
    """The current champion and its score on this eval split (read under the promotion lock)."""
    champion = tracking.retry(lambda: registry.alias_version(client, ctx.cfg.register.model_name, registry.CHAMPION), "reading the champion alias")
    if champion is None:
        return Contest()
    refuse_another_base(champion, ctx.cfg.model.name, ctx.cfg.register.model_name)
    if champion.version == version:
        return Contest(champion.version, None, is_champion=True)
    return Contest(champion.version, score_rival(champion))


def decide_and_promote(ctx: StageContext, client, version: str, eval_metrics: dict, challenger_score: float, score_rival) -> tuple[GateDecision, Contest]:
    """Read the champion, score it, decide and move the alias, all under one lock per model name.

    Two registrations never both decide against the same old champion: the second waits, then
    finds the first's version as champion and must beat it. A writer on another host (which does
    not share the lock) is caught by reading the alias back; the decision is then made again.
    """
    reg = ctx.cfg.register
    for _ in range(3):
        with registry.promotion_lock(reg.model_name):
            rival = contest(ctx, client, version, score_rival)
            decision = decide(reg, eval_metrics[reg.metric], eval_metrics[f"base_{reg.metric}"], challenger_score, rival)
            if decision.promote:
                tracking.retry(lambda: registry.promote(client, reg.model_name, version, f"gate passed: {decision.reason}"), "promoting to champion")
            now = tracking.retry(lambda: registry.alias_version(client, reg.model_name, registry.CHAMPION), "reading the champion alias")
            expected = version if decision.promote else rival.champion_version
            if (now.version if now else None) == expected:
                return decision, rival
        log.warning("the champion of %s moved to v%s during this decision (a registration elsewhere); deciding again", reg.model_name, now.version if now else "none")
    raise RegistryError(f"the champion alias of {reg.model_name} kept moving during three promotion decisions; run register again")


def read_eval_metrics(ctx: StageContext) -> dict:
    """metrics/eval.json, checked to hold register.metric before anything is loaded.

    Raises:
        RegistryError: metrics/eval.json is missing (evaluate has not run), or register.metric is not
            among its metrics.
    """
    metric = ctx.cfg.register.metric
    if not ctx.paths.eval_metrics.is_file():
        raise RegistryError(f"{ctx.paths.eval_metrics} not found: the tuned model has not been evaluated; run `qlora evaluate` first (`dvc repro` runs it)")
    eval_metrics = json.loads(ctx.paths.eval_metrics.read_text())
    if metric not in eval_metrics:
        raise RegistryError(
            f"register.metric {metric!r} is not in metrics/eval.json (has {sorted(eval_metrics)}); "
            "exact_match and chrf need eval rows with prompts and evaluate.num_samples > 0"
        )
    return eval_metrics


def scorer(ctx: StageContext, tokenizer, eval_ds):
    """model -> register.metric on this run's eval split, the way the evaluate stage scores."""
    cfg = ctx.cfg
    collator = make_collator(tokenizer, False, cfg.data.max_seq_len)
    samples = sample_rows(eval_ds, cfg.evaluate.num_samples)
    return lambda model: score_model(model, tokenizer, eval_ds, collator, cfg.evaluate, samples).metrics[cfg.register.metric]


def run(ctx: StageContext) -> dict:
    """Merge, check, score, register, then gate the promotion; writes metrics/ and reports/register.json.

    Raises:
        RegistryError: register.metric missing from metrics/eval.json, a champion from another base
            model, or a champion alias that keeps moving.
        MergeError: the merged model does not match the adapter model within register.merge_tolerance.
    """
    cfg, paths = ctx.cfg, ctx.paths
    reg = cfg.register
    tracking.setup(paths, cfg.tracking.experiment)
    run_id = tracking.read_run_id(paths)
    eval_metrics = read_eval_metrics(ctx)
    resolved, tokenizer = base_tokenizer(ctx)
    eval_ds = eval_split(ctx, tokenizer)
    score = scorer(ctx, tokenizer, eval_ds)
    client = MlflowClient()

    with tracking.active_run("register", run_id=run_id):
        champion = tracking.retry(lambda: registry.alias_version(client, reg.model_name, registry.CHAMPION), "reading the champion alias")
        refuse_another_base(champion, cfg.model.name, reg.model_name)  # before the merge: fail fast
        _inject_transient_failure()
        existing = tracking.retry(lambda: registry.version_for_run(client, reg.model_name, run_id), "searching model versions")
        if existing is not None and champion is not None and existing.version == champion.version and merged_from(ctx) == run_id:
            return _already_champion(ctx, run_id, existing)
        # merge and check
        merged, check, revision = merge_and_check(ctx, resolved, tokenizer, eval_ds)
        tracking.log_metrics_once({
            "merge_max_abs_logit_diff": check.max_abs_logit_diff,
            "merge_mean_abs_logit_diff": check.mean_abs_logit_diff,
            "merge_relative_diff": check.relative_diff,
        })
        # score, register, promote
        challenger_score = score(merged)
        version = register_version(ctx, client, run_id, merged, tokenizer, revision, check, eval_metrics).version
        tracking.retry(lambda: client.set_registered_model_alias(reg.model_name, registry.CHALLENGER, version), "setting the challenger alias")
        decision, rival = decide_and_promote(ctx, client, version, eval_metrics, challenger_score, lambda champion: score_champion(reg, champion, score))
        record = record_outcome(ctx, client, run_id, version, decision, rival, challenger_score, check)
    log.info("registered %s v%s (%s); %s", reg.model_name, version, "promoted to champion" if decision.promote else "not promoted", decision.reason)
    return record


def record_outcome(ctx: StageContext, client, run_id: str, version: str, decision: GateDecision, rival: Contest, challenger_score: float, check) -> dict:
    """The gate's verdict on the version, the run's tags, metrics/register.json and reports/register.json."""
    reg = ctx.cfg.register
    client.set_model_version_tag(reg.model_name, version, "gate", ("passed: " if decision.promote or rival.is_champion else "not promoted: ") + decision.reason)
    current = registry.alias_version(client, reg.model_name, registry.CHAMPION)
    numbers = {
        "version": int(version),
        "promoted": decision.promote,
        "champion_version": int(current.version) if current else None,
        "challenger_score": challenger_score,
        "champion_score": rival.champion_score,
        "beats_base": decision.beats_base,
        "beats_champion": decision.beats_champion,
        "merge_max_abs_logit_diff": check.max_abs_logit_diff,
        "merge_relative_diff": check.relative_diff,
    }
    record = {"model_name": reg.model_name, "run_id": run_id, "metric": reg.metric, **numbers, "reason": decision.reason}
    mlflow.set_tags({"registered_version": version, **({} if rival.is_champion else {"promoted": str(decision.promote)})})
    write_records(ctx.paths, numbers, record)
    return record


def write_records(paths, numbers: dict, record: dict) -> None:
    """metrics/register.json: numbers only (`dvc exp show` columns), booleans as 0/1, an absent score
    left out rather than null; reports/register.json: the whole record."""
    write_json_atomic(paths.register_metrics, {k: int(v) if isinstance(v, bool) else v for k, v in numbers.items() if v is not None})
    write_json_atomic(paths.register_record, record)


def _already_champion(ctx: StageContext, run_id: str, version) -> dict:
    """A rerun for the training run whose version is champion already, its merge in models/merged:
    nothing to merge, score or move; the record is rebuilt from the version's tags (what the run
    that registered it measured)."""
    reg = ctx.cfg.register
    tags = version.tags
    reason = f"v{version.version} is the champion already; not compared with itself"
    numbers = {
        "version": int(version.version),
        "promoted": False,
        "champion_version": int(version.version),
        "challenger_score": float(tags[f"eval.{reg.metric}"]) if f"eval.{reg.metric}" in tags else None,
        "champion_score": None,
        "beats_base": None,
        "beats_champion": None,
        "merge_max_abs_logit_diff": float(tags["merge_max_abs_logit_diff"]) if "merge_max_abs_logit_diff" in tags else None,
        "merge_relative_diff": float(tags["merge_relative_diff"]) if "merge_relative_diff" in tags else None,
    }
    record = {"model_name": reg.model_name, "run_id": run_id, "metric": reg.metric, **numbers, "reason": reason}
    write_records(ctx.paths, numbers, record)
    log.info("%s v%s is this training run's version and the champion already; nothing merged or moved", reg.model_name, version.version)
    return record
