"""Split determinism, atomic writes, loading, and the shipped demo data."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from qlora_pipeline.config import DataConfig
from qlora_pipeline.core.data.prepare import prepare_data
from qlora_pipeline.core.data.store import length_histogram, load_prepared, write_prepared
from qlora_pipeline.core.data import store
from qlora_pipeline.core.tiny import build_tiny_tokenizer
from qlora_pipeline.errors import DataError

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "data" / "demo"


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def write_records(path: Path, n: int) -> None:
    lines = [json.dumps({"instruction": f"Say {i}.", "output": str(i)}) for i in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def split_sources(prepared) -> tuple[list[str], list[str]]:
    return list(prepared.train["source"]), list(prepared.eval["source"])


def test_split_is_deterministic_by_seed(tmp_path, tok):
    write_records(tmp_path / "d.jsonl", 50)
    cfg = DataConfig(raw_path="d.jsonl", eval_fraction=0.2, seed=7)
    first, again = prepare_data(cfg, tok, tmp_path), prepare_data(cfg, tok, tmp_path)
    assert split_sources(first) == split_sources(again)
    assert list(first.train["input_ids"]) == list(again.train["input_ids"])
    train, evaluation = split_sources(first)
    assert len(evaluation) == 10 and len(train) == 40 and not set(train) & set(evaluation)
    other = prepare_data(cfg.model_copy(update={"seed": 8}), tok, tmp_path)
    assert set(split_sources(other)[1]) != set(evaluation)
    # The split follows content, not position: the same records in another order split the same way.
    lines = (tmp_path / "d.jsonl").read_text().splitlines()
    (tmp_path / "d.jsonl").write_text("\n".join(reversed(lines)) + "\n")
    shuffled = prepare_data(cfg, tok, tmp_path)
    assert sorted(shuffled.eval["reference"]) == sorted(first.eval["reference"])


def test_min_eval_rows_is_honoured(tmp_path, tok):
    write_records(tmp_path / "d.jsonl", 20)
    prepared = prepare_data(DataConfig(raw_path="d.jsonl", eval_fraction=0.05, min_eval_rows=4), tok, tmp_path)
    assert prepared.stats["rows_eval"] == 4 and prepared.stats["rows_train"] == 16


def test_text_documents_do_not_leak_across_splits(tmp_path, tok):
    docs = [f"paragraph {i} about a topic number {i}" for i in range(30)]
    (tmp_path / "t.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    prepared = prepare_data(DataConfig(raw_path="t.txt", max_seq_len=24, eval_fraction=0.2), tok, tmp_path)
    decoded_train = tok.decode([t for row in prepared.train["input_ids"] for t in row])
    decoded_eval = tok.decode([t for row in prepared.eval["input_ids"] for t in row])
    in_train = [d for d in docs if d in decoded_train]
    in_eval = [d for d in docs if d in decoded_eval]
    assert len(in_eval) == 6 and len(in_train) == 24 and not set(in_train) & set(in_eval)
    # text_unit=file: the whole file is one document, so there is nothing to split.
    with pytest.raises(DataError, match="too few rows to split: 1 usable"):
        prepare_data(DataConfig(raw_path="t.txt", text_unit="file"), tok, tmp_path)


def test_write_and_load_round_trip(tmp_path, tok):
    write_records(tmp_path / "d.jsonl", 20)
    prepared = prepare_data(DataConfig(raw_path="d.jsonl"), tok, tmp_path)
    out = tmp_path / "prepared"
    write_prepared(prepared, out)
    assert sorted(p.name for p in out.iterdir()) == ["eval.parquet", "lengths.csv", "report.json", "stats.json", "train.parquet"]
    train = load_prepared(out, "train")
    assert train.column_names == ["input_ids", "labels", "source", "prompt", "reference"]
    assert list(train["input_ids"]) == list(prepared.train["input_ids"]) and list(train["labels"]) == list(prepared.train["labels"])
    assert json.loads((out / "stats.json").read_text())["rows_train"] == len(train)
    assert json.loads((out / "report.json").read_text())["bad_fraction"] == 0
    with (out / "lengths.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert sum(int(r["count"]) for r in table) == len(prepared.lengths) == 20
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failed_write_leaves_previous_output_intact(tmp_path, tok, monkeypatch):
    write_records(tmp_path / "d.jsonl", 20)
    out = tmp_path / "prepared"
    write_prepared(prepare_data(DataConfig(raw_path="d.jsonl"), tok, tmp_path), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    write_records(tmp_path / "d.jsonl", 30)
    newer = prepare_data(DataConfig(raw_path="d.jsonl"), tok, tmp_path)

    def broken(path, lengths):
        path.write_text("half a file")
        raise OSError("disk full")

    monkeypatch.setattr(store, "_write_histogram", broken)
    with pytest.raises(OSError, match="disk full"):
        write_prepared(newer, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # temp folder cleaned up

    monkeypatch.undo()
    write_prepared(newer, out)  # and a good write replaces it
    assert len(load_prepared(out, "train")) + len(load_prepared(out, "eval")) == 30


def test_load_prepared_missing_says_run_prepare(tmp_path):
    with pytest.raises(DataError, match="run `qlora prepare` first"):
        load_prepared(tmp_path / "nothing", "train")
    with pytest.raises(DataError, match="unknown split"):
        load_prepared(tmp_path, "test")


def test_length_histogram():
    assert length_histogram([]) == []
    assert length_histogram([1, 2, 2, 5]) == [(0, 0), (1, 1), (2, 2), (3, 0), (4, 0), (5, 1)]
    table = length_histogram([10, 500, 512])
    assert table[0] == (0, 1) and table[-1] == (512, 1) and len(table) == 33  # width 16


def test_demo_data_prepares_cleanly(tmp_path, tok):
    # As `make data` seeds data/raw: the demo files without the generator script.
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    for name in ("instructions.jsonl", "notes.txt"):
        shutil.copy(DEMO / name, raw / name)
    prepared = prepare_data(DataConfig(), tok, tmp_path)
    assert prepared.stats["files"] == ["data/raw/instructions.jsonl", "data/raw/notes.txt"]
    assert prepared.report["bad_rows"] == [] and prepared.stats["rows_dropped"] == {}
    assert prepared.stats["formats"] == {"instruction": 300, "text": 5}
    records = [r for r in prepared.train if r["prompt"]]
    assert max(len(r["input_ids"]) for r in records) <= 100
    assert sum(p.stat().st_size for p in DEMO.iterdir()) < 200_000


def test_demo_generator_reproduces_the_committed_file():
    spec = importlib.util.spec_from_file_location("make_demo_data", DEMO / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lines = [json.dumps(r, ensure_ascii=False) for r in module.make_records()]
    assert (DEMO / "instructions.jsonl").read_text(encoding="utf-8") == "\n".join(lines) + "\n"
    assert len(lines) == 300


def test_datasets_never_pickle_the_tables_to_fingerprint_them(tmp_path, tok, monkeypatch):
    # datasets fingerprints a Dataset built without one by pickling its whole table with dill: slow
    # for big splits, and on some Python 3.12 setups it fails (pyarrow's MonthDayNano type). The
    # prepared splits carry a fingerprint of their content instead, the same for the same rows.
    import datasets.arrow_dataset

    def refuse(*args, **kwargs):
        raise AssertionError("a table was pickled to fingerprint it")

    monkeypatch.setattr(datasets.arrow_dataset, "generate_fingerprint", refuse)
    write_records(tmp_path / "d.jsonl", 30)
    cfg = DataConfig(raw_path="d.jsonl", eval_fraction=0.2, seed=3)
    first, again = prepare_data(cfg, tok, tmp_path), prepare_data(cfg, tok, tmp_path)
    assert first.train._fingerprint == again.train._fingerprint != first.eval._fingerprint
    write_prepared(first, tmp_path / "out")
    loaded = load_prepared(tmp_path / "out", "train")
    assert loaded._fingerprint == load_prepared(tmp_path / "out", "train")._fingerprint != load_prepared(tmp_path / "out", "eval")._fingerprint
    assert loaded.features == first.train.features == store.FEATURES
    assert loaded.remove_columns(["source"]).column_names == [c for c in store.COLUMNS if c != "source"]


def test_slices_of_a_table_get_their_own_fingerprints():
    import pyarrow as pa

    table = pa.table({"input_ids": [[1, 2], [3], [4, 5, 6], [7]]})
    prints = {store.as_dataset(t)._fingerprint for t in (table, table.slice(0, 2), table.slice(2, 2))}
    assert len(prints) == 3


def test_prepared_data_is_refused_for_another_models_tokenizer(tmp_path, tok):
    """Data tokenized for one model, then trained or scored with another: a clear error before any
    model loads, not an IndexError inside the embedding."""
    write_records(tmp_path / "d.jsonl", 20)
    prepared = prepare_data(DataConfig(raw_path="d.jsonl", eval_fraction=0.2), tok, tmp_path)
    out = tmp_path / "prepared"
    write_prepared(prepared, out, tok, "builtin:tiny-llama")
    record = json.loads((out / "tokenizer.json").read_text())
    assert record["tokens"] == len(tok) and record["model"] == "builtin:tiny-llama"
    assert str(tmp_path) not in json.dumps(record)  # no machine's paths: the same data hashes the same in every checkout
    assert len(load_prepared(out, "train", tok, "builtin:tiny-llama")) == 16  # its own tokenizer passes

    other = build_tiny_tokenizer()
    other.add_tokens(["<extra-token>"])
    with pytest.raises(DataError, match=r"tokenized by another tokenizer \(builtin:tiny-llama, \d+ tokens\) than this model's \(other, \d+ tokens\); run `qlora prepare` again with this model"):
        load_prepared(out, "eval", other, "other")

    # no record (data prepared before records were written): ids past the tokenizer's end still fail clearly
    (out / "tokenizer.json").unlink()
    small = build_tiny_tokenizer()
    top = max(max(ids) for ids in prepared.train["input_ids"])
    small_len = len(small)
    assert top < small_len
    import pyarrow.parquet as pq

    table = pq.read_table(out / "train.parquet")
    rows = table.column("input_ids").to_pylist()
    rows[0] = rows[0][:-1] + [small_len + 5]
    pq.write_table(table.set_column(table.column_names.index("input_ids"), "input_ids", [rows]), out / "train.parquet")
    with pytest.raises(DataError, match=rf"holds token id {small_len + 5}, past the end of this model's tokenizer"):
        load_prepared(out, "train", small)
