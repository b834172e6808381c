"""The end-to-end pipeline behind the README's run command: every stage in order on one config.

Stages so far: prepare -> train (backbone) -> evaluate -> teach (rationales for a sample of users,
grounded by the backbone's top-K) -> distill (LoRA student) -> evaluate-rationales. Each later stage
appends itself.
"""

from __future__ import annotations

import time
from typing import Callable

from slim_ray.config import Config


def run_pipeline(cfg: Config, report: Callable[[str, dict], None]) -> dict[str, float]:
    """Runs the stages in order; `report(stage, result)` prints each result. Returns stage wall times."""
    from slim_ray.prepare import run_prepare
    from slim_ray.distill import run_distill
    from slim_ray.rationale_quality import run_evaluate_rationales
    from slim_ray.teach import run_teach
    from slim_ray.train import run_evaluate, run_train

    stages = [("prepare", lambda: run_prepare(cfg.data, cfg.prepared_dir)),
              ("train", lambda: run_train(cfg)),
              ("evaluate", lambda: run_evaluate(cfg)),
              ("teach", lambda: run_teach(cfg)),
              ("distill", lambda: run_distill(cfg)),
              ("evaluate-rationales", lambda: run_evaluate_rationales(cfg))]
    walls: dict[str, float] = {}
    for name, stage in stages:
        start = time.perf_counter()
        report(name, stage())
        walls[name] = time.perf_counter() - start
    return walls
