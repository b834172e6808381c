"""The end-to-end pipeline behind the README's run command: every stage in order on one config.

prepare -> train (backbone) -> evaluate -> teach (rationales for a sample of users, grounded by the
backbone's top-K) -> distill (LoRA student) -> evaluate-rationales -> backfill (student rationales
for every user, vectors into LanceDB) -> train-slim (the same backbone with SLIM fusion) ->
evaluate-slim -> compare (base vs SLIM on test) -> index (the SLIM model's item vectors into LanceDB)
-> serve-demo (Ray Serve app on 127.0.0.1:8000: a known user, a raw history, a bad request).
"""

from __future__ import annotations

import time
from typing import Callable

from slim_ray.config import Config

COMPARED = ("hr@10", "hr@20", "ndcg@10", "ndcg@20", "mrr@10", "efd@10", "epc@10")


def compare(base: dict, fused: dict) -> dict:
    """Full-ranking test metrics of the base model and its SLIM variant, with relative gains."""
    rows = {}
    for metric in COMPARED:
        b, f = base["full"][metric], fused["full"][metric]
        rows[metric] = {"base": b, "slim": f, "gain": (f - b) / b if b else None}
    return {"base_model": base["model"], "slim_model": fused["model"], "metrics": rows}


def run_pipeline(cfg: Config, report: Callable[[str, dict], None]) -> dict[str, float]:
    """Runs the stages in order; `report(stage, result)` prints each result. Returns stage wall times."""
    from slim_ray.backfill import run_backfill
    from slim_ray.distill import run_distill
    from slim_ray.prepare import run_prepare
    from slim_ray.rationale_quality import run_evaluate_rationales
    from slim_ray.serve import build_index
    from slim_ray.serve_app import demo_requests
    from slim_ray.teach import run_teach
    from slim_ray.train import run_evaluate, run_train

    slim_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"fusion": "slim"})})
    results: dict[str, dict] = {}
    stages = [("prepare", lambda: run_prepare(cfg.data, cfg.prepared_dir)),
              ("train", lambda: run_train(cfg)),
              ("evaluate", lambda: run_evaluate(cfg)),
              ("teach", lambda: run_teach(cfg)),
              ("distill", lambda: run_distill(cfg)),
              ("evaluate-rationales", lambda: run_evaluate_rationales(cfg)),
              ("backfill", lambda: run_backfill(cfg)),
              ("train-slim", lambda: run_train(slim_cfg)),
              ("evaluate-slim", lambda: run_evaluate(slim_cfg)),
              ("compare", lambda: compare(results["evaluate"], results["evaluate-slim"])),
              ("index", lambda: build_index(slim_cfg)),
              ("serve-demo", lambda: demo_requests(slim_cfg))]
    walls: dict[str, float] = {}
    for name, stage in stages:
        start = time.perf_counter()
        results[name] = stage()
        walls[name] = time.perf_counter() - start
        report(name, results[name])
    return walls
