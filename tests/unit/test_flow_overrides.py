"""Overrides as the flows take them: `-S` values keep their types in the run's params.yaml as DVC and
the pipeline read it, and a deployment's defaults merge under a run's own overrides."""

from __future__ import annotations

import math
import shutil

import pytest
import yaml

from flows import overrides as param_overrides
from flows import workspace
from qlora_pipeline.errors import ConfigError

from ..conftest import DEFAULT_PARAMS, REPO

# -S line -> the value params.yaml must hold, as every reader of it sees it
TYPED = {
    "train.learning_rate=1e-6": ("train.learning_rate", 1e-6),
    "train.weight_decay=1e-4": ("train.weight_decay", 1e-4),
    "lora.dropout=1.5E-2": ("lora.dropout", 0.015),
    "train.max_grad_norm=2e+1": ("train.max_grad_norm", 20.0),
    "lora.r=8": ("lora.r", 8),
    "train.seed=7": ("train.seed", 7),
    "data.packing=true": ("data.packing", True),
    "lora.target_modules=[q_proj, v_proj]": ("lora.target_modules", ["q_proj", "v_proj"]),
    "evaluate.prompts=['1e-3', '2', hi]": ("evaluate.prompts", ["1e-3", "2", "hi"]),
    "model.revision='1e-6'": ("model.revision", "1e-6"),  # quoted by the user: a string
    'tracking.experiment="0.5"': ("tracking.experiment", "0.5"),
    "register.model_name='yes'": ("register.model_name", "yes"),  # YAML 1.1 would read a plain yes as true
    "lora.bias=none": ("lora.bias", "none"),
}


def dvc_reads(text: str):
    """params.yaml as DVC parses it (ruamel, YAML 1.2)."""
    from dvc.utils.serialize import parse_yaml

    return parse_yaml(text, "params.yaml")


def lookup(params: dict, dotted: str):
    node = params
    for part in dotted.split("."):
        node = node[part]
    return node


def same(a, b) -> bool:
    return type(a) is type(b) and (a == b if not isinstance(a, list) else all(same(x, y) for x, y in zip(a, b, strict=True)))


@pytest.mark.parametrize("line", TYPED)
def test_an_override_value_keeps_its_yaml_type(line):
    key, expected = TYPED[line]
    assert param_overrides.parse([line]) == {key: expected}
    assert same(param_overrides.parse([line])[key], expected)


def test_numbers_in_lists_are_numbers():
    assert param_overrides.parse(["a.b=[1e-3, '2e-3', 4]"]) == {"a.b": [1e-3, "2e-3", 4]}


def test_override_keys_follow_qlora_s():
    assert param_overrides.parse(["++train.seed=3", "+lora.r=4", "data.columns={instruction: q}"]) == {
        "train.seed": 3, "lora.r": 4, "data.columns": {"instruction": "q"},
    }
    with pytest.raises(ConfigError, match="expected section.key=value"):
        param_overrides.parse(["train.learning_rate"])


@pytest.mark.parametrize("value", [1e-6, 1e-4, 2.5e-8, 1e20, 0.003, 1.0, -3e-5, math.inf])
def test_floats_are_written_as_floats_for_yaml_1_1_and_1_2(value):
    text = param_overrides.yaml_float(value)
    assert yaml.safe_load(text) == value and isinstance(yaml.safe_load(text), float)
    assert dvc_reads(f"x: {text}")["x"] == value


def test_the_runs_params_yaml_holds_the_typed_values_for_dvc_and_the_pipeline(tmp_path):
    """`python -m flows.run -S train.learning_rate=1e-6`: DVC records a float, not '1e-6'."""
    shutil.copy2(DEFAULT_PARAMS, tmp_path / "params.yaml")
    before = (tmp_path / "params.yaml").read_text()
    ws = workspace.Workspace(project=tmp_path, path=tmp_path, commit="0" * 40, experiment="e")
    overrides = param_overrides.parse(list(TYPED))
    workspace.write_params(ws, overrides)

    text = (tmp_path / "params.yaml").read_text()
    assert "learning_rate: 1.0e-06" in text
    for reader in (dvc_reads, yaml.safe_load):
        params = reader(text)
        for key, expected in TYPED.values():
            got = lookup(params, key)
            assert same(list(got) if isinstance(got, list) else got, expected), (reader.__name__, key, got)
    # comments stay (the saved experiment diffs cleanly)
    assert [line for line in text.splitlines() if line.lstrip().startswith("#")] == [
        line for line in before.splitlines() if line.lstrip().startswith("#")
    ]


def test_flows_run_passes_typed_overrides_to_the_flow(monkeypatch):
    from flows import pipeline, run

    seen = {}

    class Done:
        def is_completed(self):
            return True

        def result(self):
            return {}

    def fake_flow(**kwargs):
        seen.update(kwargs)
        return Done()

    monkeypatch.setattr(pipeline, "qlora_pipeline", fake_flow)
    assert run.main(["-S", "train.learning_rate=1e-6", "-S", "model.revision='1e-6'", "-S", "lora.r=8"]) == 0
    assert seen["overrides"] == {"train.learning_rate": 1e-6, "model.revision": "1e-6", "lora.r": 8}
    assert isinstance(seen["overrides"]["train.learning_rate"], float)


def test_a_runs_overrides_merge_over_the_deployments_defaults_per_key():
    defaults = {"model.name": "builtin:tiny-llama", "train.max_steps": 8, "lora.r": 4}
    run = {"lora.r": 16, "train.seed": 7}
    assert param_overrides.merge(defaults, run) == {
        "model.name": "builtin:tiny-llama", "train.max_steps": 8, "lora.r": 16, "train.seed": 7,
    }
    assert param_overrides.merge(defaults, None) == defaults
    assert param_overrides.merge(None, run) == run
    assert defaults == {"model.name": "builtin:tiny-llama", "train.max_steps": 8, "lora.r": 4}  # not changed


def test_the_flow_merges_default_overrides_under_overrides():
    """The flow takes the deployment's -S values as a parameter of their own, which a run's
    `overrides` (a whole dict, as Prefect passes it) cannot replace."""
    import inspect

    from flows.pipeline import qlora_pipeline

    params = inspect.signature(qlora_pipeline.fn).parameters
    assert params["default_overrides"].default is None and params["overrides"].default is None


def test_the_deployment_bakes_its_s_values_into_default_overrides(monkeypatch):
    from flows import deploy

    captured = {}

    class Source:
        def deploy(self, **kwargs):
            captured.update(kwargs)
            return "id"

    monkeypatch.setattr(deploy, "ensure_process_pool", lambda name: None)
    monkeypatch.setattr(deploy, "ensure_crash_automation", lambda: None)
    from flows import pipeline

    monkeypatch.setattr(pipeline.qlora_pipeline, "from_source", lambda **_: Source(), raising=False)
    deploy.deploy(overrides={"model.name": "builtin:tiny-llama"}, quiet=True)
    assert captured["parameters"] == {"default_overrides": {"model.name": "builtin:tiny-llama"}, "overrides": {}}
    assert captured["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
