"""Signal audit: where the next-item signal is lost between teacher, student, encoder and fusion.

  python bench/slim.py --run-dir runs/slim7 --audit     # writes the `signal` block of bench/results/slim.json

On every user's test checkpoint (history s[:n-1], next item s[n-1]):
  candidates_hold_next_item   the grounding ceiling: is the next item among the prompt's candidates?
  teacher_step3_hit5          teacher set v2 (its users, at their checkpoints): next item among step 3's 5 picks,
                              against teacher_rows_backbone_top5_hit5 (the fold backbone's top 5 on the same rows)
  backbone_top5_hit5          the fold backbone's own top 5 of the same candidate list
  random5_hit5                5 of the same candidates drawn at random (exact expectation; teacher_rows_... on its rows)
  student_step3_hit5          the backfilled student rationale's first 5 named unseen items
  popularity_hit5             the 5 most popular unseen items
  rationale_zero_shot_ndcg10  rank all items by cosine(rationale vector, item text vectors), nothing trained,
                              against last10_zero_shot_ndcg10 (mean text of the last 10 items) and popularity
  explanation_genre_agreement share of the served top-10 items (the trained SLIM model) with a genre named in
                              the rationale's step 2, against the same share for a random other user's rationale
  explanation_step3_in_top10  share of step-3 items that the served top-10 holds, against a random rationale
The oracles (ORACLES) are the benchmark's positive controls, never a product path. stage_checks turns the
numbers into the stage where the signal is lost (summary.signal_stages of bench/results/slim.json).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from slim_ray.candidates import fill, popular_by_fold
from slim_ray.config import load_config
from slim_ray.dllm2rec import named_item_targets
from slim_ray.evaluation import full_ranks, item_popularity, mask_seen, rank_metrics
from slim_ray.prefixes import fold_of
from slim_ray.prompts import TitleIndex, named_aspects, parse_rationale

ROOT = Path(__file__).resolve().parents[1]
ORACLES = {  # rationale text of a checkpoint from the item right after it (leaks on purpose)
    "title_oracle": lambda item: item["text"],
    "genre_oracle": lambda item: "Genres: " + ", ".join(item["categories"]) + ".",
}
VECTOR_COLUMNS = ("embedding", "step1_embedding", "step2_embedding", "step3_embedding")


def oracle_backfill(workdir: Path, source: str) -> None:
    """Replace every checkpoint's rationale with ORACLES[source] of its next item, re-encoded."""
    from slim_ray.text_encoder import DEFAULT_ENCODER, load_encoder

    path = workdir / "backfill" / "rationales.parquet"
    rows = pd.read_parquet(path)
    items = pd.read_parquet(workdir / "prepared" / "items.parquet").set_index("item_id")
    texts = [ORACLES[source](items.loc[int(i)]) for i in rows["next_item_id"]]
    distinct = sorted(set(texts))  # one text per item: encode each once
    encoded = load_encoder(DEFAULT_ENCODER, threads=2).encode(distinct, batch_size=64, normalize_embeddings=True)
    vector_of = dict(zip(distinct, encoded.astype(np.float32)))
    rows = rows.assign(rationale=texts, step1=texts, step2=texts, step3=texts)
    for column in VECTOR_COLUMNS:
        rows[column] = [vector_of[t] for t in texts]
    pq.write_table(pa.Table.from_pandas(rows, preserve_index=False).replace_schema_metadata(None), path)


