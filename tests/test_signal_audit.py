"""The signal audit names the first pipeline stage whose check fails (bench/signal_audit.py stage_checks)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from signal_audit import stage_checks  # noqa: E402

SIGNAL = {"teacher_step3_hit5": 0.20, "teacher_rows_backbone_top5_hit5": 0.14, "student_step3_hit5": 0.18,
          "rationale_zero_shot_ndcg10": 0.03, "last10_zero_shot_ndcg10": 0.01}


def test_every_stage_passing_loses_nothing():
    checks = stage_checks(SIGNAL, title_oracle_lift=8.0, slim_lift=0.06)
    assert checks["lost_at"] is None and all(c["passed"] for k, c in checks.items() if k != "lost_at")


def test_the_first_failing_stage_along_the_pipeline_is_named():
    assert stage_checks({**SIGNAL, "teacher_step3_hit5": 0.09}, 8.0, -0.04)["lost_at"] == "teacher"  # fusion fails too
    assert stage_checks({**SIGNAL, "student_step3_hit5": 0.10}, 8.0, 0.06)["lost_at"] == "student"
    assert stage_checks({**SIGNAL, "rationale_zero_shot_ndcg10": 0.005}, 8.0, 0.06)["lost_at"] == "encoder"
    assert stage_checks(SIGNAL, title_oracle_lift=0.2, slim_lift=0.01)["lost_at"] == "fusion"  # the machinery
    assert stage_checks(SIGNAL, title_oracle_lift=8.0, slim_lift=-0.01)["lost_at"] == "fusion"


def test_a_stage_without_its_numbers_is_not_measured_rather_than_failed():
    signal = {k: v for k, v in SIGNAL.items() if not k.startswith("teacher")}
    checks = stage_checks(signal, None, None)
    assert not checks["teacher"]["measured"] and not checks["fusion"]["measured"] and checks["lost_at"] is None
