"""Find the raw files and read them into rows, each tagged with the file:line it came from.

Problems that spoil one row (a broken JSON line, bytes that are not UTF-8) become `BadRow`s;
problems that spoil a whole file (missing, empty, binary, unparseable) raise `DataError`.

Text files may be compressed (`.jsonl.gz`, `.csv.zst`, ...): they are decompressed in memory and
read like the plain file, rows still named `file:line`. Every text file goes through one decoding
rule: a UTF-8 byte-order mark is dropped, a UTF-16/UTF-32 file with its byte-order mark is decoded.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import gzip
import io
import json
import lzma
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_pipeline.columns import glob_refusal
from qlora_pipeline.errors import DataError

SUPPORTED_EXTENSIONS = (".txt", ".jsonl", ".json", ".csv", ".parquet")
_TEXT_EXTENSIONS = (".txt", ".jsonl", ".json", ".csv")
# Compression suffixes a text file may carry (`a.jsonl.gz`); all read with the stdlib, zstd with
# pyarrow (already needed for Parquet). Parquet compresses inside the file, so it takes none.
COMPRESSIONS = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd"}
_BINARY_SNIFF_BYTES = 8192
# Longest first: a UTF-32-LE mark starts with the UTF-16-LE one.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"),
)
# Bytes that are not UTF-8 survive decoding as lone surrogates (errors="surrogateescape"),
# so a bad byte can be reported at its own line instead of failing the whole file.
_SURROGATE = re.compile("[\udc80-\udcff]")


@dataclass
class Row:
    """One raw record (or one plain-text document as {"text": ...}) and where it came from."""

    source: str
    fields: dict[str, Any]
    from_txt: bool = False
    file: str = ""
    """The file as reports show it (`source` without the line), for per-file column mappings."""


@dataclass
class BadRow:
    source: str
    reason: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"source": self.source, "reason": self.reason, "detail": self.detail}


@dataclass
class FileRows:
    path: str
    rows: list[Row] = field(default_factory=list)
    bad: list[BadRow] = field(default_factory=list)


def display_path(path: Path, root: Path) -> str:
    """path relative to root (posix) when it lies under root, else as given."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _is_hidden(path: Path, base: Path) -> bool:
    try:
        parts = path.relative_to(base).parts
    except ValueError:
        parts = path.parts
    return any(p.startswith(".") for p in parts)