def teacher_backfill(workdir: Path, teacher_set: Path) -> None:
    """SLIM⁻ (the paper's row): the teacher's own rationales, used directly on the users it covers, each at
    the checkpoint it was written for (the text the student learns: distill.training_target), re-encoded;
    every other checkpoint row is dropped, so the rest fuse no rationale. Leak-free like the student's:
    written from s[:cut] (its `seen_ids`; `history_ids` holds only the prompt's last items) with candidates
    from a fold backbone that never saw the user. Those fold backbones are the teacher sitting's own, not
    necessarily this run's, so each row carries the candidates the teacher was shown."""
    from slim_ray.distill import training_target
    from slim_ray.text_encoder import DEFAULT_ENCODER, load_encoder

    path = workdir / "backfill" / "rationales.parquet"
    rows = pd.read_parquet(path)
    teacher = pd.read_parquet(teacher_set)
    teacher = teacher[teacher["rationale"].notna()]
    by_key = {(int(r["user_id"]), int(r["cut"])): r for r in teacher.to_dict("records")}
    texts = {key: training_target(r) for key, r in by_key.items()}
    rows = rows[[(int(u), int(c)) in texts for u, c in zip(rows["user_id"], rows["cut"])]].reset_index(drop=True)
    if len(rows) != len(texts):
        raise SystemExit(f"{len(texts) - len(rows)} teacher checkpoints are not checkpoints of this run's backfill")
    for row in rows.itertuples():  # the leak guard audits these rows: they must be what the teacher saw
        if list(by_key[(int(row.user_id), int(row.cut))]["seen_ids"]) != list(row.history_ids):
            raise SystemExit(f"user {row.user_id} at cut {row.cut}: the teacher's history differs from this run's "
                             "(another preparation of the data)")
    keys = list(zip(rows["user_id"].astype(int), rows["cut"].astype(int)))
    rows["candidate_ids"] = [[int(i) for i in by_key[k]["candidate_ids"]] for k in keys]
    rows["rationale"] = [texts[k] for k in keys]
    parsed = [parse_rationale(t) for t in rows["rationale"]]
    rows["parsed"] = [p.parsed for p in parsed]
    for n in range(3):
        rows[f"step{n + 1}"] = [p.steps[n] for p in parsed]
    encoder = load_encoder(DEFAULT_ENCODER, threads=2)
    for column, text in zip(VECTOR_COLUMNS, ("rationale", "step1", "step2", "step3")):
        rows[column] = list(encoder.encode([t or " " for t in rows[text]], batch_size=64,
                                           normalize_embeddings=True).astype(np.float32))
    pq.write_table(pa.Table.from_pandas(rows, preserve_index=False).replace_schema_metadata(None), path)


def run_audit(run_dir: Path, teacher_set: Path, results: dict) -> dict:
    cfg = load_config(ROOT / "configs" / "ml100k.yaml", [f"run.output_dir={run_dir}", "teacher.candidates=backbone"])
    items = pd.read_parquet(run_dir / "prepared" / "items.parquet")
    sequences = pd.read_parquet(run_dir / "prepared" / "sequences.parquet")
    rows = pd.read_parquet(run_dir / "backfill" / "rationales.parquet")
    test = rows[rows["split"] == "test"].sort_values("user_id").reset_index(drop=True)
    index = TitleIndex.from_items(items["item_id"], items["title"])
    n_items = len(items) + 1
    named = [named_item_targets(t, index, set(map(int, h)), 5)[0] for t, h in zip(test["rationale"], test["history_ids"])]
    nxt = test["next_item_id"].to_numpy()
    out: dict = {"users": len(test), "format_valid": float(test["parsed"].mean())}
    out["candidates_hold_next_item"] = float(np.mean([n in c for n, c in zip(nxt, test["candidate_ids"])]))
    out["student_step3_hit5"] = float(np.mean([n in ids for n, ids in zip(nxt, named)]))
    counts = np.bincount([i for ids in named for i in ids], minlength=n_items)
    out["distinct_named_items"] = int((counts > 0).sum())
    out["top_item_share_of_users"] = float(counts.max() / max(len(test), 1))
    fresh = [set(ids) for ids in named]
    out["student_off_list_share"] = float(np.mean([len(f - set(c)) / len(f) for f, c in zip(fresh, test["candidate_ids"]) if f]))
    if teacher_set.is_file():
        teacher = pd.read_parquet(teacher_set)
        teacher = teacher[teacher["rationale"].notna()]
        out["teacher_rows"] = len(teacher)
        out["teacher_step3_hit5"] = float(np.mean([n in list(i)[:5] for n, i in zip(teacher["next_item_id"], teacher["named_item_ids"])]))
        out["teacher_candidates_hold_next_item"] = float(np.mean([n in c for n, c in zip(teacher["next_item_id"], teacher["candidate_ids"])]))
        # the same rows and candidates, ranked by this run's fold backbones over the whole history
        out["teacher_rows_backbone_top5_hit5"] = backbone_top5(cfg, teacher.assign(history_ids=teacher["seen_ids"]))
        out["teacher_rows_random5_hit5"] = random5_hit5(teacher["next_item_id"], teacher["candidate_ids"])
    out["backbone_top5_hit5"] = backbone_top5(cfg, test)
    out["random5_hit5"] = random5_hit5(nxt, test["candidate_ids"])
    out["popularity_hit5"] = popularity_hit5(sequences, n_items, cfg.data.folds, test["user_id"], nxt, test["history_ids"])
    counts_train, _ = item_popularity(sequences["train_item_ids"], n_items)
    out.update(zero_shot(run_dir, test, counts_train, n_items))
    out.update(explanation_agreement(cfg, run_dir, items, sequences, test))
    return out


