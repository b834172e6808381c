"""Rationale quality on held-out users: the teacher vs the untuned student vs the tuned student.

  format_valid  share of rationales that parse into three steps
  category_hit  share of users whose next item (held out from every prompt) has a genre/category
                named in step 2
  grounding     share of step-3 items that resolve to catalogue items (fuzzy title match) and are
                not already in the user's history (pooled over all named items)
"""

from __future__ import annotations

import json
import time

import pandas as pd

from slim_ray.config import Config
from slim_ray.prompts import TitleIndex, named_aspects, validate


def score_rationales(texts: list[str], histories: list[list[int]], next_categories: list[list[str]],
                     index: TitleIndex, vocabulary: list[str]) -> dict:
    parsed, hits, named, grounded = 0, 0, 0, 0
    for text, history, categories in zip(texts, histories, next_categories):
        checked = validate(text or "", index, set(history))
        parsed += checked["parsed"]
        hits += bool(set(named_aspects(checked["steps"][1], vocabulary)) & set(categories))
        named += checked["named"]
        grounded += checked["in_catalogue"] - checked["in_history"]
    n = max(len(texts), 1)
    return {"format_valid": parsed / n, "category_hit": hits / n, "grounding": grounded / named if named else 0.0,
            "users": len(texts)}


def run_evaluate_rationales(cfg: Config) -> dict:
    from slim_ray.distill import load_teacher_rows
    from slim_ray.prepare import load_prepared
    from slim_ray.student import HFGenerator
    from slim_ray.teach import aspect_vocabulary

    student_dir = cfg.run.output_dir / "student"
    meta = json.loads((student_dir / "meta.json").read_text())
    items, _, _ = load_prepared(cfg.prepared_dir)
    rows = load_teacher_rows(cfg)
    rows = rows[rows["user_id"].isin(meta["heldout_users"]) & rows["rationale"].notna()]
    rows = rows.sort_values("user_id").head(cfg.distill.eval_users)
    categories = dict(zip(items["item_id"], items["categories"]))
    vocabulary = aspect_vocabulary(items, limit=10**6)
    index = TitleIndex.from_items(items["item_id"], items["title"])
    histories = [list(h) for h in rows["seen_ids" if "seen_ids" in rows else "history_ids"]]
    next_categories = [list(categories[int(i)]) for i in rows["next_item_id"]]
    conversations = [json.loads(m) for m in rows["student_messages"]]

    def score(texts: list[str]) -> dict:
        return score_rationales(texts, histories, next_categories, index, vocabulary)

    report = {"teacher": score(rows["rationale"].tolist())}
    samples = {}
    threads = cfg.distill.cpus_per_worker
    for name, path in (("untuned", meta["base_path"]), ("tuned", str(student_dir / "merged"))):
        start = time.perf_counter()
        texts, tokens = HFGenerator(path, threads=threads).generate(conversations, cfg.distill.max_new_tokens)
        report[name] = {**score(texts), "tokens_per_s": sum(tokens) / (time.perf_counter() - start)}
        samples[name] = texts[:3]
    report["samples"] = {"teacher": rows["rationale"].tolist()[:3], **samples}
    out = student_dir / "rationale_quality.json"
    out.write_text(json.dumps(report, indent=2))
    return report


def quality_table(report: dict) -> pd.DataFrame:
    return pd.DataFrame({name: {k: report[name][k] for k in ("format_valid", "category_hit", "grounding")}
                         for name in ("teacher", "untuned", "tuned")}).T

