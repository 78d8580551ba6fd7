"""Prepared data on disk: train/eval Parquet, stats, validation report, length histogram.

`write_prepared` builds everything in a temporary folder next to the target and swaps it in
(qlora_pipeline.atomic), so a failed write leaves the previous output as it was.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from qlora_pipeline.atomic import atomic_dir
from qlora_pipeline.errors import DataError

SPLITS = ("train", "eval")
COLUMNS = ("input_ids", "labels", "source", "prompt", "reference")
FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "source": datasets.Value("string"),
        "prompt": datasets.Value("string"),
        "reference": datasets.Value("string"),
    }
)


@dataclass
class PreparedData:
    """What prepare_data returns and write_prepared stores: the splits (COLUMNS), stats, report."""

    train: datasets.Dataset
    eval: datasets.Dataset
    stats: dict[str, Any]
    report: dict[str, Any]
    lengths: list[int] = field(default_factory=list)


_HISTOGRAM_BUCKETS = 32


def length_histogram(lengths: list[int]) -> list[tuple[int, int]]:
    """(bucket lower bound, row count) over equal power-of-two-wide token ranges, empty buckets included."""
    if not lengths:
        return []
    # e.g. longest row 512 tokens: width 16 -> buckets 0, 16, ..., 512 (at most ~33 bars)
    width = 1 << max(0, math.ceil(math.log2(max(lengths) / _HISTOGRAM_BUCKETS)))
    counts = [0] * (max(lengths) // width + 1)
    for n in lengths:
        counts[n // width] += 1
    return [(i * width, c) for i, c in enumerate(counts)]


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_histogram(path: Path, lengths: list[int]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["bucket", "count"])
        writer.writerows(length_histogram(lengths))


def _write_files(prepared: PreparedData, folder: Path) -> None:
    for name, dataset in (("train", prepared.train), ("eval", prepared.eval)):
        pq.write_table(dataset.with_format("arrow")[:], folder / f"{name}.parquet")
    _write_json(folder / "stats.json", prepared.stats)
    _write_json(folder / "report.json", prepared.report)
    _write_histogram(folder / "lengths.csv", prepared.lengths)


TOKENIZER_RECORD = "tokenizer.json"


def tokenizer_record(tokenizer: Any, model: str = "") -> dict[str, Any]:
    """What identifies the tokenizer the data was tokenized with: the model it came with (model.name,
    as params.yaml names it: no machine's paths), its size (pad token included) and a digest of its
    vocabulary (token -> id)."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return {"model": model, "tokens": len(tokenizer), "vocab_sha256": hashlib.sha256(vocab.encode()).hexdigest()}


def write_prepared(prepared: PreparedData, out_dir: Path, tokenizer: Any = None, model: str = "") -> None:
    """Write train/eval.parquet, stats.json, report.json, lengths.csv and (given the tokenizer)
    tokenizer.json into out_dir, atomically."""
    with atomic_dir(out_dir) as tmp:
        _write_files(prepared, tmp)
        if tokenizer is not None:
            _write_json(tmp / TOKENIZER_RECORD, tokenizer_record(tokenizer, model))


def _check_tokenizer(out_dir: Path, table: pa.Table, tokenizer: Any, model: str) -> None:
    """The split was tokenized by this tokenizer: its record matches, and no id is past its end.

    Raises:
        DataError: another tokenizer (another model) made the prepared data.
    """
    fix = "run `qlora prepare` again with this model (`dvc repro` does)"
    record_path = Path(out_dir) / TOKENIZER_RECORD
    if record_path.is_file():
        record, now = json.loads(record_path.read_text()), tokenizer_record(tokenizer, model)
        if (record.get("tokens"), record.get("vocab_sha256")) != (now["tokens"], now["vocab_sha256"]):
            raise DataError(
                f"{out_dir} was tokenized by another tokenizer ({record.get('model') or 'unnamed'}, {record.get('tokens')} tokens) "
                f"than this model's ({model or 'unnamed'}, {now['tokens']} tokens); {fix}"
            )
    import pyarrow.compute as pc

    ids = pc.list_flatten(table.column("input_ids"))
    top = pc.max(ids).as_py() if len(ids) else None
    if top is not None and top >= len(tokenizer):
        raise DataError(f"{out_dir} holds token id {top}, past the end of this model's tokenizer ({len(tokenizer)} tokens); {fix}")


def load_prepared(out_dir: Path, split: str, tokenizer: Any = None, model: str = "") -> datasets.Dataset:
    """The prepared train or eval split as an in-memory Dataset; given the tokenizer, checked to be
    tokenized by it (DataError otherwise, before any model is loaded)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    path = Path(out_dir) / f"{split}.parquet"
    if not path.is_file():
        raise DataError(f"{path} not found: the data has not been prepared; run `qlora prepare` first (or `dvc repro prepare`)")
    table = pq.read_table(path)
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(f"{path} lacks columns {', '.join(missing)}; it is stale or foreign, run `qlora prepare` again")
    if tokenizer is not None:
        _check_tokenizer(Path(out_dir), table, tokenizer, model)
    return as_dataset(table)


def as_dataset(table: pa.Table) -> datasets.Dataset:
    """An in-memory Dataset of a prepared table, fingerprinted from its content (xxhash of its Arrow
    buffers): datasets would otherwise pickle the whole table with dill to fingerprint it, which is
    slow for big splits and fails on some Python 3.12 setups (pyarrow's MonthDayNano type)."""
    import xxhash

    digest = xxhash.xxh3_128()
    digest.update(repr(table.schema).encode())
    for column in table.columns:
        for chunk in column.chunks:
            digest.update(f"{chunk.offset}:{len(chunk)}".encode())  # a slice shares its parent's buffers
            for buffer in chunk.buffers():
                if buffer is not None:
                    digest.update(memoryview(buffer))
    return datasets.Dataset(table, fingerprint=digest.hexdigest())
