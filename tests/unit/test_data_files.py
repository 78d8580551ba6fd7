"""Raw data files (issue 12, items 5-9): compressed files, byte-order marks, per-file column
mappings, the `-S` syntax for data.columns, and data.raw_path as something DVC can track."""

from __future__ import annotations

import bz2
import codecs
import gzip
import json
import lzma
from pathlib import Path

import pytest
import yaml

from qlora_pipeline.config import DataConfig, load_config, validate_params
from qlora_pipeline.overrides import apply_overrides, parse_override
from qlora_pipeline.core.data.prepare import prepare_data
from qlora_pipeline.core.data.sources import glob_to_regex, read_file, resolve_files
from qlora_pipeline.core.tiny import build_tiny_tokenizer
from qlora_pipeline.errors import ConfigError, DataError

from ..conftest import DEFAULT_PARAMS, REPO

ROWS = [{"instruction": f"Say the number {i}.", "input": "", "output": f"{i}"} for i in range(8)]
# Each text format holding ROWS, with the line each row starts on.
TEXT_FORMATS = {
    ".jsonl": ("".join(json.dumps(r) + "\n" for r in ROWS), list(range(1, 9))),
    ".json": ("[\n" + ",\n".join(json.dumps(r) for r in ROWS) + "\n]\n", list(range(2, 10))),
    ".csv": ("instruction,input,output\n" + "".join(f'"{r["instruction"]}",,{r["output"]}\n' for r in ROWS), list(range(2, 10))),
    ".txt": ("".join(f"{r['instruction']}\n\n" for r in ROWS), list(range(1, 17, 2))),
}


def zstd_compress(data: bytes) -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as out:
        out.write(data)
    return sink.getvalue().to_pybytes()


COMPRESSORS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress, ".zst": zstd_compress}


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def read(path: Path, root: Path):
    rows = read_file(path, root, "paragraph")
    return [(r.source, r.fields) for r in rows.rows], [(b.source, b.reason) for b in rows.bad]


# --- 5. compressed files ---------------------------------------------------------------------


@pytest.mark.parametrize("compression", sorted(COMPRESSORS))
@pytest.mark.parametrize("suffix", sorted(TEXT_FORMATS))
def test_compressed_text_files_read_like_the_plain_file(tmp_path, suffix, compression):
    text, lines = TEXT_FORMATS[suffix]
    plain = tmp_path / f"d{suffix}"
    plain.write_text(text, encoding="utf-8")
    packed = tmp_path / f"d{suffix}{compression.upper() if compression == '.gz' else compression}"
    packed.write_bytes(COMPRESSORS[compression](text.encode()))

    assert resolve_files(packed.name, tmp_path) == [packed]
    rows, bad = read(packed, tmp_path)
    plain_rows, _ = read(plain, tmp_path)
    assert bad == []
    assert [s for s, _ in rows] == [f"{packed.name}:{n}" for n in lines]
    assert [f for _, f in rows] == [f for _, f in plain_rows]


def test_bad_rows_in_a_compressed_file_name_file_and_line(tmp_path, tok):
    lines = [json.dumps(r) for r in ROWS]
    lines[2] = '{"instruction": "broken", "output": '
    data = ("\n".join(lines) + "\n").encode() + b'{"instruction": "caf\xe9", "output": "x"}\n'
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "d.jsonl.gz").write_bytes(gzip.compress(data))
    prepared = prepare_data(DataConfig(raw_path="raw", max_bad_fraction=0.5), tok, root=tmp_path)
    assert [(b["source"], b["reason"]) for b in prepared.report["bad_rows"]] == [
        ("raw/d.jsonl.gz:3", "broken_json"),
        ("raw/d.jsonl.gz:9", "not_utf8"),
    ]
    assert prepared.stats["rows_read"] == 9 and prepared.stats["files"] == ["raw/d.jsonl.gz"]
    assert sorted([*prepared.train["source"], *prepared.eval["source"]]) == sorted(
        f"raw/d.jsonl.gz:{n}" for n in (1, 2, 4, 5, 6, 7, 8)
    )


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("d.jsonl.gz", b"not gzip at all", r"d\.jsonl\.gz: not a readable gzip file"),
        ("d.jsonl.gz", gzip.compress(b'{"a": 1}\n' * 50, mtime=0)[:-12], r"d\.jsonl\.gz: not a readable gzip file"),
        ("d.csv.xz", b"junk", r"d\.csv\.xz: not a readable xz file"),
        ("d.txt.bz2", b"junk", r"d\.txt\.bz2: not a readable bzip2 file"),
        ("d.json.zst", b"junk", r"d\.json\.zst: not a readable zstd file"),
        ("d.jsonl.gz", gzip.compress(b"\n\n", mtime=0), r"d\.jsonl\.gz: the file is empty"),
        ("d.txt.gz", gzip.compress(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", mtime=0), r"d\.txt\.gz: looks like a binary file"),
    ],
    # ids without the bytes: every xdist worker must collect the same test names
    ids=["not-gzip", "truncated-gzip", "junk-xz", "junk-bz2", "junk-zstd", "empty-gzip", "binary-in-gzip"],
)
def test_broken_compressed_files_fail_naming_the_file(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=match):
        read_file(tmp_path / name, tmp_path, "paragraph")


