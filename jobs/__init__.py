"""Thin Ray job entrypoints, one per stage: `ray job submit --working-dir . -- python -m jobs.<stage>
--config FILE [--set section.key=value ...]`. Each runs the stage's CLI command with those arguments."""

import sys


def run(stage: str) -> None:
    from slim_ray.cli import app

    app([stage, *sys.argv[1:]])
