"""Collators: padding never learned, packed rows keep every token and attend only within a sample."""

from __future__ import annotations

import pytest
import torch

from qlora_pipeline.core.data.collate import PackingCollator, PaddingCollator, make_collator
from qlora_pipeline.core.data.encode import IGNORE_INDEX
from qlora_pipeline.core.tiny import build_tiny_model, build_tiny_tokenizer
from qlora_pipeline.errors import DataError

M = IGNORE_INDEX


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    model = build_tiny_model(tok, seed=0).eval()
    # As the HF Trainer sets it (TrainingArguments.use_cache defaults to False): with a KV cache
    # transformers does not look for packed sequences in position_ids.
    model.config.use_cache = False
    return model


def samples(tok) -> list[dict]:
    """Three rows of different lengths with prompt tokens masked, like prepared chat rows."""
    rows = []
    for prompt, reply in [("What is 2 plus 2?", "4"), ("Name a color.", "blue or green"), ("Hi", "Hello there, friend.")]:
        p = tok(f"<|user|>\n{prompt}</s>\n<|assistant|>\n", add_special_tokens=False).input_ids
        c = tok(reply, add_special_tokens=False).input_ids + [tok.eos_token_id]
        rows.append({"input_ids": p + c, "labels": [M] * len(p) + c, "source": "mem:1", "prompt": "x", "reference": reply})
    return rows


def test_padding_collator_pads_with_pad_id_and_minus_100(tok):
    rows = samples(tok)
    collator = make_collator(tok, packing=False, max_seq_len=64)
    assert isinstance(collator, PaddingCollator)
    batch = collator(rows)
    width = max(len(r["input_ids"]) for r in rows)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == row["input_ids"]
        assert batch["input_ids"][i, n:].tolist() == [tok.pad_token_id] * (width - n)
        assert batch["labels"][i, :n].tolist() == row["labels"]
        assert batch["labels"][i, n:].tolist() == [M] * (width - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
    assert tok.pad_token_id != tok.eos_token_id
    assert not (batch["labels"] == tok.pad_token_id).any()


def test_packing_collator_resets_positions_and_loses_no_token(tok):
    rows = samples(tok)
    collator = make_collator(tok, packing=True, max_seq_len=64)
    assert isinstance(collator, PackingCollator)
    batch = collator(rows)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: boundaries come from positions
    assert batch["input_ids"].shape[0] == 1
    assert batch["input_ids"][0].tolist() == [t for r in rows for t in r["input_ids"]]
    assert batch["position_ids"][0].tolist() == [p for r in rows for p in range(len(r["input_ids"]))]
    # Each sample's first label is never a target, so it becomes -100 (no prediction across samples);
    # every learned target of every sample survives.
    assert batch["labels"][0].tolist() == [t for r in rows for t in [M, *r["labels"][1:]]]
    learned = sum(sum(1 for t in r["labels"][1:] if t != M) for r in rows)
    assert int((batch["labels"][0, 1:] != M).sum()) == learned
    assert int((batch["labels"][0] == tok.eos_token_id).sum()) == len(rows)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_logits_equal_per_sample_logits(tok, model, attn, training):
    model.set_attn_implementation(attn)
    model.train(training)  # the tiny model has no dropout, so train mode is deterministic too
    rows = samples(tok)
    batch = make_collator(tok, packing=True, max_seq_len=64)(rows)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        start = 0
        for row in rows:
            alone = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            n = len(row["input_ids"])
            torch.testing.assert_close(packed[start : start + n], alone, atol=1e-5, rtol=1e-4)
            start += n
        # The same rows padded: real positions match too, so padding changes nothing.
        padded = make_collator(tok, packing=False, max_seq_len=64)(rows)
        logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        for i, row in enumerate(rows):
            alone = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            torch.testing.assert_close(logits[i, : len(row["input_ids"])], alone, atol=1e-5, rtol=1e-4)


def test_packed_and_padded_loss_agree(tok, model):
    model.set_attn_implementation("sdpa")
    rows = samples(tok)
    with torch.no_grad():
        packed = model(**make_collator(tok, packing=True, max_seq_len=64)(rows)).loss
        padded = model(**make_collator(tok, packing=False, max_seq_len=64)(rows)).loss
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)


def test_collator_pads_by_position_even_when_pad_is_eos_and_refuses_overlong_rows():
    t = build_tiny_tokenizer()
    t.pad_token = None
    with pytest.raises(DataError, match="ensure_pad_token"):
        make_collator(t, packing=False, max_seq_len=64)
    t.pad_token = t.eos_token  # EOS as filler: a learned EOS stays a label, pads never are
    eos = t.eos_token_id
    batch = make_collator(t, packing=False, max_seq_len=64)([
        {"input_ids": [5, 6, eos], "labels": [-100, 6, eos]},
        {"input_ids": [5, eos], "labels": [-100, eos]},
    ])
    assert batch["labels"].tolist() == [[-100, 6, eos], [-100, eos, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    t = build_tiny_tokenizer()
    rows = samples(t)
    for packing in (False, True):
        with pytest.raises(DataError, match="max_seq_len=8.*qlora prepare"):
            make_collator(t, packing=packing, max_seq_len=8)(rows)
