"""`data.columns`: which of your fields each of ours reads, in every form params accept.

A mapping (ours -> yours), a list of ours=yours pairs, or per file (a glob -> a mapping); the
form `dvc exp run -S data.columns='{instruction: question}'` writes is read the same way.
Field names and message rules: docs/data-formats.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

# Field names `data.columns` may map (ours -> yours); message keys apply inside messages/conversations.
DATA_FIELDS = (
    "text", "instruction", "input", "output", "prompt", "completion",
    "messages", "conversations", "role", "content", "from", "value",
)
MESSAGE_FIELDS = ("role", "content", "from", "value")
_GLOB_CHARS = "*?["
_COLUMNS_EXAMPLE = '{instruction: question, output: answer}, or per file {"extra/*.jsonl": {instruction: question}}'


def glob_refusal(raw_path: str) -> str | None:
    """Why a glob cannot be data.raw_path and what to set instead; None for a plain path."""
    if not any(ch in raw_path for ch in _GLOB_CHARS):
        return None
    parts = Path(raw_path).parts
    first_glob = next(i for i, p in enumerate(parts) if any(ch in p for ch in _GLOB_CHARS))
    folder = Path(*parts[:first_glob]).as_posix() if first_glob else "."
    return (
        f"{raw_path!r} is a glob; DVC cannot track a glob as the prepare stage's dependency (dvc.yaml "
        "lists ${data.raw_path}), so edits to the matching files would not re-run prepare. Set "
        f"data.raw_path to the folder that holds them ({folder}) or to one file; a folder is read "
        "whole, so keep only the files to train on in it (move the others to a folder of their own)"
    )


def columns_per_file(columns: dict[str, Any]) -> bool:
    """data.columns in its per-file form {glob: {ours: yours}} (normalize_columns refuses a mix)."""
    return bool(columns) and all(isinstance(m, dict) for m in columns.values())


def normalize_columns(value: Any) -> dict[str, Any]:
    """data.columns in any accepted form -> {ours: yours} or {glob: {ours: yours}}; ValueError says what is wrong."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ValueError(f"not a YAML mapping ({exc.problem}); write it as {_COLUMNS_EXAMPLE}") from None
        if value is None:
            return {}
    if isinstance(value, list):
        value = _list_form(value)
    if not isinstance(value, dict):
        raise ValueError(f"must be a mapping, e.g. {_COLUMNS_EXAMPLE}")
    nested = [k for k, m in value.items() if isinstance(m, dict)]
    flat = [k for k, m in value.items() if not isinstance(m, dict)]
    if nested and flat:
        raise ValueError(
            f"mixes field: column entries ({', '.join(map(str, flat))}) with per-file glob: {{field: column}} entries "
            f"({', '.join(map(str, nested))}); use one form. To give the other files a mapping too, add a "
            'catch-all glob last: {"extra/*.jsonl": {instruction: question}, "**": {output: answer}}'
        )
    if not nested:
        _check_mapping(value, "")
        return {str(k): v for k, v in value.items()}
    for pattern, mapping in value.items():
        if not isinstance(pattern, str) or not pattern.strip():
            raise ValueError(f"glob {pattern!r}: must be a non-empty path glob, e.g. extra/*.jsonl")
        _check_mapping(mapping, f"glob {pattern!r}")
    return {pattern: dict(mapping) for pattern, mapping in value.items()}


def _list_form(items: list[Any]) -> dict[str, Any]:
    """[{path: glob, columns: {ours: yours}}, ...] (how `qlora check` prints it) -> {glob: {ours: yours}}."""
    out: dict[str, Any] = {}
    for number, item in enumerate(items, 1):
        if not isinstance(item, dict) or set(item) != {"path", "columns"} or not isinstance(item["columns"], dict):
            raise ValueError(f"item {number}: a list item must be {{path: <glob>, columns: {{field: column}}}}, got {item!r}")
        if item["path"] in out:
            raise ValueError(f"item {number}: glob {item['path']!r} is listed twice")
        out[item["path"]] = item["columns"]
    return out


def _check_mapping(mapping: dict[Any, Any], where: str) -> None:
    prefix = f"{where}: " if where else ""
    unknown = sorted(str(k) for k in set(mapping) - set(DATA_FIELDS))
    if unknown:
        looks_like_path = [k for k in unknown if any(ch in k for ch in "/*?[.")]
        hint = (
            f"; {', '.join(looks_like_path)} looks like a file glob: a per-file mapping takes a mapping as its value"
            if looks_like_path and not where else ""
        )
        raise ValueError(
            f"{prefix}unknown field(s) {', '.join(unknown)}; map one of {', '.join(DATA_FIELDS)} "
            f"to your column name, e.g. {_COLUMNS_EXAMPLE}{hint}"
        )
    bad = [f"{k}: {c!r}" for k, c in mapping.items() if not isinstance(c, str) or not c]
    if bad:
        raise ValueError(f"{prefix}column names must be non-empty strings (got {', '.join(bad)})")
    for group in (set(DATA_FIELDS) - set(MESSAGE_FIELDS), set(MESSAGE_FIELDS)):
        read_by: dict[str, list[str]] = {}
        for ours, theirs in mapping.items():
            if ours in group:
                read_by.setdefault(theirs, []).append(ours)
        twice = {theirs: ours for theirs, ours in read_by.items() if len(ours) > 1}
        if twice:
            theirs, ours = next(iter(twice.items()))
            raise ValueError(f"{prefix}{' and '.join(ours)} both read the column {theirs!r}; each field needs a column of its own")
