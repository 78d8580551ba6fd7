"""Where each stage reads and writes, relative to the project root (the dvc.yaml folder).

The one place output paths are named in code: stages, flows and the CLI ask ProjectPaths (flows
use RELATIVE, for paths inside a git commit). dvc.yaml lists the same outputs; a test keeps the two
in step (tests/unit/test_dvc_deps.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "QLORA_CACHE_DIR"


@dataclass(frozen=True)
class ProjectPaths:
    root: Path

    @classmethod
    def at(cls, root: str | Path = ".") -> "ProjectPaths":
        return cls(Path(root).resolve())

    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared"

    @property
    def adapter(self) -> Path:
        return self.root / "models" / "adapter"

    @property
    def run_info(self) -> Path:
        """The MLflow run the train stage opened; evaluate and register log into the same run."""
        return self.adapter / "run.json"

    @property
    def merged(self) -> Path:
        return self.root / "models" / "merged"

    @property
    def checkpoints(self) -> Path:
        """Trainer checkpoints: outside every DVC output, so they survive a stage restart."""
        return self.root / "checkpoints"

    @property
    def cache(self) -> Path:
        """Built-in models, GGUF files converted to safetensors and other rebuildable files
        (keyed by content, so several checkouts may share one through QLORA_CACHE_DIR)."""
        shared = os.environ.get(CACHE_ENV)
        return Path(shared).expanduser().resolve() if shared else self.root / ".cache" / "qlora"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def data_metrics(self) -> Path:
        return self.metrics / "data.json"

    @property
    def train_metrics(self) -> Path:
        return self.metrics / "train.json"

    @property
    def eval_metrics(self) -> Path:
        return self.metrics / "eval.json"

    @property
    def register_metrics(self) -> Path:
        """Numbers only (`dvc exp show` columns); the whole record is register_record."""
        return self.metrics / "register.json"

    @property
    def register_record(self) -> Path:
        return self.reports / "register.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def mlflow_dir(self) -> Path:
        return self.root / "mlflow"


RELATIVE = ProjectPaths(Path(""))
"""The same paths relative to the project root (`RELATIVE.eval_metrics.as_posix()` is
"metrics/eval.json"), for reading them out of a git commit or a worktree."""
