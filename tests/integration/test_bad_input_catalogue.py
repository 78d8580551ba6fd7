"""The catalogue of bad inputs (README, "When something is wrong"): each ends with a non-zero
exit and one message naming the problem and the fix, before expensive work, writing nothing."""

from __future__ import annotations

import errno
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from typer.testing import CliRunner

from qlora_pipeline.cli import app

from .conftest import set_params, small_project

pytestmark = pytest.mark.integration


def edit_params(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def params_text(old: str, new: str) -> Callable[[Path], None]:
    def apply(project: Path) -> None:
        path = project / "params.yaml"
        path.write_text(edit_params(path.read_text(), old, new))

    return apply


def params(**values) -> Callable[[Path], None]:
    return lambda project: set_params(project, {k.replace("__", "."): v for k, v in values.items()})


def raw_file(name: str, content: bytes | str, keep_default: bool = False) -> Callable[[Path], None]:
    def apply(project: Path) -> None:
        raw = project / "data" / "raw"
        if not keep_default:
            (raw / "a.jsonl").unlink()
        data = content.encode() if isinstance(content, str) else content
        (raw / name).write_bytes(data)

    return apply


def model_dir(files: dict[str, str]) -> Callable[[Path], None]:
    def apply(project: Path) -> None:
        folder = project / "base"
        folder.mkdir()
        for name, text in files.items():
            (folder / name).write_text(text)
        set_params(project, {"model.name": "./base"})

    return apply


def disk_full(monkeypatch) -> None:
    import pyarrow.parquet as pq

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "data/prepared/train.parquet")

    monkeypatch.setattr(pq, "write_table", no_space)


@dataclass
class Case:
    name: str
    setup: Callable[[Path], None] | None
    command: list[str]
    expect: list[str]
    needs_prepared: bool = False
    inject: Callable | None = None
    env: dict[str, str] = field(default_factory=dict)