def stage_checks(signal: dict, title_oracle_lift: float | None, slim_lift: float | None) -> dict:
    """Follow the next-item signal along the pipeline; `lost_at` is the first stage whose check fails.
      teacher  its step-3 picks must beat the fold backbone's own top 5 of the same candidates on its rows
               (otherwise the rationale tells the backbone nothing it does not already rank);
      student  its picks keep at least 80% of the teacher's hit rate;
      encoder  rationale vectors ranked zero-shot beat the mean text of the last 10 items;
      fusion   the title oracle lifts the backbone at least 1.5x (the machinery), and SLIM beats the base."""
    s = signal
    checks = {
        "teacher": ("teacher_step3_hit5" in s, s.get("teacher_step3_hit5", 0) > s.get("teacher_rows_backbone_top5_hit5", 1),
                    f"step-3 hit@5 {s.get('teacher_step3_hit5', 0):.3f} vs the backbone's top 5 of the same candidates "
                    f"{s.get('teacher_rows_backbone_top5_hit5', float('nan')):.3f} and 5 random candidates "
                    f"{s.get('teacher_rows_random5_hit5', float('nan')):.3f} on the teacher's rows"),
        "student": (True, s["student_step3_hit5"] >= 0.8 * s.get("teacher_step3_hit5", 0),
                    f"step-3 hit@5 {s['student_step3_hit5']:.3f} vs the teacher's {s.get('teacher_step3_hit5', float('nan')):.3f}"),
        "encoder": (True, s["rationale_zero_shot_ndcg10"] > s["last10_zero_shot_ndcg10"],
                    f"zero-shot NDCG@10 {s['rationale_zero_shot_ndcg10']:.4f} vs the last 10 items' texts "
                    f"{s['last10_zero_shot_ndcg10']:.4f}"),
        "fusion": (title_oracle_lift is not None and slim_lift is not None,
                   (title_oracle_lift or 0) >= 0.5 and (slim_lift or 0) > 0,
                   f"title oracle {title_oracle_lift or 0:+.0%} over the base (machinery), SLIM {slim_lift or 0:+.1%}"),
    }
    out = {stage: {"measured": measured, "passed": measured and ok, "evidence": why}
           for stage, (measured, ok, why) in checks.items()}
    out["lost_at"] = next((stage for stage, c in out.items() if c["measured"] and not c["passed"]), None)
    return out


def random5_hit5(next_ids, candidate_ids) -> float:
    """Expected hit@5 of 5 candidates drawn uniformly from each row's list: what a pick with no
    knowledge of the user achieves among the same candidates (exact expectation, no sampling)."""
    return float(np.mean([min(5, len(c)) / len(c) if n in set(c) else 0.0 for n, c in zip(next_ids, candidate_ids)]))


def popularity_hit5(sequences: pd.DataFrame, n_items: int, folds: int, user_ids, next_ids, seen_ids) -> float:
    """Is the next item among the 5 most popular unseen items (counted on the other folds' users, as
    the candidates' popularity top-up is)?"""
    popular = popular_by_fold(sequences, n_items, folds)
    user_fold = fold_of(np.asarray(user_ids), folds)
    return float(np.mean([n in fill([], set(map(int, h)), popular[f], 5) for n, h, f in zip(next_ids, seen_ids, user_fold)]))


def backbone_top5(cfg, test: pd.DataFrame) -> float:
    """Hit@5 of the fold backbone's own top 5 among each row's candidates (the order step 3 could follow)."""
    from slim_ray.candidates import load_fold_model, top_unseen

    hits = []
    for fold in range(cfg.data.folds):
        part = test[fold_of(test["user_id"].to_numpy(), cfg.data.folds) == fold]
        model, meta = load_fold_model(cfg, fold)
        ranked = top_unseen(model, [list(map(int, h)) for h in part["history_ids"]], meta["max_len"], 200)
        for n, order, cands in zip(part["next_item_id"], ranked, part["candidate_ids"]):
            hits.append(n in [i for i in order if i in set(cands)][:5])
    return float(np.mean(hits))


