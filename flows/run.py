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
import os
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]

# Before prefect is imported: its settings are read once, at import.
os.environ.setdefault("PREFECT_HOME", str(PROJECT / ".prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flows.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param for this run, e.g. -S train.learning_rate=1e-4 (repeatable)")
    parser.add_argument("--rev", default="HEAD", help="git commit, branch or tag to run (default: HEAD)")
    parser.add_argument("--force", action="store_true", help="run every stage: reuse no earlier outputs, even where DVC finds them up to date")
    parser.add_argument("--keep-workspace", action="store_true", help="keep the run's worktree under .prefect/runs/")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from flows.pipeline import qlora_pipeline
    from qlora_pipeline.config import parse_override
    from qlora_pipeline.errors import ConfigError

    try:
        overrides = {".".join(key): value for key, value in map(parse_override, args.overrides)}
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
