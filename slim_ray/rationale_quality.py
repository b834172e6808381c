"""Rationale quality on held-out users: the teacher vs the untuned student vs the tuned student.

  format_valid  share of rationales that parse into three steps
  category_hit  share of users whose next item (held out from every prompt) has a genre/category
                named in step 2
  grounding     share of step-3 items that resolve to catalogue items (fuzzy title match) and are
                not already in the user's history (pooled over all named items)
  off_list      share of those items that are not among the prompt's candidates
Each student is scored on teacher rows of users it never trained on (a cross-fitted student: its
whole held-out fold).
"""

from __future__ import annotations

import json
import math
import time

import pandas as pd

from slim_ray.artifacts import student_dir
from slim_ray.config import Config
from slim_ray.prefixes import fold_of
from slim_ray.prompts import TitleIndex, aspect_vocabulary, named_aspects, validate


def score_rationales(texts: list[str], histories: list[list[int]], next_categories: list[list[str]],
                     index: TitleIndex, vocabulary: list[str], candidates: list[list[int]] | None = None) -> dict:
    parsed, hits, named, grounded, off = 0, 0, 0, 0, 0
    for r, (text, history, categories) in enumerate(zip(texts, histories, next_categories)):
        checked = validate(text or "", index, set(history), None if candidates is None else set(candidates[r]))
        parsed += checked["parsed"]
        hits += bool(set(named_aspects(checked["steps"][1], vocabulary)) & set(categories))
        named += checked["named"]
        grounded += checked["in_catalogue"] - checked["in_history"]
        off += checked["off_list"]
    n = max(len(texts), 1)
    return {"format_valid": parsed / n, "category_hit": hits / n, "grounding": grounded / named if named else 0.0,
            "off_list": off / grounded if grounded else 0.0, "users": len(texts)}


# Shares measured over fewer users than this margin allows (about 97 users) are a smoke check, not a measurement.
SMOKE_MARGIN = 0.1


def share_margin95(users: int) -> float:
    """Worst-case (share 0.5) half-width of a 95% interval on a share measured over `users` users: how
    far the table's shares can sit from the truth by chance alone."""
    return 1.96 * 0.5 / math.sqrt(users) if users else 1.0


def heldout_rows(cfg: Config, rows: pd.DataFrame) -> list[tuple[str, dict, pd.DataFrame]]:
    """(merged student folder, its meta, teacher rows it never trained on) per distilled student: a
    cross-fitted student's whole held-out fold, else the single student's held-out users."""
    out = []
    for fold in range(cfg.data.folds) if cfg.distill.cross_fit else [None]:
        folder = student_dir(cfg, fold)
        meta = json.loads((folder / "meta.json").read_text())
        held = (fold_of(rows["user_id"].to_numpy(), cfg.data.folds) == fold) if fold is not None \
            else rows["user_id"].isin(meta["heldout_users"]).to_numpy()
        out.append((str(folder / "merged"), meta, rows[held]))
    return out


def run_evaluate_rationales(cfg: Config) -> dict:
    from slim_ray.storage import load_prepared, load_teacher_rows
    from slim_ray.student import HFGenerator

    items, _, _ = load_prepared(cfg.prepared_dir)
    rows = load_teacher_rows(cfg)
    students = heldout_rows(cfg, rows[rows["rationale"].notna()].sort_values("user_id"))
    per_student = max(1, cfg.distill.eval_users // len(students))
    students = [(path, meta, held.head(per_student)) for path, meta, held in students]
    rows = pd.concat([held for _, _, held in students])
    categories = dict(zip(items["item_id"], items["categories"]))
    vocabulary = aspect_vocabulary(items, limit=10**6)
    index = TitleIndex.from_items(items["item_id"], items["title"])
    histories = [list(h) for h in rows["seen_ids" if "seen_ids" in rows else "history_ids"]]
    next_categories = [list(categories[int(i)]) for i in rows["next_item_id"]]
    candidates = [list(c) for c in rows["candidate_ids"]] if "candidate_ids" in rows else None

    def score(texts: list[str]) -> dict:
        return score_rationales(texts, histories, next_categories, index, vocabulary, candidates)

    margin = share_margin95(len(rows))
    report = {"teacher": score(rows["rationale"].tolist()), "students": len(students), "margin95": margin,
              "smoke_check": margin > SMOKE_MARGIN}
    samples = {}
    threads = cfg.distill.cpus_per_worker
    runs = {"untuned": [(students[0][1]["base_path"], rows)], "tuned": [(path, held) for path, _, held in students]}
    for name, parts in runs.items():
        start, texts, tokens = time.perf_counter(), [], 0
        for path, held in parts:
            out, counts = HFGenerator(path, threads=threads).generate(
                [json.loads(m) for m in held["student_messages"]], cfg.distill.max_new_tokens)
            texts, tokens = texts + out, tokens + sum(counts)
        report[name] = {**score(texts), "tokens_per_s": tokens / (time.perf_counter() - start)}
        samples[name] = texts[:3]
    report["samples"] = {"teacher": rows["rationale"].tolist()[:3], **samples}
    out = student_dir(cfg) / "rationale_quality.json"
    out.write_text(json.dumps(report, indent=2))
    return report


def quality_table(report: dict) -> pd.DataFrame:
    return pd.DataFrame({name: {k: report[name][k] for k in ("format_valid", "category_hit", "grounding")}
                         for name in ("teacher", "untuned", "tuned")}).T

