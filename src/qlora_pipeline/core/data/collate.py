"""Batches for the HF Trainer: padded, or packed into one row with per-sample position ids."""

from __future__ import annotations

from typing import Any

import torch
from transformers import DataCollatorWithFlattening

from qlora_pipeline.core.data.encode import IGNORE_INDEX
from qlora_pipeline.core.data.tokens import check_pad_token
from qlora_pipeline.errors import DataError


def _ids(feature: dict[str, Any], key: str) -> list[int]:
    value = feature[key]
    return value.tolist() if hasattr(value, "tolist") else list(value)


def _check_lengths(rows: list[list[int]], max_seq_len: int) -> None:
    longest = max(len(r) for r in rows)
    if longest > max_seq_len:
        raise DataError(
            f"a row has {longest} tokens, more than max_seq_len={max_seq_len}; the prepared data was made with "
            "another data.max_seq_len, run `qlora prepare` again"
        )


class PaddingCollator:
    """Right-pads input_ids with the pad id, labels with -100; attention_mask marks real tokens."""

    def __init__(self, pad_id: int, max_seq_len: int):
        self.pad_id = pad_id
        self.max_seq_len = max_seq_len

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [_ids(f, "input_ids") for f in features]
        labels = [_ids(f, "labels") if "labels" in f else list(i) for f, i in zip(features, ids)]
        _check_lengths(ids, self.max_seq_len)
        width = max(len(r) for r in ids)
        batch = {
            "input_ids": torch.full((len(ids), width), self.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(ids), width), dtype=torch.long),
            "labels": torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long),
        }
        for row, (i, lab) in enumerate(zip(ids, labels)):
            batch["input_ids"][row, : len(i)] = torch.tensor(i, dtype=torch.long)
            batch["attention_mask"][row, : len(i)] = 1
            batch["labels"][row, : len(lab)] = torch.tensor(lab, dtype=torch.long)
        return batch


class PackingCollator:
    """Concatenates the micro-batch into one row of real tokens; position_ids restart at 0 for
    every sample. No pad token is ever added, so none has to be taken out again.

    Without an attention_mask, transformers reads the restarts in position_ids as sample
    boundaries (sdpa, eager and flash attention), so no token attends across samples. Each
    sample's first label becomes -100: it would be predicted from the previous sample's last
    token. It is never a target in the unpacked row either, so no learned token is lost.

    attention_boundaries: also return cu_seq_lens_q/k and max_length_q/k (transformers'
    FlashAttentionKwargs), which variable-length attention reads instead of a mask (the fast path's
    padding-free batches, `train.padding_free`). A batch of full rows of one length with nothing
    packed in them then stays [rows, width], without a mask: plain causal attention needs no
    boundaries. A feature that already holds several samples (position_ids restarting at 0) is
    split at the restarts.

    The model must run without a KV cache (`model.config.use_cache = False`, which the HF Trainer
    sets from TrainingArguments.use_cache, default False): with a cache, transformers skips the
    packed-sequence check and samples would attend to each other.
    """

    def __init__(self, max_seq_len: int, attention_boundaries: bool = False):
        self.max_seq_len = max_seq_len
        self.attention_boundaries = attention_boundaries
        self._flatten = DataCollatorWithFlattening(
            return_position_ids=True, separator_id=IGNORE_INDEX, return_flash_attn_kwargs=attention_boundaries
        )

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [{"input_ids": _ids(f, "input_ids"), "labels": _ids(f, "labels" if "labels" in f else "input_ids")} for f in features]
        _check_lengths([r["input_ids"] for r in rows], self.max_seq_len)
        starts = [_sample_starts(f) for f in features]
        if self.attention_boundaries and len({len(r["input_ids"]) for r in rows}) == 1 and all(s == [0] for s in starts):
            return {key: torch.tensor([r[key] for r in rows], dtype=torch.long) for key in ("input_ids", "labels")}
        samples = [
            {"input_ids": r["input_ids"][s:e], "labels": r["labels"][s:e]}
            for r, row_starts in zip(rows, starts)
            for s, e in zip(row_starts, [*row_starts[1:], len(r["input_ids"])])
        ]
        return self._flatten(samples, return_tensors="pt")


def _sample_starts(feature: dict[str, Any]) -> list[int]:
    """Where the samples in a feature begin: 0, and every later position_ids restart at 0."""
    if "position_ids" not in feature:
        return [0]
    positions = _ids(feature, "position_ids")
    return [0, *(i for i, p in enumerate(positions) if p == 0 and i > 0)]


def make_collator(tokenizer, packing: bool, max_seq_len: int, padding_free: bool = False):
    """The Trainer's data collator: PaddingCollator, or PackingCollator with `data.packing` or the
    fast path's padding-free batches (`train.padding_free` resolved for this machine, which adds
    the sample boundaries variable-length attention reads).

    Raises:
        DataError: the tokenizer has no usable pad token (PaddingCollator needs one).
    """
    pad_id = check_pad_token(tokenizer)
    if packing or padding_free:
        return PackingCollator(max_seq_len, attention_boundaries=padding_free)
    return PaddingCollator(pad_id, max_seq_len)