CASES = [
    # params
    Case("unknown key", params_text("  r: 16", "  r: 16\n  rank: 8"), ["prepare"], ["lora.rank: unknown key", "allowed keys in lora"]),
    Case("unknown section", params_text("tracking:", "trainer:\n  lr: 1\ntracking:"), ["prepare"], ["trainer: unknown key", "allowed keys: data"]),
    Case("wrong type", params(train__learning_rate="fast"), ["prepare"], ["train.learning_rate: Input should be a valid number"]),
    Case("rank out of range", params(lora__r=0), ["prepare"], ["lora.r: Input should be greater than or equal to 1"]),
    Case("alpha out of range", params(lora__alpha=0), ["prepare"], ["lora.alpha: Input should be greater than 0"]),
    Case("learning rate out of range", params(train__learning_rate=5), ["prepare"], ["train.learning_rate: Input should be less than or equal to 1"]),
    Case("dropout out of range", params(lora__dropout=1.0), ["prepare"], ["lora.dropout: Input should be less than 1"]),
    Case("4-bit and 8-bit", params(quantization__load_in_8bit=True), ["prepare"], ["load_in_4bit and load_in_8bit are both true", "set at most one"]),
    Case("empty target modules", params(lora__target_modules=[]), ["prepare"], ["lora.target_modules: must be 'all-linear' or a non-empty list"]),
    Case("target modules match no layer", params(lora__target_modules=["c_attn"]), ["train"], ["['c_attn'] match no linear layer", "available: ['down_proj'"], needs_prepared=True),
    Case("params not YAML", params_text("data:", "data: [oops"), ["prepare"], ["params.yaml: not valid YAML"]),
    Case("unknown quant type", params(quantization__quant_type="int3"), ["prepare"], ["quantization.quant_type: Input should be 'nf4' or 'fp4'"]),
    Case("unknown built-in model", params(model__name="builtin:giant"), ["prepare"], ["unknown built-in model 'builtin:giant'", "builtin:tiny-llama"]),
    Case("unknown promotion metric", params(register__metric="bleu"), ["prepare"], ["register.metric: Input should be 'eval_loss'"]),
    Case("unknown column mapping", params(data__columns={"answerz": "a"}), ["prepare"], ["data.columns"]),
    # data
    Case("missing data path", params(data__raw_path="data/missing"), ["prepare"], ["data/missing"]),
    Case("empty file", raw_file("a.jsonl", "", keep_default=True), ["prepare"], ["a.jsonl"]),
    Case("only bad rows", raw_file("b.jsonl", "{not json\n" * 20), ["prepare"], ["b.jsonl:1", "max_bad_fraction"]),
    Case("wrong columns", raw_file("b.jsonl", "".join(json.dumps({"question": f"q{i}", "answer": "a"}) + "\n" for i in range(20))), ["prepare"], ["b.jsonl:1", "data.columns"]),
    Case("binary file", raw_file("b.jsonl", bytes(range(256)) * 8), ["prepare"], ["b.jsonl"]),
    Case("unsupported file type", raw_file("b.docx", "x", keep_default=True), ["prepare"], ["b.docx", ".jsonl"]),
    Case("too few rows to split", raw_file("b.jsonl", json.dumps({"instruction": "a", "output": "b"}) + "\n"), ["prepare"], ["eval"]),
    Case("train before prepare", None, ["train"], ["run `qlora prepare` first"]),
    # model
    Case("missing local model path", params(model__name="./nowhere"), ["prepare"], ["local path ./nowhere", "does not exist"]),
    Case("model dir without config", model_dir({"README.md": "x"}), ["prepare"], ["has no config.json"]),
    Case("model dir without weights", model_dir({"config.json": "{}"}), ["prepare"], ["has no *.safetensors weights"]),
    Case("model dir with pickle weights only", model_dir({"config.json": "{}", "pytorch_model.bin": "x"}), ["prepare"], ["pickle weights", "convert them to safetensors"]),
    Case("hub unreachable", params(model__name="acme/missing-model"), ["prepare"], ["acme/missing-model", "builtin:tiny-llama"], env={"HF_HUB_OFFLINE": "1"}),
    # registry
    Case("promote unknown model", None, ["promote", "--version", "1"], ["registered model 'qlora-test' does not exist"]),
    Case("promote with no target", None, ["promote"], ["give exactly one of --version N or --alias NAME"]),
    # environment
    Case("tracking server unreachable", None, ["train"], ["http://127.0.0.1:9 cannot be reached", "MLFLOW_TRACKING_URI"], needs_prepared=True, env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}),
    Case("disk full while saving", None, ["prepare"], ["no space left on the device", "free some disk space"], inject=disk_full),
]


def snapshot(project: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(project)): p.read_bytes()
        for p in sorted(project.rglob("*"))
        if p.is_file() and ".cache" not in p.parts and p.name != "mlflow.db"
    }


@pytest.fixture(scope="module")
def prepared_template(tmp_path_factory):
    """A small valid project, prepared once; each case works on a copy."""
    import shutil

    project = small_project(tmp_path_factory.mktemp("template"))
    bare = tmp_path_factory.mktemp("bare")
    shutil.copytree(project, bare, dirs_exist_ok=True)
    result = CliRunner().invoke(app, ["prepare", "--params", str(project / "params.yaml")])
    assert result.exit_code == 0, result.output
    return bare, project


def test_catalogue_has_at_least_25_cases():
    assert len(CASES) >= 25
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, prepared_template, tmp_path, monkeypatch):
    import shutil

    bare, prepared = prepared_template
    project = tmp_path / "p"
    shutil.copytree(prepared if case.needs_prepared else bare, project)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{project}/mlflow.db", **case.env}
    if case.setup:
        case.setup(project)
    if case.inject:
        case.inject(monkeypatch)
    before = snapshot(project)

    result = CliRunner().invoke(app, [*case.command, "--params", str(project / "params.yaml")], env=env)

    assert result.exit_code not in (0, None), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    message = " ".join(result.output.split())
    for needle in case.expect:
        assert needle in message, f"{needle!r} not in: {message}"
    assert "Traceback" not in result.output
    assert snapshot(project) == before