@pytest.mark.parametrize("name", ["d.parquet.gz", "d.gz", "d.tar.gz", "d.jsonl.zip"])
def test_unsupported_compressed_names_are_refused_listing_what_is_read(tmp_path, name):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / name).write_bytes(b"x")
    with pytest.raises(DataError, match=rf"raw/{name.replace('.', '[.]')}; supported extensions: .*\.jsonl.*compressed \(\.gz, \.bz2, \.xz, \.zst\)"):
        resolve_files("raw", tmp_path)


# --- 6. byte-order marks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "encode",
    [
        pytest.param(lambda t: codecs.BOM_UTF8 + t.encode("utf-8"), id="utf-8-bom"),
        pytest.param(lambda t: t.encode("utf-16"), id="utf-16-native-bom"),
        pytest.param(lambda t: codecs.BOM_UTF16_LE + t.encode("utf-16-le"), id="utf-16-le"),
        pytest.param(lambda t: codecs.BOM_UTF16_BE + t.encode("utf-16-be"), id="utf-16-be"),
        pytest.param(lambda t: codecs.BOM_UTF32_LE + t.encode("utf-32-le"), id="utf-32-le"),
        pytest.param(lambda t: gzip.compress(codecs.BOM_UTF8 + t.encode("utf-8")), id="utf-8-bom-gzipped"),
    ],
)
@pytest.mark.parametrize("suffix", sorted(TEXT_FORMATS))
def test_byte_order_marks_one_rule_for_every_text_format(tmp_path, suffix, encode):
    text, lines = TEXT_FORMATS[suffix]
    (tmp_path / f"plain{suffix}").write_text(text, encoding="utf-8")
    name = f"bom{suffix}.gz" if encode(" ")[:2] == b"\x1f\x8b" else f"bom{suffix}"
    (tmp_path / name).write_bytes(encode(text))
    rows, bad = read(tmp_path / name, tmp_path)
    plain_rows, _ = read(tmp_path / f"plain{suffix}", tmp_path)
    assert bad == []
    # Every row, the first included, is read with the same fields and lines as the file without a mark.
    assert [s for s, _ in rows] == [f"{name}:{n}" for n in lines]
    assert [f for _, f in rows] == [f for _, f in plain_rows]
    assert all("\ufeff" not in "".join(map(str, [*f.keys(), *f.values()])) for _, f in rows)


def test_invalid_utf16_after_its_mark_is_refused_at_its_line(tmp_path):
    body = "\n".join(json.dumps(r) for r in ROWS[:3]).encode("utf-16-le") + b"\n\x00" + b"\x00\xd8" + b"x\x00"
    (tmp_path / "d.jsonl").write_bytes(codecs.BOM_UTF16_LE + body)
    with pytest.raises(DataError, match=r"d\.jsonl:4: the file starts with a UTF-16 byte-order mark but is not valid UTF-16.*re-save it as UTF-8"):
        read_file(tmp_path / "d.jsonl", tmp_path, "paragraph")