def file_kind(path: Path) -> tuple[str, str | None]:
    """`a.jsonl.gz` -> (".jsonl", "gzip"); `a.csv` -> (".csv", None); unsupported -> ("", None)."""
    suffixes = [x.lower() for x in path.suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    inner = suffixes[-2] if compression and len(suffixes) >= 2 else (suffixes[-1] if suffixes and not compression else "")
    if inner not in SUPPORTED_EXTENSIONS or (compression and inner not in _TEXT_EXTENSIONS):
        return "", None
    return inner, compression


def supported_names() -> str:
    """The file names prepare reads, for messages and docs."""
    text = "/".join(_TEXT_EXTENSIONS)
    return f"{', '.join(SUPPORTED_EXTENSIONS)}; {text} may be compressed ({', '.join(COMPRESSIONS)})"


def resolve_files(raw_path: str, root: Path) -> list[Path]:
    """raw_path (a file, or a folder searched recursively) -> sorted list of data files."""
    refusal = glob_refusal(raw_path)
    target = root / raw_path
    if refusal and not target.exists():
        raise DataError(f"data.raw_path: {refusal}")
    if target.is_dir():
        files = sorted(
            (p for p in target.rglob("*") if p.is_file() and not _is_hidden(p, target)),
            key=lambda p: p.relative_to(target).as_posix(),
        )
        if not files:
            raise DataError(_missing_message(raw_path, f"the folder {raw_path} holds no files"))
    elif target.is_file():
        files = [target]
    else:
        raise DataError(_missing_message(raw_path, f"{raw_path} does not exist"))
    unsupported = [p for p in files if not file_kind(p)[0]]
    if unsupported:
        names = ", ".join(display_path(p, root) for p in unsupported[:5])
        more = f" and {len(unsupported) - 5} more" if len(unsupported) > 5 else ""
        raise DataError(
            f"unsupported file type: {names}{more}; supported extensions: {supported_names()}. "
            "Convert or remove those files, or move them out of the data.raw_path folder"
        )
    return files


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """A path glob matched against the end of a posix path, whole folder names only.

    `*` and `?` stay within one folder name, `**` spans folders, `[...]` is a character class;
    `extra/*.jsonl` matches `data/raw/extra/a.jsonl`, a pattern starting with `/` the whole path.
    """
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    start = "^" if pattern.startswith("/") else "(?:^|/)"
    return re.compile(start + "".join(out) + "$")


def _missing_message(raw_path: str, what: str) -> str:
    return (
        f"no training data: {what} (data.raw_path={raw_path!r}). data/raw is tracked by DVC: "
        "run `dvc pull` to fetch it, or put your files there and run `dvc add data/raw`; "
        "or set data.raw_path to your data (e.g. data/demo for the shipped demo set)"
    )


def read_file(path: Path, root: Path, text_unit: str) -> FileRows:
    """Read one supported file into rows; file-level problems raise DataError."""
    shown = display_path(path, root)
    suffix, compression = file_kind(path)
    data = path.read_bytes()
    if compression:
        data = _decompress(data, compression, shown)
    if suffix in _TEXT_EXTENSIONS:
        data = _to_utf8(data, shown)
    if not data.strip():
        raise DataError(f"{shown}: the file is empty; add rows to it or remove it from data.raw_path")
    if suffix in _TEXT_EXTENSIONS and b"\x00" in data[:_BINARY_SNIFF_BYTES]:
        raise DataError(
            f"{shown}: looks like a binary file (NUL bytes), not {suffix} text; save it as UTF-8 text "
            "(UTF-16 text without a byte-order mark reads as binary too) or remove it from data.raw_path"
        )
    out = FileRows(shown)
    reader = {".txt": _read_txt, ".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    reader[suffix](data, shown, out, text_unit)
    if not out.rows and not out.bad:
        raise DataError(f"{shown}: no rows found; add rows to it or remove it from data.raw_path")
    for row in out.rows:
        row.file = shown
    return out


def _decompress(data: bytes, compression: str, shown: str) -> bytes:
    try:
        if compression == "gzip":
            return gzip.decompress(data)
        if compression == "bzip2":
            return bz2.decompress(data)
        if compression == "xz":
            return lzma.decompress(data)
        import pyarrow as pa

        return pa.input_stream(pa.BufferReader(data), compression="zstd").read()
    except Exception as exc:  # each codec raises its own types (OSError, EOFError, LZMAError, ...)
        raise DataError(
            f"{shown}: not a readable {compression} file ({exc}); re-compress it or remove it from data.raw_path"
        ) from None


def _to_utf8(data: bytes, shown: str) -> bytes:
    """One rule for every text format: drop a UTF-8 byte-order mark, decode UTF-16/32 that has one."""
    if data.startswith(codecs.BOM_UTF8):
        return data[len(codecs.BOM_UTF8):]
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(encoding).encode("utf-8")
            except UnicodeDecodeError as exc:
                line = data[: exc.start].decode(encoding, "replace").count("\n") + 1
                raise DataError(
                    f"{shown}:{line}: the file starts with a {encoding.upper()} byte-order mark but is not valid "
                    f"{encoding.upper()} ({exc.reason}); re-save it as UTF-8"
                ) from None
    return data


def _bad_byte_line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _read_txt(data: bytes, shown: str, out: FileRows, text_unit: str) -> None:
    text = data.decode("utf-8", "surrogateescape").replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    docs: list[tuple[int, list[str]]] = []  # (first line number, lines)
    if text_unit == "file":
        first = next(i for i, line in enumerate(lines) if line.strip())
        docs.append((first + 1, lines[first:]))
    else:
        current: list[str] = []
        for number, line in enumerate(lines, 1):
            if line.strip():
                if not current:
                    docs.append((number, current))
                current.append(line)
            elif current:
                current = []
    for first, doc_lines in docs:
        body = "\n".join(doc_lines).strip()
        source = f"{shown}:{first}"
        hit = _SURROGATE.search(body)
        if hit:
            line = first + body.count("\n", 0, hit.start())
            out.bad.append(BadRow(f"{shown}:{line}", "not_utf8", "bytes that are not UTF-8; re-save the file as UTF-8"))
            continue
        out.rows.append(Row(source, {"text": body}, from_txt=True))


def _read_jsonl(data: bytes, shown: str, out: FileRows, text_unit: str) -> None:
    for number, raw in enumerate(data.split(b"\n"), 1):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        source = f"{shown}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            out.bad.append(BadRow(source, "not_utf8", f"byte {exc.object[exc.start]:#04x} at column {exc.start + 1} is not UTF-8"))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            out.bad.append(BadRow(source, "broken_json", f"{exc.msg} at column {exc.colno}"))
            continue
        _append_record(out, source, record)


def _append_record(out: FileRows, source: str, record: Any) -> None:
    if not isinstance(record, dict):
        out.bad.append(BadRow(source, "wrong_columns", f"expected an object with named fields, got {type(record).__name__}"))
    else:
        out.rows.append(Row(source, record))


def _read_json(data: bytes, shown: str, out: FileRows, text_unit: str) -> None:
    text = data.decode("utf-8", "surrogateescape")
    decoder = json.JSONDecoder()
    ws = re.compile(r"[\s,]*")

    def fail(pos: int, why: str) -> DataError:
        line = _bad_byte_line(text, pos)
        return DataError(
            f"{shown}:{line}: not valid JSON ({why}); a .json file must hold one list of records. "
            "Fix the file (or save it as .jsonl, one record per line, so a broken line only skips that row)"
        )

    pos = ws.match(text, 0).end()
    if pos >= len(text) or text[pos] != "[":
        raise fail(pos, "expected a list `[...]` of records")
    pos = ws.match(text, pos + 1).end()
    while pos < len(text) and text[pos] != "]":
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise fail(exc.pos, exc.msg) from None
        line = _bad_byte_line(text, pos)
        hit = _SURROGATE.search(text, pos, end)
        if hit:
            out.bad.append(
                BadRow(f"{shown}:{_bad_byte_line(text, hit.start())}", "not_utf8", "bytes that are not UTF-8; re-save the file as UTF-8")
            )
        else:
            _append_record(out, f"{shown}:{line}", record)
        pos = ws.match(text, end).end()
    if pos >= len(text):
        raise fail(pos, "the list is not closed with `]`")


def _read_csv(data: bytes, shown: str, out: FileRows, text_unit: str) -> None:
    text = data.decode("utf-8", "surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except (StopIteration, csv.Error) as exc:
        raise DataError(f"{shown}: no CSV header ({exc}); the first line must name the columns") from None
    header = [h.strip() for h in header]
    if not any(header):
        raise DataError(f"{shown}: the CSV header is empty; the first line must name the columns")
    previous = reader.line_num
    while True:
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DataError(f"{shown}:{reader.line_num}: CSV cannot be parsed ({exc}); fix the quoting on that line") from None
        source = f"{shown}:{previous + 1}"
        previous = reader.line_num
        if not any(v.strip() for v in values):
            continue
        if any(_SURROGATE.search(v) for v in values):
            out.bad.append(BadRow(source, "not_utf8", "bytes that are not UTF-8; re-save the file as UTF-8"))
        elif len(values) != len(header):
            out.bad.append(
                BadRow(source, "wrong_columns", f"{len(values)} values but the header names {len(header)} columns")
            )
        else:
            out.rows.append(Row(source, dict(zip(header, values))))


def _read_parquet(data: bytes, shown: str, out: FileRows, text_unit: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(f"{shown}: not a readable Parquet file ({exc}); re-export it or remove it from data.raw_path") from None
    for index, record in enumerate(table.to_pylist(), 1):
        _append_record(out, f"{shown}:{index}", {k: v for k, v in record.items() if v is not None})
