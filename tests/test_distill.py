"""Distillation with a tiny randomly initialised Llama (SmolLM2's real tokenizer) on Ray Train."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from slim_ray.config import load_config
from slim_ray.distill import (IGNORE, answer_loss, collate, run_distill, split_users, tokenize_pairs,
                              training_target)
from slim_ray.prefixes import fold_of
from slim_ray.prompts import TitleIndex, student_messages
from slim_ray.printing import quality_caption
from slim_ray.rationale_quality import SMOKE_MARGIN, score_rationales, share_margin95
from slim_ray.storage import load_teacher_rows


def teacher_rows(n_users: int) -> pd.DataFrame:
    rows = []
    for user in range(1, n_users + 1):
        history = [{"title": f"Film{(user + t) % 9}", "categories": ["Drama"], "year": "1990"} for t in range(3)]
        offered = [{"title": f"Film{(user + t) % 9}", "categories": ["Drama"], "year": "1990"} for t in (3, 4)]
        steps = ["The user likes dramas.", "Drama", f"Film{(user + 3) % 9}"]
        rows.append({"user_id": user, "student_messages": json.dumps(student_messages(history, offered, "movies")),
                     "rationale": "\n".join(f"Step {i}: {s}" for i, s in enumerate(steps, 1)), "steps": steps,
                     "parsed": user % 7 != 0, "history_ids": [1, 2, 3], "next_item_id": 4})
    return pd.DataFrame(rows)


def test_tokenize_masks_the_prompt(tiny_student):
    _, tokenizer = tiny_student
    rows = teacher_rows(2)
    encoded = tokenize_pairs(tokenizer, rows["student_messages"].tolist(), rows["rationale"].tolist(), 512, 16)
    ids, labels = encoded["input_ids"][0], encoded["labels"][0]
    assert len(ids) == len(labels)
    answer = labels[labels != IGNORE]
    assert len(answer) == 17 and answer[-1] == tokenizer.eos_token_id  # 16 rationale tokens + EOS
    assert tokenizer.decode(ids[: (labels == IGNORE).sum()]).rstrip().endswith("assistant")
    batch = collate({"input_ids": encoded["input_ids"], "labels": encoded["labels"]}, pad_id=0)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"].sum() == sum(len(x) for x in encoded["input_ids"])


def test_answer_loss_is_the_hf_label_loss_with_logits_for_answer_positions_only(tiny_student):
    import torch
    from transformers import AutoModelForCausalLM

    path, tokenizer = tiny_student
    rows = teacher_rows(4)
    answers = [r + " more words" * i for i, r in enumerate(rows["rationale"])]  # answers of different lengths
    encoded = tokenize_pairs(tokenizer, rows["student_messages"].tolist(), answers, 512, 64)
    batch = collate(encoded, pad_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert torch.allclose(answer_loss(model, batch), model(**batch).loss, atol=1e-5)


def test_split_users_and_targets():
    rows = teacher_rows(20)
    train, valid = split_users(rows, 0.25, seed=0, only_parsed=True)
    assert set(train["user_id"]).isdisjoint(valid["user_id"]) and valid["user_id"].nunique() == 5
    assert train["parsed"].all() and (~valid["parsed"]).sum() + valid["parsed"].sum() == len(valid)
    row = {"parsed": True, "steps": ["a", "b", "c"], "rationale": "Sure! Step 1: a ..."}
    assert training_target(row) == "Step 1: a\nStep 2: b\nStep 3: c"
    assert training_target({**row, "parsed": False}) == "Sure! Step 1: a ..."
    tagged = {**row, "steps": ["a", "Drama", "- Heat (1995) [Action, Crime]\n- Casino (1995) [Drama]"]}
    assert training_target(tagged) == "Step 1: a\nStep 2: Drama\nStep 3: - Heat (1995)\n- Casino (1995)"
    headed = {**row, "steps": ["a", "Drama", "Recommended movies from the candidate list:\n- Heat (1995) [Action]"]}
    assert training_target(headed) == "Step 1: a\nStep 2: Drama\nStep 3: - Heat (1995)"
    assert training_target({**row, "steps": ["a", "b", "Watch this: Heat (1995)"]}) == "Step 1: a\nStep 2: b\nStep 3: Watch this: Heat (1995)"


@pytest.mark.parametrize("stem, at_least", [("teacher_ml100k", 300), ("teacher_ml100k_v2", 600)])
def test_committed_teacher_set_feeds_distillation(stem, at_least):
    """bench/data's teacher sets (bench/teacher.py --export) still load and split with today's code; v2
    (grounded by cross-fitted candidates, at checkpoints) also feeds both cross-fitted students."""
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "ml100k.yaml", [f"distill.rationales={root / 'bench' / 'data' / f'{stem}.parquet'}"])
    rows = load_teacher_rows(cfg)
    assert len(rows) == rows["user_id"].nunique() >= at_least and rows["parsed"].mean() > 0.95
    train, valid = split_users(rows, cfg.distill.valid_fraction, cfg.run.seed, only_parsed=True)
    assert set(train["user_id"]).isdisjoint(valid["user_id"]) and len(valid) >= 0.1 * len(rows)
    targets = [training_target(r) for r in train.to_dict("records")]
    assert all(t.startswith("Step 1: ") and "\nStep 3: " in t and "candidate list" not in t for t in targets)
    ledger = json.loads((root / "bench" / "data" / f"{stem}_ledger.json").read_text())
    assert ledger["rationales"] == len(rows) and ledger["prompt_version"] == rows["prompt_version"].iloc[0]
    if stem.endswith("v2"):
        assert ledger["candidates"] == "backbone" and (rows["off_list"] == 0).mean() > 0.9
        for row in rows.head(50).itertuples():  # the student's prompt carries the teacher's candidates
            assert row.cut == len(row.seen_ids) and "Candidates: " in row.student_messages
        folds = fold_of(rows["user_id"].to_numpy(), cfg.data.folds)
        # each fold's student trains on the other folds' users and is scored on its own fold's users
        assert all((folds != f).sum() >= at_least // 3 for f in range(cfg.data.folds))


def test_score_rationales_hand_computed():
    index = TitleIndex.from_items([1, 2, 3], ["Heat", "Toy Story", "Casino"])
    texts = ["Step 1: x\nStep 2: Crime, Drama\nStep 3: Heat, Toy Story", "garbage", "Step 1: x\nStep 2: Comedy\nStep 3: Casino"]
    report = score_rationales(texts, [[2], [], [3]], [["Crime"], ["Drama"], ["Drama"]], index, ["Crime", "Drama", "Comedy"])
    assert report["format_valid"] == pytest.approx(2 / 3)
    assert report["category_hit"] == pytest.approx(1 / 3)
    assert report["grounding"] == pytest.approx(1 / 3)  # 3 named: Heat ok, Toy Story and Casino seen


def test_few_held_out_users_make_the_quality_table_a_smoke_check():
    assert share_margin95(8) == pytest.approx(0.3465, abs=1e-4)  # the demo's 8 users: shares +-0.35
    assert share_margin95(96) > SMOKE_MARGIN >= share_margin95(97)  # ~97 users bring it under +-0.1
    assert "smoke check" in quality_caption({"margin95": share_margin95(8), "smoke_check": True})
    assert "measured" in quality_caption({"margin95": share_margin95(400), "smoke_check": False})
    assert quality_caption({"teacher": {}}) == ""  # an older report without the margin


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_worker_zero_distillation_and_resume(tiny_student, tmp_path, stage, shared_ray):
    base, _ = tiny_student
    teacher = tmp_path / "teacher.parquet"
    teacher_rows(24).to_parquet(teacher)
    cfg = load_config(None, [f"run.output_dir={tmp_path / 'run'}", f"distill.base_model={base}",
                             f"distill.rationales={teacher}", "distill.num_workers=2", "distill.cpus_per_worker=1",
                             "distill.strategy=deepspeed", f"distill.zero_stage={stage}", "distill.epochs=2",
                             "distill.batch_size=4", "distill.lr=0.005", "ray.object_store_memory_mb=100",
                             "distill.cross_fit=false"])
    meta = run_distill(cfg)
    assert [h["epoch"] for h in meta["history"]] == [1, 2]
    assert meta["history"][1]["train_loss"] < meta["history"][0]["train_loss"]
    student = cfg.run.output_dir / "student"
    assert (student / "adapter" / "adapter_model.safetensors").is_file()
    assert (student / "merged" / "config.json").is_file() and len(meta["heldout_users"]) == 4
    if stage == 2:
        longer = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"epochs": 3})})
        resumed = run_distill(longer, resume=True)
        assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
        assert resumed["history"][:2] == meta["history"]
        from transformers import AutoModelForCausalLM

        merged = AutoModelForCausalLM.from_pretrained(student / "merged")
        assert not np.isnan(merged.model.layers[0].self_attn.q_proj.weight.detach().numpy()).any()


def test_init_adapters_are_per_fold_and_shape_checked(tmp_path):
    from slim_ray.config import DistillConfig
    from slim_ray.distill import init_adapter
    from slim_ray.errors import DataError

    for fold in (0, 1):
        (tmp_path / f"fold{fold}" / "adapter").mkdir(parents=True)
        (tmp_path / f"fold{fold}" / "adapter" / "adapter_config.json").write_text(
            json.dumps({"r": 16, "target_modules": ["v_proj", "q_proj"]}))
    dc = DistillConfig(init_adapters=tmp_path, lora_r=16, target_modules=["q_proj", "v_proj"])
    assert init_adapter(dc, 1) == str(tmp_path / "fold1" / "adapter")  # a fold's student: that fold's adapter
    assert init_adapter(DistillConfig(), 0) is None
    relative = dc.model_copy(update={"init_adapters": Path(os.path.relpath(tmp_path))})  # as configs/ml100k.yaml has it
    assert init_adapter(relative, 0) == str(tmp_path / "fold0" / "adapter")  # absolute: workers run elsewhere
    with pytest.raises(DataError, match="r=16"):
        init_adapter(dc.model_copy(update={"lora_r": 8}), 0)
    with pytest.raises(DataError, match="no adapter"):
        init_adapter(dc, None)


STUDENTS_V2 = Path(__file__).resolve().parents[1] / "bench" / "data" / "student_ml100k_v2"


@pytest.mark.slow
@pytest.mark.skipif(not (STUDENTS_V2 / "rationale_quality.json").is_file(),
                    reason="not exported yet: python bench/rationales.py --export bench/data/student_ml100k_v2")
def test_committed_students_write_the_format_for_users_they_never_saw():
    """bench/data/student_ml100k_v2 (bench/rationales.py --export), which the demo's distill stage starts
    from: its quality report scores enough held-out users, and each fold's adapter, loaded on today's
    base with today's code, writes the 3-step format for users of its own (held-out) fold."""
    from slim_ray.prompts import parse_rationale
    from slim_ray.student import HFGenerator, ensure_student_base

    root = Path(__file__).resolve().parents[1]
    report = json.loads((STUDENTS_V2 / "rationale_quality.json").read_text())
    assert report["tuned"]["users"] >= 80 and report["tuned"]["format_valid"] >= 0.95
    assert report["untuned"]["format_valid"] < 0.5  # the format is learned, not prompted
    cfg = load_config(root / "configs" / "ml100k.yaml")
    assert cfg.distill.init_adapters == Path("bench/data/student_ml100k_v2")  # the demo starts from it
    rows = pd.read_parquet(root / "bench" / "data" / "teacher_ml100k_v2.parquet")
    for fold in range(cfg.data.folds):
        meta = json.loads((STUDENTS_V2 / f"fold{fold}" / "meta.json").read_text())
        assert meta["holdout_fold"] == fold and meta["train_rows"] >= 250
        held = rows[fold_of(rows["user_id"].to_numpy(), cfg.data.folds) == fold].head(4)
        generator = HFGenerator(ensure_student_base("smollm2-135m"), str(STUDENTS_V2 / f"fold{fold}" / "adapter"), threads=2)
        texts, _ = generator.generate([json.loads(m) for m in held["student_messages"]], cfg.distill.max_new_tokens)
        assert all(parse_rationale(t).parsed for t in texts), texts


