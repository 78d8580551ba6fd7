"""Evaluation: token-weighted eval loss and perplexity, greedy generations, task metrics.

The base model is the tuned model with its adapter switched off, so both are scored on the
same 4-bit weights, the same eval split and the same settings.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from sacrebleu.metrics import CHRF

from qlora_pipeline import progress
from qlora_pipeline.config import EvaluateConfig
from qlora_pipeline.core.data.encode import alpaca_prompt
from qlora_pipeline.core.data.tokens import encode_prompt
from qlora_pipeline.core.data.tokens import resolve_chat_template, stop_token_ids


def _batches(items: list[Any], size: int, description: str) -> Iterator[list[Any]]:
    """Consecutive slices of `size` items, under a progress bar (drawn on a terminal only)."""
    if not items:
        return
    with progress.bar(description, total=math.ceil(len(items) / size)) as bar:
        for start in range(0, len(items), size):
            yield items[start : start + size]
            bar.update(advance=1)


@torch.no_grad()
def eval_loss(model, dataset, collator, batch_size: int) -> dict[str, float]:
    """Mean cross-entropy over every label token (not per batch), and its perplexity."""
    model.eval()
    device = next(model.parameters()).device
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in dataset]
    total_loss, total_tokens = 0.0, 0
    for chunk in _batches(rows, batch_size, "eval loss"):
        batch = {k: v.to(device) for k, v in collator(chunk).items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
        mask = shift_labels != -100
        if not mask.any():
            continue
        loss = torch.nn.functional.cross_entropy(shift_logits[mask], shift_labels[mask], reduction="sum")
        total_loss += loss.item()
        total_tokens += int(mask.sum())
    if total_tokens == 0:
        raise ValueError("the eval split has no label tokens; check data.train_on_prompt and the eval data")
    mean = total_loss / total_tokens
    return {"eval_loss": mean, "perplexity": math.exp(min(mean, 50.0)), "eval_tokens": total_tokens}


def chat_prompt(tokenizer, text: str) -> str:
    """A free-form prompt as training rendered a user turn and serving renders it.

    Through the tokenizer's chat template (the stages' tokenizers carry data.chat_template when it
    is set, see stages.common.base_tokenizer); without one, the alpaca prompt that instruction
    records were trained with, which is also the serving fallback (serving.fallback_chat_template).
    """
    template = resolve_chat_template(tokenizer, None)
    if template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], chat_template=template, add_generation_prompt=True, tokenize=False
        )
    return alpaca_prompt(text)


def generation_stop_ids(model, tokenizer) -> list[int]:
    """Token ids that end a reply: EOS, the chat template's end-of-turn token, and any the model's
    generation_config already stops on (Llama-3.1 Instruct lists several)."""
    ids = stop_token_ids(tokenizer)
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for token_id in configured if isinstance(configured, (list, tuple)) else [configured]:
        if token_id is not None and token_id not in ids:
            ids.append(int(token_id))
    return ids


def set_stop_tokens(model, tokenizer) -> list[int]:
    """Make the model's generation_config stop on the end-of-turn token as well as EOS.

    Saved with the model (generation_config.json), so plain transformers and `mlflow models serve`
    (the text-generation pipeline reads generation_config) stop where training ended replies.
    Returns the ids set.
    """
    ids = generation_stop_ids(model, tokenizer)
    model.generation_config.eos_token_id = ids[0] if len(ids) == 1 else ids
    return ids


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy completions (prompt excluded), stopped at EOS or the template's end-of-turn token."""
    model.eval()
    device = next(model.parameters()).device
    outputs: list[str] = []
    stop_ids = generation_stop_ids(model, tokenizer)
    for chunk in _batches(prompts, batch_size, "generating"):
        encoded = [encode_prompt(tokenizer, p) for p in chunk]
        width = max(len(e) for e in encoded)
        # Left padding so every prompt ends where generation starts.
        input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for i, ids in enumerate(encoded):
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            attention[i, width - len(ids) :] = 1
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=stop_ids,
        )
        for row in generated[:, width:]:
            outputs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return outputs


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Fraction of predictions equal to their reference after trimming whitespace."""
    if not predictions:
        return 0.0
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(predictions)


def chrf(predictions: list[str], references: list[str]) -> float:
    """Corpus chrF (sacrebleu, 0-100) of predictions against one reference each."""
    if not predictions:
        return 0.0
    return float(CHRF().corpus_score(predictions, [references]).score)


@dataclass
class Scores:
    metrics: dict[str, float]
    generations: list[str]


def score_model(model, tokenizer, eval_dataset, collator, cfg: EvaluateConfig, sample_rows: list[dict]) -> Scores:
    """Loss, perplexity and (where rows have references) exact match and chrF for one model."""
    metrics = eval_loss(model, eval_dataset, collator, cfg.batch_size)
    generations: list[str] = []
    if sample_rows:
        generations = generate(model, tokenizer, [r["prompt"] for r in sample_rows], cfg.max_new_tokens, cfg.batch_size)
        references = [r["reference"] for r in sample_rows]
        metrics["exact_match"] = exact_match(generations, references)
        metrics["chrf"] = chrf(generations, references)
    return Scores(metrics, generations)


@contextlib.contextmanager
def adapter_disabled(model):
    """Run a PeftModel as its base model for the duration of the block."""
    with model.disable_adapter():
        yield model


def sample_rows(eval_ds, count: int) -> list[dict]:
    """The first `count` eval rows that have a prompt and a reference (instruction or chat data)."""
    rows = []
    for row in eval_ds.select_columns(["prompt", "reference", "source"]):
        if len(rows) >= count:
            break
        if row["prompt"] and row["reference"]:
            rows.append(row)
    return rows
