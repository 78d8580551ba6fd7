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
    """Concatenates the batch into one row; position_ids restart at 0 for every sample.

    Without an attention_mask, transformers reads the restarts in position_ids as sample
    boundaries (sdpa, eager and flash attention), so no token attends across samples. Each
    sample's first label becomes -100: it would be predicted from the previous sample's last
    token. It is never a target in the unpacked row either, so no learned token is lost.

    The model must run without a KV cache (`model.config.use_cache = False`, which the HF Trainer
    sets from TrainingArguments.use_cache, default False): with a cache, transformers skips the
    packed-sequence check and samples would attend to each other.
    """

    def __init__(self, max_seq_len: int):
        self.max_seq_len = max_seq_len
        self._flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [{"input_ids": _ids(f, "input_ids"), "labels": _ids(f, "labels" if "labels" in f else "input_ids")} for f in features]
        _check_lengths([r["input_ids"] for r in rows], self.max_seq_len)
        return self._flatten(rows, return_tensors="pt")


def make_collator(tokenizer, packing: bool, max_seq_len: int):
    """The Trainer's data collator: PackingCollator if packing else PaddingCollator."""
    pad_id = check_pad_token(tokenizer)
    if packing:
        return PackingCollator(max_seq_len)
    return PaddingCollator(pad_id, max_seq_len)
