"""Run the pipeline flow once, now, in this process.

    python -m flows.run -S model.name=builtin:tiny-llama -S train.max_steps=10   # registers qlora-tiny-llama
    python -m flows.run --force --keep-workspace

With PREFECT_API_URL set it reports to that server (start one with scripts/prefect-server.sh);
without it Prefect starts a temporary local server for the run. Either way Prefect's state lives in
the project's .prefect/ folder and no usage data is sent.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flows import prefect_env

PROJECT = Path(__file__).resolve().parents[1]
prefect_env.apply(PROJECT)  # before prefect is imported: its settings are read once, at import


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flows.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param for this run, e.g. -S train.learning_rate=1e-4 (repeatable; "
                             "values are YAML: 1e-4 is a number, '1e-4' a string)")
    parser.add_argument("--rev", default="HEAD", help="git commit, branch or tag to run (default: HEAD)")
    parser.add_argument("--force", action="store_true", help="run every stage: reuse no earlier outputs, even where DVC finds them up to date")
    parser.add_argument("--keep-workspace", action="store_true", help="keep the run's worktree under .prefect/runs/")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from flows import overrides as param_overrides
    from flows.pipeline import qlora_pipeline
    from qlora_pipeline.errors import ConfigError

    try:
        overrides = param_overrides.parse(args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    state = qlora_pipeline(
        overrides=overrides, git_rev=args.rev, force=args.force, keep_workspace=args.keep_workspace,
        return_state=True,
    )
    if not state.is_completed():
        print(f"error: flow run {state.name}: {state.message}", file=sys.stderr)
        return 1
    print(json.dumps(state.result(), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