def test_utf16_without_a_mark_is_refused_with_the_hint(tmp_path):
    (tmp_path / "d.jsonl").write_bytes("".join(json.dumps(r) + "\n" for r in ROWS).encode("utf-16-le"))
    with pytest.raises(DataError, match=r"d\.jsonl: looks like a binary file.*UTF-16 text without a byte-order mark"):
        read_file(tmp_path / "d.jsonl", tmp_path, "paragraph")


# --- 7. column mappings, flat and per file ---------------------------------------------------


def write_mixed_folder(root: Path) -> None:
    """data/raw/main.jsonl uses our names; extra/*.jsonl and legacy.csv name the same fields differently."""
    raw = root / "data" / "raw"
    (raw / "extra").mkdir(parents=True)
    (raw / "main.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (raw / "extra" / "qa.jsonl").write_text(
        "".join(json.dumps({"question": f"Name color {i}.", "answer": f"c{i}"}) + "\n" for i in range(6))
    )
    (raw / "legacy.csv").write_text("prompt_text,reply\n" + "".join(f"Count {i}.,{i}\n" for i in range(5)))


def test_per_file_mapping_reads_a_folder_whose_files_name_fields_differently(tmp_path, tok):
    write_mixed_folder(tmp_path)
    columns = {"extra/*.jsonl": {"instruction": "question", "output": "answer"}, "legacy.csv": {"prompt": "prompt_text", "completion": "reply"}}
    prepared = prepare_data(DataConfig(raw_path="data/raw", columns=columns, max_bad_fraction=0.0), tok, root=tmp_path)
    assert prepared.report["bad_rows"] == [] and prepared.stats["rows_read"] == 19
    rows = {r["source"]: r for r in [*prepared.train, *prepared.eval]}
    assert len(rows) == 19
    # The mapping was applied: the renamed columns are the prompt and the reference.
    assert "Name color 3." in rows["data/raw/extra/qa.jsonl:4"]["prompt"] and rows["data/raw/extra/qa.jsonl:4"]["reference"] == "c3"
    assert "Count 1." in rows["data/raw/legacy.csv:3"]["prompt"] and rows["data/raw/legacy.csv:3"]["reference"] == "1"
    assert "Say the number 2." in rows["data/raw/main.jsonl:3"]["prompt"] and rows["data/raw/main.jsonl:3"]["reference"] == "2"

    # The same mapping as a list of {path, columns} (how `qlora check` prints it) reads the same rows.
    as_list = [{"path": p, "columns": m} for p, m in columns.items()]
    again = prepare_data(DataConfig(raw_path="data/raw", columns=as_list, max_bad_fraction=0.0), tok, root=tmp_path)
    assert sorted(again.train["source"]) == sorted(prepared.train["source"])


def test_first_matching_glob_wins_and_unmatched_files_keep_their_names(tmp_path, tok):
    write_mixed_folder(tmp_path)
    columns = {
        "extra/qa.jsonl": {"instruction": "question", "output": "answer"},
        "extra/*": {"instruction": "nope"},  # shadowed by the line above for qa.jsonl
        "*.csv": {"prompt": "prompt_text", "completion": "reply"},
    }
    prepared = prepare_data(DataConfig(raw_path="data/raw", columns=columns, max_bad_fraction=0.0), tok, root=tmp_path)
    assert prepared.stats["rows_read"] == 19 and prepared.report["counts"] == {}


def test_the_old_flat_form_applies_to_every_file(tmp_path, tok):
    (tmp_path / "r").mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / "r" / name).write_text("".join(json.dumps({"q": f"{name} {i}?", "a": str(i)}) + "\n" for i in range(5)))
    prepared = prepare_data(DataConfig(raw_path="r", columns={"instruction": "q", "output": "a"}), tok, root=tmp_path)
    assert prepared.report["bad_rows"] == [] and prepared.stats["formats"] == {"instruction": 10}


