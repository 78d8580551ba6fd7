"""Data layer: raw files -> validated, tokenized, split datasets with completion-only labels.

    from qlora_pipeline.core.data import prepare_data, write_prepared, load_prepared, make_collator
    prepared = prepare_data(cfg.data, tokenizer, root=Path("."))
    write_prepared(prepared, Path("data/prepared"))
    train = load_prepared(Path("data/prepared"), "train")
    collator = make_collator(tokenizer, packing=cfg.data.packing, max_seq_len=cfg.data.max_seq_len)

Formats, masking and validation rules: docs/data-formats.md.
"""

from qlora_pipeline.core.data.collate import PackingCollator, PaddingCollator, make_collator
from qlora_pipeline.core.data.encode import (
    IGNORE_INDEX,
    alpaca_prompt,
    check_pad_token,
    encode_prompt,
    ensure_pad_token,
)
from qlora_pipeline.core.data.prepare import COLUMNS, PreparedData, prepare_data
from qlora_pipeline.core.data.sources import SUPPORTED_EXTENSIONS
from qlora_pipeline.core.data.store import length_histogram, load_prepared, write_prepared

__all__ = [
    "COLUMNS",
    "IGNORE_INDEX",
    "SUPPORTED_EXTENSIONS",
    "PackingCollator",
    "PaddingCollator",
    "PreparedData",
    "alpaca_prompt",
    "check_pad_token",
    "encode_prompt",
    "ensure_pad_token",
    "length_histogram",
    "load_prepared",
    "make_collator",
    "prepare_data",
    "write_prepared",
]
