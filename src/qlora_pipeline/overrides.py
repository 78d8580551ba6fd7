"""Dotted `section.key=value` overrides (`qlora -S`, `dvc exp run -S`, flow parameters) applied to a
params dict; values are parsed as YAML, as DVC parses them."""

from __future__ import annotations

import json
from typing import Any

import yaml

from qlora_pipeline.errors import ConfigError


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.learning_rate=1e-4' -> (['train', 'learning_rate'], 0.0001), values parsed as YAML.

    The same lines work in `dvc exp run -S`: DVC's `+`/`++` key prefixes (add, add or override) are
    accepted and set the key, and `data.columns='{instruction: question}'` (a quoted mapping) is
    read by data.columns in both tools, replacing the whole mapping."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if key.startswith("~"):
        raise ConfigError(
            f"override {text!r}: deleting a key (~) is not supported by qlora -S; set the key instead, "
            "e.g. data.columns='{}'"
        )
    key = key[2:] if key.startswith("++") else key[1:] if key.startswith("+") else key
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. train.learning_rate=1e-4")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Return a copy of the params dict with dotted-key overrides applied."""
    merged = json.loads(json.dumps(raw))
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
    for key, value in items:
        parts = key.split(".") if isinstance(key, str) else key
        node = merged
        for depth, part in enumerate(parts[:-1], 1):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                where = ".".join(parts[:depth])
                raise ConfigError(
                    f"override {'.'.join(parts)}: {where} is {node!r}, not a section; set {where} whole instead"
                    + (", e.g. data.columns='{instruction: question}'" if where == "data.columns" else "")
                )
        node[parts[-1]] = value
    return merged
