"""Validation: each kind of bad row is reported at its file:line, the threshold works both ways,
and file-level problems fail with a message that names the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from pydantic import ValidationError

from qlora_pipeline.config import DataConfig
from qlora_pipeline.core.data.prepare import prepare_data
from qlora_pipeline.core.tiny import build_tiny_tokenizer
from qlora_pipeline.errors import DataError


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def good(i: int) -> dict:
    return {"instruction": f"Say the number {i}.", "input": "", "output": f"{i}"}


def good_lines(n: int, start: int = 0) -> list[str]:
    return [json.dumps(good(i)) for i in range(start, start + n)]


def write(path: Path, lines: list[str] | str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(lines, bytes):
        path.write_bytes(lines)
    else:
        path.write_text(lines if isinstance(lines, str) else "\n".join(lines) + "\n", encoding="utf-8")
    return path


def run(tmp_path: Path, tok, raw_path: str = "d.jsonl", **cfg):
    cfg.setdefault("max_bad_fraction", 0.5)
    return prepare_data(DataConfig(raw_path=raw_path, **cfg), tok, root=tmp_path)


def bad_rows(prepared) -> list[tuple[str, str]]:
    return [(b["source"], b["reason"]) for b in prepared.report["bad_rows"]]


def test_each_bad_row_kind_is_reported_at_its_line(tmp_path, tok):
    lines = good_lines(10)
    lines[1] = '{"instruction": "broken", "output": '  # line 2
    lines[2] = json.dumps({"instruction": "no output"})  # line 3
    lines[3] = json.dumps({"instruction": "Say hi.", "output": "   "})  # line 4
    lines[4] = json.dumps({"messages": [{"role": "assistant", "content": "first"}, {"role": "user", "content": "x"}]})
    lines[5] = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})
    lines[6] = json.dumps({"conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "yo"}]})
    lines[7] = json.dumps({"question": "q", "answer": "a"})  # line 8: matches no format
    lines[8] = json.dumps({"instruction": "Say the end token.", "output": "here </s> it is"})
    data = "\n".join(lines).encode() + b"\n" + b'{"instruction": "caf\xe9", "output": "x"}\n'  # line 11: latin-1
    write(tmp_path / "d.jsonl", data)
    prepared = run(tmp_path, tok, max_bad_fraction=1.0, min_eval_rows=1)
    assert bad_rows(prepared) == [
        ("d.jsonl:2", "broken_json"),
        ("d.jsonl:11", "not_utf8"),
        ("d.jsonl:3", "missing_field"),
        ("d.jsonl:4", "empty_completion"),
        ("d.jsonl:5", "bad_role_order"),
        ("d.jsonl:6", "bad_role_order"),
        ("d.jsonl:7", "bad_role_order"),
        ("d.jsonl:8", "wrong_columns"),
        ("d.jsonl:9", "special_token_in_text"),
    ]
    details = {b["source"]: b["detail"] for b in prepared.report["bad_rows"]}
    assert "unknown role 'robot'" in details["d.jsonl:7"]
    assert "data.columns" in details["d.jsonl:8"]
    assert prepared.report["counts"]["bad_role_order"] == 3
    assert prepared.report["bad_fraction"] == pytest.approx(9 / 11)
    assert prepared.stats["rows_read"] == 11 and prepared.stats["rows_dropped"]["broken_json"] == 1
    assert prepared.stats["records_train"] + prepared.stats["records_eval"] == 2


def test_role_order_rules(tmp_path, tok):
    def convo(*roles):
        return json.dumps({"messages": [{"role": r, "content": f"{r} text"} for r in roles]})

    lines = [
        convo("user", "assistant"),  # 1 ok
        convo("system", "user", "assistant", "user", "assistant"),  # 2 ok
        convo("user", "assistant", "user"),  # 3 ends on user
        convo("user", "system", "assistant"),  # 4 system not first
        convo("system"),  # 5 nothing to learn
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}),  # 6
        json.dumps({"messages": []}),  # 7
        convo("user", "assistant", "tool"),  # 8 unknown role
    ]
    write(tmp_path / "d.jsonl", lines)
    prepared = run(tmp_path, tok, max_bad_fraction=1.0)
    assert bad_rows(prepared) == [
        ("d.jsonl:3", "bad_role_order"),
        ("d.jsonl:4", "bad_role_order"),
        ("d.jsonl:5", "bad_role_order"),
        ("d.jsonl:6", "empty_completion"),
        ("d.jsonl:7", "bad_value"),
        ("d.jsonl:8", "bad_role_order"),
    ]


def test_threshold_both_ways(tmp_path, tok):
    lines = good_lines(20)
    lines[4] = "{not json"
    write(tmp_path / "d.jsonl", lines)
    prepared = run(tmp_path, tok, max_bad_fraction=0.05)  # 1/20 = 0.05: allowed, skipped and counted
    assert prepared.report["bad_fraction"] == 0.05 and prepared.report["threshold"] == 0.05
    assert prepared.stats["rows_dropped"] == {"broken_json": 1}
    assert prepared.stats["records_train"] + prepared.stats["records_eval"] == 19

    lines[9] = json.dumps({"instruction": "x", "output": ""})
    write(tmp_path / "d.jsonl", lines)
    with pytest.raises(DataError) as err:  # 2/20 = 0.1 > 0.05
        run(tmp_path, tok, max_bad_fraction=0.05)
    message = str(err.value)
    assert "2 of 20 rows" in message and "broken_json: 1, empty_completion: 1" in message
    assert "d.jsonl:5: broken_json" in message and "d.jsonl:10: empty_completion" in message
    assert "raise data.max_bad_fraction" in message and "clean" in message


def test_duplicates_dropped_when_dedupe(tmp_path, tok):
    lines = good_lines(6) + [json.dumps(good(2)), json.dumps(good(4))]
    write(tmp_path / "d.jsonl", lines)
    prepared = run(tmp_path, tok, dedupe=True, max_bad_fraction=0.0)  # duplicates are not bad data
    assert [(d["source"], d["reason"]) for d in prepared.report["dropped_rows"]] == [
        ("d.jsonl:7", "duplicate"),
        ("d.jsonl:8", "duplicate"),
    ]
    assert "d.jsonl:3" in prepared.report["dropped_rows"][0]["detail"]
    assert prepared.stats["rows_dropped"] == {"duplicate": 2} and prepared.report["bad_fraction"] == 0
    kept = run(tmp_path, tok, dedupe=False)
    assert kept.stats["records_train"] + kept.stats["records_eval"] == 8


def test_non_utf8_in_txt_csv_and_json_at_the_right_line(tmp_path, tok):
    write(tmp_path / "t" / "a.txt", b"fine paragraph one\n\nsecond paragraph\nhas a bad \xff byte\n\nthird one\n")
    prepared = run(tmp_path, tok, raw_path="t")
    assert bad_rows(prepared) == [("t/a.txt:4", "not_utf8")]

    write(tmp_path / "c" / "a.csv", b'instruction,output\n"Say 1.",1\n"multi\nline",2\n"caf\xe9",3\n"Say 4.",4\n')
    prepared = run(tmp_path, tok, raw_path="c")
    assert bad_rows(prepared) == [("c/a.csv:5", "not_utf8")]
    assert sorted([*prepared.train["source"], *prepared.eval["source"]]) == ["c/a.csv:2", "c/a.csv:3", "c/a.csv:6"]

    body = b'[\n  {"instruction": "Say 1.", "output": "1"},\n  {"instruction": "caf\xe9",\n   "output": "2"},\n  {"instruction": "Say 3.", "output": "3"}\n]\n'
    write(tmp_path / "j" / "a.json", body)
    prepared = run(tmp_path, tok, raw_path="j")
    assert bad_rows(prepared) == [("j/a.json:3", "not_utf8")]
    assert sorted([*prepared.train["source"], *prepared.eval["source"]]) == ["j/a.json:2", "j/a.json:5"]


def test_csv_wrong_columns(tmp_path, tok):
    write(tmp_path / "a.csv", 'instruction,output\n"Say 1.",1\n"Say 2.",2,extra\n"Say 3.",3\n"Say 4.",4\n')
    prepared = run(tmp_path, tok, raw_path="a.csv")
    assert bad_rows(prepared) == [("a.csv:3", "wrong_columns")]
    write(tmp_path / "b.csv", 'question,answer\n"Say 1.",1\n"Say 2.",2\n')
    with pytest.raises(DataError, match="wrong_columns: 2"):
        run(tmp_path, tok, raw_path="b.csv")
    prepared = run(tmp_path, tok, raw_path="b.csv", columns={"instruction": "question", "output": "answer"})
    assert prepared.report["bad_rows"] == []


def test_json_and_parquet_files(tmp_path, tok):
    write(tmp_path / "a.json", json.dumps([good(i) for i in range(4)], indent=2))
    prepared = run(tmp_path, tok, raw_path="a.json")
    assert sorted([*prepared.train["source"], *prepared.eval["source"]]) == sorted(f"a.json:{n}" for n in (2, 7, 12, 17))
    write(tmp_path / "b.json", '[\n{"instruction": "x", "output": "y"},\n{"instruction": \n')
    with pytest.raises(DataError, match=r"b\.json:4: not valid JSON"):
        run(tmp_path, tok, raw_path="b.json")

    frame = pd.DataFrame({"messages": [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(4)]})
    frame.to_parquet(tmp_path / "c.parquet")
    prepared = run(tmp_path, tok, raw_path="c.parquet")
    assert prepared.stats["format"] == "chat" and prepared.stats["rows_train"] == 3
    assert sorted([*prepared.train["source"], *prepared.eval["source"]]) == [f"c.parquet:{n}" for n in range(1, 5)]


def test_folder_is_read_recursively_in_sorted_order_and_glob_is_refused(tmp_path, tok):
    write(tmp_path / "raw" / "b" / "z.jsonl", good_lines(3))
    write(tmp_path / "raw" / "a.jsonl", good_lines(3, start=10))
    write(tmp_path / "raw" / ".hidden.jsonl", "not read\n")
    write(tmp_path / "raw" / "notes.txt", "a paragraph of text\n")
    prepared = run(tmp_path, tok, raw_path="raw")
    assert prepared.stats["files"] == ["raw/a.jsonl", "raw/b/z.jsonl", "raw/notes.txt"]
    assert prepared.stats["format"] == "mixed" and prepared.stats["formats"] == {"instruction": 6, "text": 1}
    # DVC cannot track a glob as a dependency, so a glob would hide data changes from `dvc repro`.
    with pytest.raises(ValidationError, match="is a glob"):
        run(tmp_path, tok, raw_path="raw/**/*.jsonl")


def test_explicit_format_mismatch_is_reported(tmp_path, tok):
    write(tmp_path / "d.jsonl", good_lines(4))
    with pytest.raises(DataError, match="missing_field: 4"):
        run(tmp_path, tok, format="chat")


@pytest.mark.parametrize(
    ("setup", "raw_path", "match"),
    [
        (lambda p: None, "data/raw", r"data/raw does not exist.*dvc pull.*dvc add data/raw"),
        (lambda p: None, "data/missing.jsonl", r"does not exist.*dvc pull"),
        (lambda p: (p / "data" / "raw").mkdir(parents=True), "data/raw", r"holds no files.*dvc pull"),
        (lambda p: write(p / "e.jsonl", ""), "e.jsonl", r"e\.jsonl: the file is empty"),
        (lambda p: write(p / "e.jsonl", "\n \n"), "e.jsonl", r"e\.jsonl: the file is empty"),
        (lambda p: write(p / "b.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"), "b.txt", r"b\.txt: looks like a binary file"),
        (lambda p: write(p / "b.parquet", b"not parquet at all"), "b.parquet", r"b\.parquet: not a readable Parquet"),
        (lambda p: write(p / "x.tsv", "a\tb\n"), "x.tsv", r"x\.tsv.*supported extensions: \.txt, \.jsonl, \.json, \.csv, \.parquet"),
        (lambda p: write(p / "h.csv", "instruction,output\n"), "h.csv", r"h\.csv: no rows found"),
        (lambda p: (write(p / "r" / "a.jsonl", "{}\n"), write(p / "r" / "make.py", "")), "r", r"r/make\.py; supported"),
    ],
)
def test_file_level_errors(tmp_path, tok, setup, raw_path, match):
    setup(tmp_path)
    with pytest.raises(DataError, match=match):
        run(tmp_path, tok, raw_path=raw_path)


def test_truncation_modes(tmp_path, tok):
    long = {"instruction": "Repeat the word.", "input": "", "output": " ".join(["blue"] * 60)}
    long_prompt = {"instruction": " ".join(["red"] * 60), "input": "", "output": "ok"}
    lines = good_lines(6) + [json.dumps(long), json.dumps(long_prompt)]
    write(tmp_path / "d.jsonl", lines)
    prepared = run(tmp_path, tok, max_seq_len=32, truncation="truncate")
    assert prepared.stats["rows_truncated"] == 2
    assert prepared.stats["rows_dropped"] == {"no_trainable_tokens": 1}  # only the prompt fit
    assert [(d["source"], d["reason"]) for d in prepared.report["dropped_rows"]] == [("d.jsonl:8", "no_trainable_tokens")]
    rows = {r["source"]: r for r in [*prepared.train, *prepared.eval]}
    assert len(rows["d.jsonl:7"]["input_ids"]) == 32 and rows["d.jsonl:7"]["labels"][-1] != -100
    assert max(prepared.lengths) <= 32

    prepared = run(tmp_path, tok, max_seq_len=32, truncation="drop")
    assert prepared.stats["rows_dropped"] == {"too_long": 2} and prepared.stats["rows_truncated"] == 0
    assert {d["source"] for d in prepared.report["dropped_rows"]} == {"d.jsonl:7", "d.jsonl:8"}


def test_too_few_rows_to_split(tmp_path, tok):
    write(tmp_path / "d.jsonl", good_lines(3))
    with pytest.raises(DataError, match=r"3 usable.*eval split needs 3.*min_eval_rows=3"):
        run(tmp_path, tok, min_eval_rows=3)
    write(tmp_path / "d.jsonl", good_lines(1) + ["{broken"])
    with pytest.raises(DataError, match=r"1 usable \(read 2, 1 bad"):
        run(tmp_path, tok, max_bad_fraction=0.5)


def test_unknown_column_mapping_fails_at_config_load():
    from qlora_pipeline.config import validate_params
    from qlora_pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data\.columns: unknown field\(s\) question"):
        validate_params({"data": {"columns": {"question": "q"}}})