def test_flat_mapping_over_a_mixed_folder_says_what_it_expected_and_found(tmp_path, tok):
    """Once reported as "fields [] match no format": a file that already uses the default names."""
    write_mixed_folder(tmp_path)
    (tmp_path / "data" / "raw" / "main.jsonl").write_text(
        "".join(json.dumps({"instruction": r["instruction"], "output": r["output"]}) + "\n" for r in ROWS)
    )
    with pytest.raises(DataError) as failed:
        prepare_data(DataConfig(raw_path="data/raw", columns={"instruction": "question", "output": "answer"}), tok, root=tmp_path)
    message = str(failed.value)
    assert "13 of 19 rows are bad" in message
    line = next(l for l in message.splitlines() if l.startswith("  data/raw/main.jsonl:1: wrong_columns"))
    # What was expected, what was found (the row's own names, then what the mapping left), and the fix.
    assert "expected text | instruction+output (+input) | prompt+completion | messages | conversations" in line
    assert "found ['instruction', 'output'] ([] after data.columns)" in line
    assert "data.columns reads 'question' as instruction, 'answer' as output, but the row has no 'question', 'answer' column" in line
    assert "its own 'instruction', 'output' column is not read" in line
    assert 'map only the files that differ, per glob, e.g. data.columns: {"extra/*.jsonl": {instruction: question}}' in line


def test_per_file_mapping_names_the_glob_and_unmatched_files(tmp_path, tok):
    write_mixed_folder(tmp_path)
    cfg = DataConfig(raw_path="data/raw", columns={"extra/*.jsonl": {"instruction": "question", "output": "reply"}}, max_bad_fraction=1.0)
    prepared = prepare_data(cfg, tok, root=tmp_path)
    details = {b["source"]: (b["reason"], b["detail"]) for b in prepared.report["bad_rows"]}
    reason, detail = details["data/raw/extra/qa.jsonl:1"]
    assert reason == "missing_field"
    assert "data.columns['extra/*.jsonl'] reads 'reply' as output, but the row has no 'reply' column" in detail
    reason, detail = details["data/raw/legacy.csv:2"]
    assert reason == "wrong_columns" and "found ['prompt_text', 'reply']" in detail
    assert "No data.columns glob matches this file ('extra/*.jsonl')" in detail
    assert prepared.report["counts"] == {"missing_field": 6, "wrong_columns": 5}


def test_glob_matches_the_end_of_the_path_by_whole_names():
    cases = {
        ("extra/*.jsonl", "data/raw/extra/a.jsonl"): True,
        ("extra/*.jsonl", "data/raw/extra/sub/a.jsonl"): False,
        ("extra/**/*.jsonl", "data/raw/extra/sub/a.jsonl"): True,
        ("extra/**/*.jsonl", "data/raw/extra/a.jsonl"): True,
        ("a.jsonl", "data/raw/ba.jsonl"): False,
        ("*.csv", "data/raw/x.csv.gz"): False,
        ("*.csv*", "data/raw/x.csv.gz"): True,
        ("/abs/*/a.jsonl", "/abs/q/a.jsonl"): True,
        ("/abs/*/a.jsonl", "/x/abs/q/a.jsonl"): False,
        ("[!a]?.jsonl", "r/b1.jsonl"): True,
        ("**", "anything/at/all.txt"): True,
    }
    assert {k: bool(glob_to_regex(k[0]).search(k[1])) for k in cases} == cases


@pytest.mark.parametrize(
    ("columns", "match"),
    [
        ({"question": "q"}, r"data\.columns: unknown field\(s\) question; map one of text"),
        ({"extra/*.jsonl": "question"}, r"unknown field\(s\) extra/\*\.jsonl.*looks like a file glob: a per-file mapping takes a mapping"),
        ({"extra/*.jsonl": {"answerz": "a"}}, r"data\.columns: glob 'extra/\*\.jsonl': unknown field\(s\) answerz"),
        ({"instruction": "q", "extra/*.jsonl": {"output": "a"}}, r"mixes field: column entries \(instruction\) with per-file glob.*\(extra/\*\.jsonl\); use one form"),
        ({"instruction": "q", "input": "q"}, r"instruction and input both read the column 'q'"),
        ({"instruction": ""}, r"column names must be non-empty strings \(got instruction: ''\)"),
        ([{"path": "a/*.csv"}], r"item 1: a list item must be \{path: <glob>, columns: \{field: column\}\}"),
        ("{instruction: [oops", r"data\.columns: not a YAML mapping"),
        ("instruction=question", r"data\.columns: must be a mapping"),
    ],
)
def test_column_mapping_validation_names_the_problem(columns, match):
    with pytest.raises(ConfigError, match=match):
        validate_params({"data": {"columns": columns}})


