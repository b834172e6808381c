"""The end-to-end pipeline behind the README's run command: every stage in order on one config.

prepare -> train (backbone) -> evaluate -> train-folds (cross-fitted backbones that pick step-3
candidates) -> teach (rationales for a sample of users at checkpoints, grounded by those candidates) -> distill (LoRA student) -> evaluate-rationales -> backfill (student rationales
for every user, vectors into LanceDB) -> train-slim (the same backbone with SLIM fusion) ->
evaluate-slim -> compare (base vs SLIM on test) -> index (publish the SLIM model as a serving bundle)
-> serve-demo (Ray Serve app on a free loopback port: a known user, a raw history, a bad request).

RUN_DIR/manifest.json records, per finished stage, a fingerprint of the config it ran with (its own
config sections chained with every earlier stage's fingerprint), its outputs, wall time and result,
plus the package versions. A re-run skips every stage whose fingerprint matches and whose outputs
still exist, so a crashed or interrupted pipeline resumes at the first stage that did not finish,
and changing e.g. `backfill.*` re-runs backfill and what follows, not the teacher.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable

from slim_ray.artifacts import student_dir
from slim_ray.candidates import fold_model_name
from slim_ray.config import Config
from slim_ray.errors import ConfigError
from slim_ray.ray_session import ray_session

COMPARED = ("hr@10", "hr@20", "ndcg@10", "ndcg@20", "mrr@10", "efd@10", "epc@10")
MANIFEST = "manifest.json"
VERSIONED = ("slim-ray", "ray", "torch", "transformers", "peft", "deepspeed", "vllm", "lancedb", "sentence-transformers")


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[], dict]
    sections: tuple[str, ...] = ()   # config sections whose change re-runs this stage and all later ones
    outputs: tuple[Path, ...] = ()   # must all exist for the stage to be skipped
    always: bool = False             # cheap or the point of the demo: never skipped
    ray: bool = False                # runs Ray work: joins the pipeline's one Ray session


def compare(base: dict, fused: dict) -> dict:
    """Full-ranking test metrics of the base model and its SLIM variant, with relative gains."""
    rows = {}
    for metric in COMPARED:
        b, f = base["full"][metric], fused["full"][metric]
        rows[metric] = {"base": b, "slim": f, "gain": (f - b) / b if b else None}
    return {"base_model": base["model"], "slim_model": fused["model"], "metrics": rows}


def pipeline_stages(cfg: Config, results: dict[str, dict]) -> list[Stage]:
    from slim_ray.backfill import run_backfill
    from slim_ray.distill import run_distill
    from slim_ray.prepare import run_prepare
    from slim_ray.rationale_quality import run_evaluate_rationales
    from slim_ray.serve import publish_bundle
    from slim_ray.serve_app import demo_requests
    from slim_ray.teach import run_teach
    from slim_ray.train import run_evaluate, run_train, run_train_folds

    slim = cfg.model_copy(update={"train": cfg.train.model_copy(update={"fusion": "slim"})})
    out = cfg.run.output_dir
    return [
        Stage("prepare", lambda: run_prepare(cfg.data, cfg.prepared_dir), ("data",), (cfg.prepared_dir,)),
        Stage("train", lambda: run_train(cfg), ("train",), (cfg.model_dir() / "model.pt",), ray=True),
        Stage("evaluate", lambda: run_evaluate(cfg), outputs=(out / "eval" / f"{cfg.model_name}.json",)),
        Stage("train-folds", lambda: run_train_folds(cfg), ("train",),
              tuple(cfg.model_dir(fold_model_name(cfg.train.backbone, f, cfg.data.folds)) / "model.pt"
                    for f in range(cfg.data.folds)), ray=True),
        Stage("teach", lambda: run_teach(cfg), ("teacher",), (out / "teacher",), ray=True),
        Stage("distill", lambda: run_distill(cfg), ("distill", "data"),
              tuple(student_dir(cfg, f) / "merged" for f in (range(cfg.data.folds) if cfg.distill.cross_fit else [None])),
              ray=True),
        Stage("evaluate-rationales", lambda: run_evaluate_rationales(cfg),
              outputs=(out / "student" / "rationale_quality.json",)),
        Stage("backfill", lambda: run_backfill(cfg), ("backfill",), (out / "backfill" / "rationales.parquet",), ray=True),
        Stage("train-slim", lambda: run_train(slim), outputs=(slim.model_dir() / "model.pt",), ray=True),
        Stage("evaluate-slim", lambda: run_evaluate(slim), outputs=(out / "eval" / f"{slim.model_name}.json",)),
        Stage("compare", lambda: compare(results["evaluate"], results["evaluate-slim"]), always=True),
        Stage("index", lambda: publish_bundle(slim), outputs=(slim.serving_dir / "bundle.json",)),
        Stage("serve-demo", lambda: demo_requests(slim), always=True, ray=True),
    ]


def fingerprint(previous: str, cfg: Config, stage: Stage) -> str:
    dumped = cfg.model_dump(mode="json")
    own = {section: dumped[section] for section in stage.sections}
    text = json.dumps({"previous": previous, "stage": stage.name, "seed": cfg.run.seed, "config": own}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def read_manifest(run_dir: Path) -> dict:
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return {"stages": {}}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON ({error}); delete it or run with --fresh") from error


def write_manifest(run_dir: Path, manifest: dict) -> None:
    """Whole-file replace, so a crash never leaves a half-written manifest."""
    path = Path(run_dir) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    tmp.replace(path)


def run_pipeline(cfg: Config, report: Callable[[str, dict], None] | None = None,
                 progress: Callable[[str, str], None] | None = None, fresh: bool = False,
                 from_stage: str | None = None, stages: list[Stage] | None = None) -> dict:
    """Runs (or skips) the stages in order. `report(stage, result)` prints a result, `progress(stage, event)`
    hears "start" / "done" / "skipped". Returns the manifest (per stage: fingerprint, wall_s, skipped, result)."""
    results: dict[str, dict] = {}
    stages = stages if stages is not None else pipeline_stages(cfg, results)
    names = [s.name for s in stages]
    if from_stage is not None and from_stage not in names:
        raise ConfigError(f"--from: unknown stage {from_stage!r}; stages are {', '.join(names)}")
    run_dir = cfg.run.output_dir
    previous_runs = {} if fresh else read_manifest(run_dir).get("stages", {})
    manifest = {"config": cfg.model_dump(mode="json"), "versions": package_versions(),
                "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "stages": {}}
    chain, forced = "", False
    # One Ray for all stages that run (each stage's ray_session joins it); none when every stage is skipped.
    session = None
    with ExitStack() as ray_once:
        for stage in stages:
            chain = fingerprint(chain, cfg, stage)
            forced = forced or stage.name == from_stage
            before = previous_runs.get(stage.name, {})
            reusable = (not forced and not stage.always and before.get("fingerprint") == chain
                        and "result" in before and all(Path(p).exists() for p in stage.outputs))
            if progress:
                progress(stage.name, "skipped" if reusable else "start")
            if reusable:
                results[stage.name] = before["result"]
                manifest["stages"][stage.name] = {**before, "skipped": True}
            else:
                if stage.ray and session is None:
                    session = ray_once.enter_context(ray_session(cfg.ray))
                start = time.perf_counter()
                results[stage.name] = stage.run()
                forced = forced or not stage.always  # new outputs: every later stage must run again
                manifest["stages"][stage.name] = {
                    "fingerprint": chain, "skipped": False, "wall_s": round(time.perf_counter() - start, 2),
                    "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "outputs": [str(p) for p in stage.outputs], "result": results[stage.name]}
                # Stages not reached keep their old entries out: a later run must not trust them.
                write_manifest(run_dir, manifest)
                if progress:
                    progress(stage.name, "done")
            if report:
                report(stage.name, results[stage.name])
    manifest["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_manifest(run_dir, manifest)
    return manifest