@pytest.mark.slow
def test_exported_students_declare_the_versions_of_their_inputs(tmp_path):
    """The merged folder names adapter + base versions (the backfill's cache keys hang on it), so a
    committed adapter exported on another machine keys the same prompts the same way."""
    import hashlib

    from slim_ray.distill import export_student
    from slim_ray.storage import model_version
    from slim_ray.student import ensure_student_base

    base = ensure_student_base("smollm2-135m")
    versions = []
    for fold in (0, 1):
        adapter = STUDENTS_V2 / f"fold{fold}" / "adapter"
        export_student(adapter, base, tmp_path / f"fold{fold}", {"holdout_fold": fold})
        inputs = f"{model_version(str(adapter))}+{model_version(base)}"
        versions.append(model_version(str(tmp_path / f"fold{fold}" / "merged")))
        assert versions[-1] == hashlib.sha256(inputs.encode()).hexdigest()[:16]
    assert versions[0] != versions[1]


@pytest.mark.slow
def test_exporting_a_student_on_a_cpu_driver_prints_no_deepspeed_guess(tmp_path):
    """PEFT's merge imports DeepSpeed; on a CPU-only driver it warned that it had to guess the accelerator.
    A fresh process, since the guess is made once per process."""
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from slim_ray.distill import export_student; "
            "from slim_ray.student import ensure_student_base; "
            "export_student(Path(sys.argv[1]), ensure_student_base('smollm2-135m'), Path(sys.argv[2]), {})")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    done = subprocess.run([sys.executable, "-c", code, str(STUDENTS_V2 / "fold0" / "adapter"), str(tmp_path / "s")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "s" / "merged").is_dir()
    assert "Setting accelerator to CPU" not in done.stdout + done.stderr
