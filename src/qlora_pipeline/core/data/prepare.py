"""Raw files -> tokenized, validated, split train/eval datasets (`prepare_data`).

    from qlora_pipeline.core.data.prepare import prepare_data
    from qlora_pipeline.core.data.store import write_prepared
    prepared = prepare_data(cfg.data, tokenizer, root=Path("."))
    write_prepared(prepared, Path("data/prepared"))

Order: read -> validate -> dedupe -> tokenize -> bad-row threshold -> truncate/drop -> split by
record -> chunk plain text. Every check runs before anything is returned, so a failure leaves
no partial output.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from qlora_pipeline.config import DataConfig
from qlora_pipeline.core.data.encode import IGNORE_INDEX, Encoder, TemplateProblem
from qlora_pipeline.core.data.records import Example, validate_rows
from qlora_pipeline.core.data.sources import BadRow, Row, display_path, read_file, resolve_files
from qlora_pipeline.core.data.store import COLUMNS, FEATURES, PreparedData, as_dataset
from qlora_pipeline.errors import DataError

log = logging.getLogger(__name__)

_MAX_LISTED_ROWS = 1000  # report.json lists this many bad/dropped rows; counts are always complete
_EXAMPLES_IN_ERROR = 8
_PROGRESS_EVERY = 10_000


@dataclass
class _Item:
    """One validated record after tokenization; text documents are chunked after the split."""

    example: Example
    input_ids: list[int]
    labels: list[int]
    prompt: str = ""
    reference: str = ""
    order: int = 0  # position in the files, so text chunks keep reading order


def prepare_data(cfg: DataConfig, tokenizer, root: Path = Path(".")) -> PreparedData:
    """Read, validate, tokenize and split cfg.raw_path (relative to root); raises DataError."""
    root = Path(root)
    files = resolve_files(cfg.raw_path, root)
    rows, bad = _read_all(files, root, cfg.text_unit)
    rows_read = len(rows) + len(bad)

    examples, invalid = validate_rows(rows, cfg.format, dict(cfg.columns), special_token_pattern(tokenizer))
    bad += invalid
    examples, dropped = _dedupe(examples) if cfg.dedupe else (examples, [])
    encoder = Encoder(tokenizer, cfg.chat_template, cfg.train_on_prompt)
    items, template_errors = _encode_all(encoder, examples)
    bad += template_errors
    _check_bad_fraction(bad, rows_read, cfg.max_bad_fraction)

    items, too_long, truncated = _fit_to_length(items, cfg)
    dropped += too_long
    train_items, eval_items = _split(items, cfg, rows_read, len(bad), dropped)
    train_rows, eval_rows = _rows(train_items, cfg.max_seq_len), _rows(eval_items, cfg.max_seq_len)
    if len(eval_rows["input_ids"]) < cfg.min_eval_rows:
        raise DataError(
            f"the eval split has {len(eval_rows['input_ids'])} rows after chunking, fewer than data.min_eval_rows="
            f"{cfg.min_eval_rows}; raise data.eval_fraction, lower data.min_eval_rows or add data"
        )

    formats = Counter(item.example.format for item in items)
    stats = {
        "rows_read": rows_read,
        "rows_train": len(train_rows["input_ids"]),
        "rows_eval": len(eval_rows["input_ids"]),
        "records_train": len(train_items),
        "records_eval": len(eval_items),
        "tokens_train": sum(map(len, train_rows["input_ids"])),
        "tokens_eval": sum(map(len, eval_rows["input_ids"])),
        "trainable_tokens_train": _trainable(train_rows["labels"]),
        "trainable_tokens_eval": _trainable(eval_rows["labels"]),
        "rows_truncated": truncated,
        "rows_dropped": dict(sorted(Counter(b.reason for b in [*bad, *dropped]).items())),
        "format": cfg.format if cfg.format != "auto" else (next(iter(formats)) if len(formats) == 1 else "mixed"),
        "formats": dict(sorted(formats.items())),
        "files": [display_path(p, root) for p in files],
        "max_seq_len": cfg.max_seq_len,
        "chat_template": "data.chat_template" if cfg.chat_template else ("tokenizer" if encoder.template else "none"),
        # The token that closes every learned reply: the template's own, or EOS appended after the last reply.
        "end_of_turn": encoder.end_of_turn or f"{tokenizer.eos_token} (appended)",
        "rows_split_at_prompt": encoder.rows_split_at_prompt,
    }
    log.info(
        "prepared %d train / %d eval rows (%d train tokens) from %d rows in %d files; %d bad, %d dropped",
        stats["rows_train"], stats["rows_eval"], stats["tokens_train"], rows_read, len(files), len(bad), len(dropped),
    )
    if encoder.rows_split_at_prompt:
        log.info(
            "%d rows: a token would have spanned the end of the prompt (e.g. a prompt ending in a space), so the "
            "completion was tokenized on its own and the eval prompt stays a token prefix of the row",
            encoder.rows_split_at_prompt,
        )
    return PreparedData(
        train=as_dataset(pa.Table.from_pydict(train_rows, schema=FEATURES.arrow_schema)),
        eval=as_dataset(pa.Table.from_pydict(eval_rows, schema=FEATURES.arrow_schema)),
        stats=stats,
        report=_report(bad, dropped, rows_read, cfg.max_bad_fraction),
        lengths=[len(ids) for ids in [*train_rows["input_ids"], *eval_rows["input_ids"]]],
    )


def _read_all(files: list[Path], root: Path, text_unit: str) -> tuple[list[Row], list[BadRow]]:
    rows: list[Row] = []
    bad: list[BadRow] = []
    for path in files:
        read = read_file(path, root, text_unit)
        rows += read.rows
        bad += read.bad
    return rows, bad


def special_token_pattern(tokenizer) -> re.Pattern[str] | None:
    """A regex matching any special-token string (e.g. `</s>`, `<|user|>`) the tokenizer would parse."""
    names = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(token, "special", False):
            names.add(str(token.content))
    names = {n for n in names if n}
    if not names:
        return None
    return re.compile("|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)))


def _encode_all(encoder: Encoder, examples: list[Example]) -> tuple[list[_Item], list[BadRow]]:
    items: list[_Item] = []
    bad: list[BadRow] = []
    for order, ex in enumerate(examples):
        if order and order % _PROGRESS_EVERY == 0:
            log.info("tokenized %d / %d records", order, len(examples))
        if ex.kind == "text":
            ids = encoder.encode_text(ex.text)
            items.append(_Item(ex, ids, list(ids), order=order))
            continue
        try:
            enc = encoder.encode_example(ex)
        except TemplateProblem as exc:
            bad.append(BadRow(ex.source, exc.reason, str(exc)))
            continue
        items.append(_Item(ex, enc.input_ids, enc.labels, enc.prompt, enc.reference, order))
    return items, bad


def _check_bad_fraction(bad: list[BadRow], rows_read: int, threshold: float) -> None:
    if rows_read == 0:
        raise DataError("no rows found in data.raw_path; add data there")
    if len(bad) / rows_read > threshold:
        raise DataError(_too_many_bad_message(bad, rows_read, threshold))


def _fit_to_length(items: list[_Item], cfg: DataConfig) -> tuple[list[_Item], list[BadRow], int]:
    """Truncate (keeping the start) or drop rows over max_seq_len; drop rows left with nothing to learn.

    Plain-text documents are exempt: they are cut into max_seq_len blocks after the split.
    """
    kept: list[_Item] = []
    dropped: list[BadRow] = []
    truncated = 0
    for item in items:
        source = item.example.source
        if item.example.kind != "text" and len(item.input_ids) > cfg.max_seq_len:
            if cfg.truncation == "drop":
                dropped.append(BadRow(source, "too_long", f"{len(item.input_ids)} tokens > data.max_seq_len={cfg.max_seq_len}"))
                continue
            item.input_ids = item.input_ids[: cfg.max_seq_len]
            item.labels = item.labels[: cfg.max_seq_len]
            truncated += 1
        # labels[0] is never a target: the model predicts labels[t] from the tokens before t.
        if all(label == IGNORE_INDEX for label in item.labels[1:]):
            dropped.append(BadRow(source, "no_trainable_tokens", f"no learned token within data.max_seq_len={cfg.max_seq_len}"))
            continue
        kept.append(item)
    return kept, dropped, truncated


def _dedupe(examples: list[Example]) -> tuple[list[Example], list[BadRow]]:
    seen: dict[str, str] = {}
    unique, duplicates = [], []
    for ex in examples:
        key = ex.key()
        if key in seen:
            duplicates.append(BadRow(ex.source, "duplicate", f"same content as {seen[key]}"))
        else:
            seen[key] = ex.source
            unique.append(ex)
    return unique, duplicates


def _split(items: list[_Item], cfg: DataConfig, rows_read: int, n_bad: int, dropped: list[BadRow]) -> tuple[list[_Item], list[_Item]]:
    """Whole records to eval by a seeded hash of their content: the same data and seed give the same split."""
    n = len(items)
    n_eval = max(cfg.min_eval_rows, round(n * cfg.eval_fraction))
    if n - n_eval < 1:
        raise DataError(
            f"too few rows to split: {n} usable (read {rows_read}, {n_bad} bad, {len(dropped)} dropped), "
            f"but the eval split needs {n_eval} (data.eval_fraction={cfg.eval_fraction}, "
            f"data.min_eval_rows={cfg.min_eval_rows}) and train at least 1; add data or lower those settings"
        )

    def rank(index: int) -> tuple[str, int]:
        digest = hashlib.sha256(f"{cfg.seed}\0{items[index].example.key()}".encode("utf-8", "surrogatepass")).hexdigest()
        return digest, index

    order = sorted(range(n), key=rank)
    eval_items = [items[i] for i in order[:n_eval]]
    train_items = [items[i] for i in order[n_eval:]]
    # Text documents are chunked in reading order so a block holds neighbouring paragraphs
    # (a stable sort: records keep their seeded order).
    def reading_order(item: _Item) -> int:
        return item.order if item.example.kind == "text" else -1

    return sorted(train_items, key=reading_order), sorted(eval_items, key=reading_order)


def _rows(items: list[_Item], max_seq_len: int) -> dict[str, list]:
    """Dataset columns: examples one row each; text documents concatenated then cut into max_seq_len blocks."""
    out: dict[str, list] = {c: [] for c in COLUMNS}

    def add(ids: list[int], labels: list[int], source: str, prompt: str = "", reference: str = "") -> None:
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["source"].append(source)
        out["prompt"].append(prompt)
        out["reference"].append(reference)

    stream: list[int] = []
    starts: list[tuple[int, str]] = []  # (offset in stream, source) of each document
    for item in items:
        if item.example.kind == "text":
            starts.append((len(stream), item.example.source))
            stream += item.input_ids
        else:
            add(item.input_ids, item.labels, item.example.source, item.prompt, item.reference)
    doc = 0
    for begin in range(0, len(stream), max_seq_len):
        while doc + 1 < len(starts) and starts[doc + 1][0] <= begin:
            doc += 1
        block = stream[begin : begin + max_seq_len]
        add(block, list(block), starts[doc][1])
    return out


def _trainable(labels: list[list[int]]) -> int:
    return sum(sum(1 for label in row[1:] if label != IGNORE_INDEX) for row in labels)


def _report(bad: list[BadRow], dropped: list[BadRow], rows_read: int, threshold: float) -> dict[str, Any]:
    return {
        "rows_read": rows_read,
        "bad_rows": [b.as_dict() for b in bad[:_MAX_LISTED_ROWS]],
        "bad_rows_listed": min(len(bad), _MAX_LISTED_ROWS),
        "counts": dict(sorted(Counter(b.reason for b in bad).items())),
        "bad_fraction": len(bad) / rows_read if rows_read else 0.0,
        "threshold": threshold,
        "dropped_counts": dict(sorted(Counter(d.reason for d in dropped).items())),
        "dropped_rows": [d.as_dict() for d in dropped[:_MAX_LISTED_ROWS]],
    }


def _too_many_bad_message(bad: list[BadRow], rows_read: int, threshold: float) -> str:
    counts = ", ".join(f"{reason}: {n}" for reason, n in sorted(Counter(b.reason for b in bad).items()))
    examples = "\n".join(f"  {b.source}: {b.reason}: {b.detail}" for b in bad[:_EXAMPLES_IN_ERROR])
    more = f"\n  ... and {len(bad) - _EXAMPLES_IN_ERROR} more" if len(bad) > _EXAMPLES_IN_ERROR else ""
    return (
        f"{len(bad)} of {rows_read} rows are bad ({len(bad) / rows_read:.1%}), above "
        f"data.max_bad_fraction={threshold} ({counts}):\n{examples}{more}\n"
        "Fix: clean these rows in the raw data, or raise data.max_bad_fraction to skip them"
    )
