"""Param overrides as the flows take them: `-S key=value` lines, a deployment's defaults, YAML values.

    parse(["train.learning_rate=1e-6", "lora.r=8"])   # {"train.learning_rate": 1e-06, "lora.r": 8}
    merge({"model.name": "x"}, {"lora.r": 8})        # the deployment's defaults under the run's own

A value keeps the type every YAML reader gives it: `1e-6` is a float here, written to params.yaml as
`1.0e-06` (DVC reads params.yaml as YAML 1.2, the pipeline as YAML 1.1, which reads `1e-06` as a
string), and `"1e-6"`, quoted, stays a string.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from qlora_pipeline.overrides import parse_override


class _Yaml12Numbers(yaml.SafeLoader):
    """PyYAML's safe loader, but `1e-6` is a float, as in YAML 1.2 (DVC's reader) and in JSON."""


# YAML 1.1 wants a dot and a signed exponent (`1.0e-06`); YAML 1.2 does not. The resolvers run in
# order, so this one only decides what the built-in float and int patterns leave a string.
_Yaml12Numbers.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"), list("-+.0123456789")
)


def parse_value(raw: str) -> Any:
    """A `-S` value as YAML, with YAML 1.2's numbers: `1e-6` -> 1e-06, `'1e-6'` -> "1e-6", `[1, 2]` -> [1, 2]."""
    return yaml.load(raw, Loader=_Yaml12Numbers) if raw.strip() else ""


def parse(lines: list[str]) -> dict[str, Any]:
    """`-S section.key=value` lines (as `qlora -S` and `dvc exp run -S` take them) -> {dotted key: value}."""
    parsed = {}
    for line in lines:
        key, _ = parse_override(line)  # the key rules and error messages of `qlora -S`
        parsed[".".join(key)] = parse_value(line.partition("=")[2])
    return parsed


def merge(defaults: dict[str, Any] | None, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The deployment's default overrides with this run's on top: the run's value wins per key.

    Prefect replaces a parameter's whole dict when a run sets it, so the deployment keeps its `-S`
    values in `default_overrides` and a run's `overrides` are merged over them here. Order is
    defaults first, so a run's `data.columns.instruction` lands after a default `data.columns`.
    """
    return {**(defaults or {}), **(overrides or {})}


def yaml_float(value: float) -> str:
    """A float as both YAML 1.1 and 1.2 read it back as that float: 1e-06 -> '1.0e-06'."""
    text = repr(value)
    if text in ("inf", "-inf", "nan"):
        return {"inf": ".inf", "-inf": "-.inf", "nan": ".nan"}[text]
    mantissa, e, exponent = text.partition("e")
    if e:
        mantissa = mantissa if "." in mantissa else f"{mantissa}.0"
        exponent = exponent if exponent[0] in "+-" else f"+{exponent}"
        return f"{mantissa}e{exponent}"
    return text