def zero_shot(run_dir: Path, test: pd.DataFrame, popularity: np.ndarray, n_items: int) -> dict:
    """Test NDCG@10 of ranking all items by cosine to a user vector, nothing trained, history masked."""
    from slim_ray.fusion import item_text_matrix

    item_text = torch.nn.functional.normalize(item_text_matrix(pd.read_parquet(run_dir / "backfill" / "items.parquet"), n_items), dim=1)
    history = torch.zeros(len(test), max(len(h) for h in test["history_ids"]), dtype=torch.long)
    for r, h in enumerate(test["history_ids"]):
        history[r, : len(h)] = torch.as_tensor(list(h))
    last10 = torch.stack([item_text[torch.as_tensor(list(h)[-10:])].sum(0) for h in test["history_ids"]])
    users = {"rationale": torch.from_numpy(np.stack(test["embedding"].to_numpy())), "last10": last10}
    targets = torch.as_tensor(test["next_item_id"].to_numpy(copy=True))
    out = {}
    for name, vectors in users.items():
        scores = torch.nn.functional.normalize(vectors.float(), dim=1) @ item_text.T
        out[f"{name}_zero_shot_ndcg10"] = rank_metrics(full_ranks(scores, targets, history).numpy())["ndcg@10"]
    scores = torch.from_numpy(popularity.astype(np.float32)).expand(len(test), -1).clone()
    out["popularity_zero_shot_ndcg10"] = rank_metrics(full_ranks(scores, targets, history).numpy())["ndcg@10"]
    return out


def explanation_agreement(cfg, run_dir: Path, items: pd.DataFrame, sequences: pd.DataFrame, test: pd.DataFrame) -> dict:
    """Does the explanation explain the recommendation? The trained SLIM model's top-10 per test user vs
    the genres of its rationale's step 2 and its step-3 items, each against a random other user's rationale.
    The model is the last `slim` run bench/slim.py trained on this run's backfill (its seed is recorded)."""
    import json
    from slim_ray.artifacts import fusion_vectors
    from slim_ray.evaluation import split_arrays
    from slim_ray.fusion import load_trained
    from slim_ray.prompts import aspect_vocabulary

    staged = ROOT / "runs" / "bench_slim_student"
    model_dir = staged / "models" / f"{cfg.train.backbone}-slim"
    manifests = [json.loads((folder / "backfill" / "manifest.json").read_text()) for folder in (staged, run_dir)
                 if (folder / "backfill" / "manifest.json").is_file()]
    if not (model_dir / "model.pt").is_file() or len(manifests) < 2 or manifests[0] != manifests[1]:
        return {}  # no SLIM model trained on this run's rationales yet
    model, meta = load_trained(model_dir)
    staged = cfg.model_copy(update={"run": cfg.run.model_copy(update={"output_dir": model_dir.parents[1]}),
                                    "train": cfg.train.model_copy(update={"fusion": "slim"})})
    _, user_text, _ = fusion_vectors(staged, meta["n_items"], sequences)
    arrays = split_arrays(sequences, "test", meta["max_len"], user_text["test"])
    with torch.no_grad():
        top = mask_seen(model.full_sort_predict(arrays), arrays["history"]).topk(10, dim=1).indices.numpy()
    by_user = dict(zip(sequences["user_id"], range(len(sequences))))
    genres = dict(zip(items["item_id"], items["categories"]))
    vocabulary = aspect_vocabulary(items, limit=10**6)
    index = TitleIndex.from_items(items["item_id"], items["title"])
    step2 = [set(named_aspects(parse_rationale(t).steps[1], vocabulary)) for t in test["rationale"]]
    step3 = [set(named_item_targets(t, index, set(map(int, h)), 10)[0]) for t, h in zip(test["rationale"], test["history_ids"])]
    other = np.random.default_rng(0).permutation(len(test))
    other = np.where(other == np.arange(len(test)), (other + 1) % len(test), other)  # never the user's own

    def agreement(aspects: list[set], picks: list[set]) -> tuple[float, float]:
        g, s = [], []
        for r, user in enumerate(test["user_id"]):
            served = top[by_user[user]]
            g.append(np.mean([bool(set(genres[int(i)]) & aspects[r]) for i in served]))
            if picks[r]:
                s.append(len(picks[r] & set(served.tolist())) / len(picks[r]))
        return float(np.mean(g)), float(np.mean(s)) if s else 0.0

    own_g, own_s = agreement(step2, step3)
    rnd_g, rnd_s = agreement([step2[o] for o in other], [step3[o] for o in other])
    return {"explanation_genre_agreement": own_g, "explanation_genre_agreement_random": rnd_g,
            "explanation_step3_in_top10": own_s, "explanation_step3_in_top10_random": rnd_s,
            "explained_model": str(model_dir.relative_to(ROOT)), "explained_seed": meta.get("seed")}