def test_per_file_mapping_is_written_as_a_list_mlflow_can_log():
    cfg = validate_params({"data": {"columns": {"extra/*.jsonl": {"instruction": "question"}}}})
    assert cfg.data.columns == {"extra/*.jsonl": {"instruction": "question"}}
    dumped = cfg.model_dump(mode="json")["data"]["columns"]
    assert dumped == [{"path": "extra/*.jsonl", "columns": {"instruction": "question"}}]
    assert validate_params({"data": {"columns": dumped}}).data.columns == cfg.data.columns
    flat = cfg.flat()
    assert json.loads(flat["data.columns"]) == dumped and not any("*" in key for key in flat)
    assert validate_params({"data": {"columns": {"instruction": "q"}}}).flat()["data.columns.instruction"] == "q"


# --- 8. one -S syntax for data.columns in qlora and in dvc exp run ---------------------------


@pytest.mark.parametrize(
    ("start", "override", "expected"),
    [
        # The documented form: the whole mapping, quoted; it replaces what params.yaml holds.
        ({}, "data.columns='{instruction: question, output: answer}'", {"instruction": "question", "output": "answer"}),
        ({"output": "answer"}, "data.columns='{instruction: question}'", {"instruction": "question"}),
        ("{output: answer}", "data.columns='{instruction: question}'", {"instruction": "question"}),
        ({"instruction": "q"}, "data.columns='{}'", {}),
        ({}, """data.columns='{"extra/*.jsonl": {instruction: question}}'""", {"extra/*.jsonl": {"instruction": "question"}}),
        # DVC's prefixes, as its error message suggests them, are accepted too.
        ({}, "+data.columns.instruction=question", {"instruction": "question"}),
        ({"instruction": "q"}, "++data.columns.instruction=question", {"instruction": "question"}),
        ({}, "data.columns={instruction: question}", {"instruction": "question"}),
    ],
)
def test_qlora_set_reads_the_dvc_syntax(tmp_path, start, override, expected):
    params = tmp_path / "params.yaml"
    params.write_text((DEFAULT_PARAMS).read_text())
    raw = apply_overrides(yaml.safe_load(params.read_text()), {"data.columns": start})
    params.write_text(yaml.safe_dump(raw))
    assert load_config(params, [override]).data.columns == expected


def test_set_errors_name_the_fix():
    with pytest.raises(ConfigError, match=r"deleting a key \(~\) is not supported.*data\.columns='\{\}'"):
        parse_override("~data.columns")
    with pytest.raises(ConfigError, match=r"data\.columns is '\{output: answer\}', not a section; set data\.columns whole.*data\.columns='\{instruction: question\}'"):
        apply_overrides({"data": {"columns": "{output: answer}"}}, ["data.columns.instruction=question"])
    assert parse_override("++lora.r=8") == (["lora", "r"], 8)
    assert parse_override("+data.columns.instruction=question") == (["data", "columns", "instruction"], "question")


# --- 9. data.raw_path must be something DVC can track ----------------------------------------


@pytest.mark.parametrize("raw_path", ["data/raw/**/*.jsonl", "data/raw/*.jsonl", "data/raw/part-?.csv"])
def test_a_glob_raw_path_is_refused_with_the_fix(raw_path):
    with pytest.raises(ConfigError, match=r"data\.raw_path: .* is a glob; DVC cannot track a glob.*Set data\.raw_path to the folder that holds them \(data/raw\)"):
        validate_params({"data": {"raw_path": raw_path}})


def test_resolve_files_refuses_a_glob_that_bypassed_the_config(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.jsonl").write_text("{}\n")
    with pytest.raises(DataError, match=r"data\.raw_path: 'raw/\*\.jsonl' is a glob.*folder that holds them \(raw\)"):
        resolve_files("raw/*.jsonl", tmp_path)


def test_dvc_yaml_makes_raw_path_the_prepare_dependency():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert "${data.raw_path}" in stages["prepare"]["deps"]
    assert "data/raw" not in stages["prepare"]["deps"]
