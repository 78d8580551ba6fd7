"""What DVC shows of a pipeline run: numeric metrics only, the README's `dvc exp show` view, and a
`dvc plots show` page made of images, which opens without a network."""

from __future__ import annotations

import csv
import io
import json
import re
import shlex
import pytest

from ..conftest import REPO
from .conftest import run

pytestmark = pytest.mark.integration

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METRICS_FILES = {"metrics/data.json", "metrics/train.json", "metrics/eval.json", "metrics/register.json"}


def _text_metrics(files: dict) -> list[str]:
    """'path: key' for every metric value that is not a number, in {path: {"data": {...}}}."""
    bad: list[str] = []

    def walk(path: str, prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(path, f"{prefix}.{key}" if prefix else key, item)
        elif not isinstance(value, (int, float)):  # bools are numbers to DVC (0/1), text is not
            bad.append(f"{path}: {prefix} = {value!r}")

    for path, result in files.items():
        walk(path, "", result.get("data", {}))  # no data: the file is not in that revision
    return bad


def _exp_metrics(node) -> list[dict]:
    """Every experiment row's metrics ({path: {"data": ...}}) in `dvc exp show --json`."""
    found: list[dict] = []
    if isinstance(node, list):
        for item in node:
            found += _exp_metrics(item)
    elif isinstance(node, dict):
        data = node.get("data")
        if isinstance(data, dict) and "metrics" in data:
            found.append(data["metrics"])
        for key in ("experiments", "revs"):
            if node.get(key):
                found += _exp_metrics(node[key])
    return found


def test_metrics_are_numbers_only(pipeline):
    project, env, _ = pipeline
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], project, env).stdout)
    (workspace,) = shown.values()
    files = workspace["data"]
    assert set(files) == METRICS_FILES and all("data" in result for result in files.values()), files
    assert _text_metrics(files) == []
    assert {"eval_loss", "perplexity", "chrf"} <= set(files["metrics/eval.json"]["data"])
    assert {"train_loss", "global_step"} <= set(files["metrics/train.json"]["data"])
    # The text went where it is read: the data stats and the register record.
    stats = json.loads((project / "data/prepared/stats.json").read_text())
    assert stats["format"] == "mixed" and len(stats["files"]) == 6
    assert isinstance(json.loads((project / "reports/register.json").read_text())["model_name"], str)

    rows = _exp_metrics(json.loads(run(["dvc", "exp", "show", "--json"], project, env).stdout))
    assert any(set(r) == METRICS_FILES and all("data" in v for v in r.values()) for r in rows), rows
    assert [bad for r in rows for bad in _text_metrics(r)] == []


def readme_exp_show() -> list[str]:
    """The `dvc exp show` command the README recommends."""
    lines = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("dvc exp show --only-changed")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0], comments=True)


def test_readme_exp_show_leads_with_what_is_compared(pipeline):
    project, env, _ = pipeline
    out = run([*readme_exp_show(), "--csv"], project, env).stdout
    header = next(csv.reader(io.StringIO(out)))
    # The quality metrics always; the rest only where the rows differ (here the workspace has
    # metrics and HEAD none, params are the same); never a dependency's hash.
    for metric in ("eval_loss", "perplexity", "chrf", "exact_match", "train_loss"):
        assert metric in header
    sections = {"data", "model", "quantization", "lora", "train", "evaluate", "register", "tracking"}
    assert not [h for h in header if h.split(".")[0] in sections], header  # no param: all the same here
    assert not [h for h in header if re.match(r"^(data|models|metrics|src)/|^base_models$", h)], header


def test_plots_page_is_images_that_open_offline(pipeline, tmp_path):
    project, env, _ = pipeline
    out = tmp_path / "page"
    run(["dvc", "plots", "show", "--out", str(out)], project, env)
    page = (out / "index.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(sources) == ["static/workspace_plots_token_lengths.png", "static/workspace_plots_train_loss.png"]
    for src in sources:
        image = (out / src).resolve()
        assert image.is_relative_to(out.resolve()) and image.read_bytes().startswith(PNG_MAGIC), src
    # Nothing to load: no script at all (DVC adds its Vega scripts, from a CDN, only for its own charts).
    assert "<script" not in page and "http" not in page.replace("http-equiv", "")
    for name in ("token_lengths.png", "train_loss.png"):
        assert (project / "plots" / name).read_bytes().startswith(PNG_MAGIC)
