"""The end-to-end pipeline behind the README's run command: every stage in order on one config.

Stages that exist so far: prepare. Each later stage appends itself here.
"""

from __future__ import annotations

import time
from typing import Callable

from slim_ray.config import Config


def run_pipeline(cfg: Config, report: Callable[[str, dict], None]) -> dict[str, float]:
    """Runs the stages in order; `report(stage, result)` prints each result. Returns stage wall times."""
    from slim_ray.prepare import run_prepare

    walls: dict[str, float] = {}
    start = time.perf_counter()
    report("prepare", run_prepare(cfg.data, cfg.prepared_dir))
    walls["prepare"] = time.perf_counter() - start
    return walls
