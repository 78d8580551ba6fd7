"""Data layer: raw files -> validated, tokenized, split datasets with completion-only labels.

    from qlora_pipeline.core.data.collate import make_collator
    from qlora_pipeline.core.data.prepare import prepare_data
    from qlora_pipeline.core.data.store import load_prepared, write_prepared
    prepared = prepare_data(cfg.data, tokenizer, root=Path("."))
    write_prepared(prepared, Path("data/prepared"))
    train = load_prepared(Path("data/prepared"), "train")
    collator = make_collator(tokenizer, packing=cfg.data.packing, max_seq_len=cfg.data.max_seq_len)

Nothing is imported here: a stage loads only the modules it uses, which are its dvc.yaml deps
(tests/unit/test_dvc_deps.py). sources: files and formats; records: rows to messages; encode:
templates, tokens and labels; prepare: validation and the split; store: parquet on disk; collate:
batches.
"""
