"""The pipeline's run manifest: finished stages are skipped, a config change re-runs its stage and every
later one, a crash resumes at the failed stage; the report is built from the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slim_ray.config import load_config
from slim_ray.errors import ConfigError
from slim_ray.pipeline import MANIFEST, Stage, run_pipeline
from slim_ray.report import write_report


class Recorder:
    """Stages that write a real output file each and count their runs."""

    def __init__(self, root: Path, fail: str | None = None):
        self.root, self.fail, self.calls = root, fail, []

    def stage(self, name: str, sections: tuple[str, ...] = (), always: bool = False) -> Stage:
        def run() -> dict:
            self.calls.append(name)
            if name == self.fail:
                raise RuntimeError(f"{name} crashed")
            (self.root / f"{name}.out").write_text(name)
            return {"stage": name}

        outputs = () if always else (self.root / f"{name}.out",)
        return Stage(name, run, sections, outputs, always)

    def stages(self) -> list[Stage]:
        return [self.stage("prepare", ("data",)), self.stage("teach", ("teacher",)),
                self.stage("backfill", ("backfill",)), self.stage("train-slim"), self.stage("serve-demo", always=True)]


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(None, [f"run.output_dir={tmp_path}", *overrides])


def test_manifest_skips_unchanged_stages_and_reruns_what_a_change_touches(tmp_path):
    rec = Recorder(tmp_path)
    first = run_pipeline(_cfg(tmp_path), stages=rec.stages())
    assert rec.calls == ["prepare", "teach", "backfill", "train-slim", "serve-demo"]
    assert not any(s["skipped"] for s in first["stages"].values())
    assert json.loads((tmp_path / MANIFEST).read_text())["versions"]["ray"]

    rec.calls.clear()
    second = run_pipeline(_cfg(tmp_path), stages=rec.stages())
    assert rec.calls == ["serve-demo"]  # the demo requests always run
    assert second["stages"]["teach"]["skipped"] and second["stages"]["teach"]["result"] == {"stage": "teach"}

    rec.calls.clear()
    run_pipeline(_cfg(tmp_path, "backfill.max_new_tokens=64"), stages=rec.stages())
    assert rec.calls == ["backfill", "train-slim", "serve-demo"]

    rec.calls.clear()
    (tmp_path / "teach.out").unlink()  # an output gone: that stage and everything after it run again
    run_pipeline(_cfg(tmp_path, "backfill.max_new_tokens=64"), stages=rec.stages())
    assert rec.calls == ["teach", "backfill", "train-slim", "serve-demo"]

    rec.calls.clear()
    run_pipeline(_cfg(tmp_path, "backfill.max_new_tokens=64"), stages=rec.stages(), from_stage="train-slim")
    assert rec.calls == ["train-slim", "serve-demo"]

    rec.calls.clear()
    run_pipeline(_cfg(tmp_path, "backfill.max_new_tokens=64"), stages=rec.stages(), fresh=True)
    assert rec.calls == ["prepare", "teach", "backfill", "train-slim", "serve-demo"]


def test_crashed_run_resumes_at_the_failed_stage(tmp_path):
    with pytest.raises(RuntimeError, match="backfill crashed"):
        run_pipeline(_cfg(tmp_path), stages=Recorder(tmp_path, fail="backfill").stages())
    assert list(json.loads((tmp_path / MANIFEST).read_text())["stages"]) == ["prepare", "teach"]
    rec = Recorder(tmp_path)
    run_pipeline(_cfg(tmp_path), stages=rec.stages())
    assert rec.calls == ["backfill", "train-slim", "serve-demo"]


def test_bad_from_stage_and_corrupt_manifest_are_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown stage 'trian'"):
        run_pipeline(_cfg(tmp_path), stages=Recorder(tmp_path).stages(), from_stage="trian")
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(ConfigError, match="manifest.json: not valid JSON"):
        run_pipeline(_cfg(tmp_path), stages=Recorder(tmp_path).stages())


def test_report_has_tables_and_plots_for_the_stages_that_ran(tmp_path):
    metrics = {"hr@10": 0.2, "ndcg@10": 0.1, "hr@20": 0.3, "ndcg@20": 0.12, "mrr@10": 0.08, "efd@10": 0.01,
               "epc@10": 0.005}
    history = [{"epoch": e, "train_loss": 7.0 - e, "valid_ndcg@10": 0.05 * e} for e in (1, 2, 3)]
    results = {
        "train": {"name": "SASRec", "history": history},
        "evaluate": {"model": "SASRec", "full": metrics, "sampled10": metrics},
        "evaluate-slim": {"model": "SASRec-slim", "full": {**metrics, "ndcg@10": 0.12}, "sampled10": metrics},
        "compare": {"base_model": "SASRec", "slim_model": "SASRec-slim",
                    "metrics": {"ndcg@10": {"base": 0.1, "slim": 0.12, "gain": 0.2}}},
    }
    stages = [Stage(name, lambda r=result: r, always=True) for name, result in results.items()]
    run_pipeline(_cfg(tmp_path), stages=stages)
    text = write_report(tmp_path).read_text()
    assert "| NDCG@10 | 0.1000 | 0.1200 | +20.0% |" in text
    assert "![test metrics per variant](metrics.png)" in text and "![training curves](curves.png)" in text
    assert "Rationale quality" not in text  # that stage did not run
    for png in ("metrics.png", "curves.png"):
        assert (tmp_path / "report" / png).read_bytes()[:4] == b"\x89PNG"


def test_stages_that_run_share_one_ray_session_started_once(tmp_path):
    """One Ray per pipeline: each Ray stage's own ray_session joins it; nothing starts Ray when all skip."""
    import ray

    from slim_ray.ray_session import ray_session

    cfg = _cfg(tmp_path, "ray.num_cpus=1", "ray.object_store_memory_mb=100")
    seen = []

    def ray_stage(name: str) -> Stage:
        def run() -> dict:
            with ray_session(cfg.ray) as session:  # what every stage does
                seen.append((name, session["started_here"], ray.get_runtime_context().get_node_id()))
            (tmp_path / f"{name}.out").write_text(name)
            return {}
        return Stage(name, run, outputs=(tmp_path / f"{name}.out",), ray=True)

    stages = [Stage("prepare", lambda: {"ray_up": ray.is_initialized()}), ray_stage("train"), ray_stage("backfill")]
    manifest = run_pipeline(cfg, stages=stages)
    assert manifest["stages"]["prepare"]["result"] == {"ray_up": False}  # started lazily, for the first Ray stage
    assert [started for _, started, _ in seen] == [False, False] and seen[0][2] == seen[1][2]
    assert not ray.is_initialized()  # the pipeline shut down what it started
    seen.clear()
    run_pipeline(cfg, stages=stages)
    assert seen == [] and not ray.is_initialized()  # everything skipped: Ray never started
