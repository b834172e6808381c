"""SLIM on ML-100k: each backbone without and with fusion, mean ± std over seeds, one table + a chart.

  python bench/slim.py --run-dir runs/ml100k                       # after the demo (needs its backfill)
  python bench/slim.py --run-dir runs/ml100k --backbones SASRec --variants none slim --seeds 1 2 3
  python bench/slim.py --run-dir runs/slim --student-adapter bench/data/student_ml100k_lora \
      --backbones SASRec --variants slim slim_valid none    # builds the run first: prepare, merged
                                                            # student, backfill of all three prefixes

Every model trains with the same budget (epochs, batch, lr) on the same split and is selected on
validation NDCG@10 only; test is scored by full ranking (history masked) and 100 sampled negatives.
Variants: none (the backbone), text (item texts fused), slim (item texts + rationales), slim_valid
(slim fed one rationale per user, the valid prefix's, for all three splits: what the default
one-prefix backfill gives; needs a backfill of all three prefixes to compare against), text_match
(ID-agnostic), dllm2rec and slim+dllm2rec (DLLM2Rec distillation from the rationales' named
items, alone and on top of SLIM). Results merge into bench/results/slim.json per (backbone, variant, seed), so the table can be
filled one backbone (or seed) per session; each entry keeps its seeds, epochs and rationale source;
text_match uses no backbone and is measured once, as the "ID-agnostic" row. Summary: relative gains of
the seed means per backbone (slim_over_base_ndcg10, text/dllm2rec over the base, slim+dllm2rec over
slim, slim_valid over slim), bench/results/slim.png, and a BENCHMARKS.md section.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, command, publish  # noqa: E402

from slim_ray.config import load_config  # noqa: E402
from slim_ray.fusion import uses_rationale  # noqa: E402
from slim_ray.train import run_evaluate, run_train  # noqa: E402

COLUMNS = [("full", "ndcg@10"), ("full", "hr@10"), ("full", "hr@20"), ("sampled100", "ndcg@10"),
           ("full", "efd@10"), ("full", "epc@10"), ("cold", "ndcg@10")]


ID_AGNOSTIC = "ID-agnostic"  # the table's "backbone" for text_match: one linear g_t, no item ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "ml100k",
                        help="a run folder with prepared/ and backfill/ (the demo's)")
    parser.add_argument("--backbones", nargs="+", default=["SASRec", "GRU4Rec", "SRGNN"])
    parser.add_argument("--variants", nargs="+", default=["none", "text", "slim"],
                        choices=["none", "text", "slim", "slim_valid", "text_match", "dllm2rec", "slim+dllm2rec"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--rationale", default="all", choices=["all", "step1", "step2", "step3"],
                        help="rationale vector of rationale-using variants (the paper's step ablation, "
                        "Table 2); a step shows as e.g. text_match-step2")
    parser.add_argument("--student-adapter", type=Path, default=None,
                        help="a distilled LoRA folder (adapter/ + meta.json, e.g. bench/data/student_ml100k_lora): "
                        "prepare --run-dir, merge the student and backfill train/valid/test prefixes "
                        "(incremental: a finished backfill generates nothing)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="train config override (repeatable), e.g. train.dllm2rec.ranking_weight=0.1; "
                        "needs --tag")
    parser.add_argument("--tag", default=None, help="row suffix for --set runs: dllm2rec + --tag rw0.1 -> dllm2rec-rw0.1")
    parser.add_argument("--report-only", action="store_true",
                        help="re-render BENCHMARKS.md / slim.png from bench/results/slim.json, training nothing")
    parser.add_argument("--max-new-tokens", type=int, default=96,
                        help="student budget for --student-adapter (the tuned student writes ~85 tokens)")
    args = parser.parse_args()
    if args.overrides and not args.tag:
        parser.error("--set changes the model: name its rows with --tag")
    if args.student_adapter:
        build_run(args.run_dir, args.student_adapter, args.max_new_tokens)

    results_path = ROOT / "bench" / "results" / "slim.json"
    saved = json.loads(results_path.read_text()) if results_path.exists() else {}
    results, profiles = saved.get("results", {}), saved.get("rationale_profiles", {})
    profiles[os.path.relpath(args.run_dir / "backfill", ROOT)] = rationale_profile(args.run_dir)
    if args.report_only:
        return report(results, profiles)
    workdirs = {"all": stage(args.run_dir, ROOT / "runs" / "bench_slim", None)}
    for backbone in args.backbones:
        for variant in args.variants:
            fusion, prefixes = ("slim", "valid") if variant == "slim_valid" else (variant, "all")
            if fusion == "text_match" and backbone != args.backbones[0]:
                continue  # backbone-free: measured once
            key = variant if args.rationale == "all" or not uses_rationale(fusion) else f"{variant}-{args.rationale}"
            key += f"-{args.tag}" if args.tag else ""
            if prefixes not in workdirs:
                workdirs[prefixes] = stage(args.run_dir, ROOT / "runs" / f"bench_slim_{prefixes}", prefixes)
            per_seed = {}
            for seed in args.seeds:
                cfg = load_config(ROOT / "configs" / "ml100k.yaml", [
                    f"run.output_dir={workdirs[prefixes]}", f"run.seed={seed}", f"train.backbone={backbone}",
                    f"train.fusion={fusion}", f"train.rationale={args.rationale}", f"train.epochs={args.epochs}",
                    "train.patience=100", *args.overrides])
                run_train(cfg)
                r = run_evaluate(cfg)
                per_seed[seed] = {"best_epoch": r["best_epoch"],
                                  **{f"{p}/{m}": r[p].get(m, float("nan")) for p, m in COLUMNS}}
            setting = {"epochs": args.epochs, "rationales": os.path.relpath(args.run_dir / "backfill", ROOT),
                       **({"overrides": args.overrides} if args.overrides else {})}
            row = ID_AGNOSTIC if fusion == "text_match" else backbone  # text matching uses no backbone
            old = results.setdefault(row, {}).get(key)
            if old and {k: old.get(k) for k in setting} == setting:  # same setting: other seeds are kept
                per_seed = {**seeds_of(old), **per_seed}
                commands = list(dict.fromkeys([*old["commands"], command()]))
            else:
                commands = [command()]
            results[row][key] = {**setting, "commands": commands, **summarize(per_seed)}
            print(row, key, results[row][key]["full/ndcg@10"], flush=True)
            report(results, profiles)  # after every cell: a long sweep killed midway keeps what it measured


# (summary key, variant, reference variant, what the notes call the comparison)
COMPARISONS = [
    ("slim_over_base_ndcg10", "slim", "none", "SLIM over the base"),
    ("text_over_base_ndcg10", "text", "none", "item texts only (+text) over the base"),
    ("dllm2rec_over_base_ndcg10", "dllm2rec", "none", "DLLM2Rec over the base"),
    ("slim_dllm2rec_over_slim_ndcg10", "slim+dllm2rec", "slim", "SLIM+DLLM2Rec over SLIM"),
    ("slim_valid_over_slim_ndcg10", "slim_valid", "slim",
     "one rationale per user (valid prefix, slim_valid) over one per split prefix (slim)"),
]
ORDER = ["none", "text", "slim", "slim_valid", "dllm2rec", "slim+dllm2rec", "text_match"]


def variant_order(key: str) -> tuple[int, str]:
    """Table order of a row key: its variant's place in ORDER, then -stepN / -tag suffixes by name."""
    return ORDER.index(key.split("-")[0]), key


def report(results: dict, profiles: dict) -> None:
    summary, notes = {}, ["Mean ± std over seeds; selection on validation NDCG@10; test full ranking with history "
                          "masked. `ID-agnostic` rows: text matching (`text_match`, one linear g_t on the frozen "
                          "text vectors, no item ids; `-stepN` = that step's rationale vector only)."]
    for name, a, b, label in COMPARISONS:
        gains = {backbone: relative_gain(r[a], r[b]) for backbone, r in results.items() if a in r and b in r}
        summary[name] = gains
        if gains:
            notes.append(f"Relative test NDCG@10 of {label} (means over the seeds both have): "
                         + ", ".join(f"{backbone} {g:+.1%}" for backbone, g in gains.items())
                         + paired_notes(results, a, b, f"seed std of {b}") + ".")
    lines = ["| backbone | variant | seeds x epochs | " + " | ".join(f"{p} {m.upper()}" for p, m in COLUMNS) + " |",
             "|---|---|---|" + "---|" * len(COLUMNS)]
    for backbone, variants in results.items():
        for variant, metrics in sorted(variants.items(), key=lambda kv: variant_order(kv[0])):
            cells = [f"{metrics[f'{p}/{m}']['mean']:.4f} ± {metrics[f'{p}/{m}']['std']:.4f}" for p, m in COLUMNS]
            runs = f"{len(metrics['seeds'])} x {metrics['epochs']}"
            lines.append(f"| {backbone} | {variant} | {runs} | " + " | ".join(cells) + " |")
    chart = plot(results, ROOT / "bench" / "results" / "slim.png")
    notes.append(f"Rationale sources and per-seed runs in `bench/results/slim.json`. Chart: `{chart.name}`.")
    notes += [f"Rationales in `{source}`: {profile_line(p)}" for source, p in profiles.items()]
    notes.append("Runs: " + "; ".join(f"`{c}`" for c in dict.fromkeys(
        c for v in results.values() for m in v.values() for c in m["commands"])) + ".")
    publish("slim", "SLIM fusion on ML-100k (base vs +text vs +rationale)",
            {"summary": summary, "results": results, "rationale_profiles": profiles}, "\n".join(lines),
            "\n\n".join(notes))


def summarize(per_seed: dict) -> dict:
    seeds = sorted(per_seed)
    return {"seeds": seeds, "best_epochs": [per_seed[s]["best_epoch"] for s in seeds],
            **{f"{p}/{m}": {"mean": float(np.mean(v)), "std": float(np.std(v)), "runs": v}
               for p, m in COLUMNS for v in [[per_seed[s][f"{p}/{m}"] for s in seeds]]}}


def seeds_of(entry: dict) -> dict:
    return {seed: {"best_epoch": entry["best_epochs"][i], **{f"{p}/{m}": entry[f"{p}/{m}"]["runs"][i] for p, m in COLUMNS}}
            for i, seed in enumerate(entry["seeds"])}


def relative_gain(a: dict, b: dict) -> float:
    """mean(a) / mean(b) - 1 of test NDCG@10 over the seeds both entries have."""
    common = set(a["seeds"]) & set(b["seeds"])
    mean = lambda e: np.mean([v for s, v in zip(e["seeds"], e["full/ndcg@10"]["runs"]) if s in common])  # noqa: E731
    return float(mean(a) / mean(b) - 1)


def paired(a: dict, b: dict) -> list[float]:
    """Per-seed test NDCG@10 differences a - b (same seeds: same initialisation and data order)."""
    b_runs = dict(zip(b["seeds"], b["full/ndcg@10"]["runs"]))
    return [x - b_runs[s] for s, x in zip(a["seeds"], a["full/ndcg@10"]["runs"]) if s in b_runs]


def paired_notes(results: dict, a: str, b: str, std_label: str) -> str:
    """' (backbone: per-seed differences ... vs <std_label> ...)' for every backbone with variants a and b."""
    return "".join(f" ({backbone}: per-seed differences {', '.join(f'{d:+.4f}' for d in paired(r[a], r[b]))}"
                   f" vs {std_label} {r[b]['full/ndcg@10']['std']:.4f})" for backbone, r in results.items()
                   if a in r and b in r)


def rationale_profile(run_dir: Path) -> dict:
    """How much a backfill says about each user: distinct texts, and the step-3 items it names."""
    import pandas as pd

    from slim_ray.dllm2rec import distill_targets
    from slim_ray.prepare import load_prepared

    items, sequences, _ = load_prepared(run_dir / "prepared")
    rows = pd.read_parquet(run_dir / "backfill" / "rationales.parquet", columns=["user_id", "split", "rationale"])
    targets = distill_targets(rows, items, sequences, len(sequences) + 1, top_k=10)
    named = {split: targets[split][0][sequences["user_id"].to_numpy()] for split in ("valid", "test")}
    fresh = named["valid"][named["valid"] > 0]
    counts = np.bincount(fresh, minlength=len(items) + 1)
    return {"rows": len(rows), "splits": sorted(set(rows["split"])),
            "distinct_rationales": float(rows["rationale"].nunique() / len(rows)),
            "named_new_items_per_user": float((named["valid"] > 0).sum(1).mean()),
            "distinct_named_items": int((counts > 0).sum()),
            "top_item_share_of_users": float(counts.max() / len(sequences)),
            "valid_target_named": float(np.mean([t in r for t, r in zip(sequences["valid_target"], named["valid"])])),
            "test_target_named": float(np.mean([t in r for t, r in zip(sequences["test_target"], named["test"])])),
            "valid_target_in_as_many_popular": popular_hit_rate(sequences, (named["valid"] > 0).sum(1), len(items) + 1),
            "zero_shot_test_ndcg10": zero_shot(run_dir, sequences, len(items) + 1)}


def zero_shot(run_dir: Path, sequences, n_items: int) -> dict:
    """Test NDCG@10 (full ranking, history masked) of ranking items by cosine between a user vector
    and the item text vectors, nothing trained: how much next-item signal the rationale vectors carry
    on their own, against the text of the user's last 10 items and against popularity."""
    import pandas as pd
    import torch

    from slim_ray.evaluation import full_ranks, item_popularity, rank_metrics, split_arrays
    from slim_ray.fusion import item_text_matrix, rationale_vectors

    item_text = torch.nn.functional.normalize(item_text_matrix(pd.read_parquet(run_dir / "backfill" / "items.parquet"), n_items), dim=1)
    rows = pd.read_parquet(run_dir / "backfill" / "rationales.parquet")
    arrays = split_arrays(sequences, "test", max_len=10)
    users = sequences["user_id"].to_numpy()
    user_vectors = {"rationale": torch.from_numpy(rationale_vectors(rows, len(sequences) + 1)["test"][users]),
                    "rationale_step3": torch.from_numpy(rationale_vectors(rows, len(sequences) + 1, "step3")["test"][users]),
                    "last10_item_texts": item_text[arrays["item_seq"]].sum(1)}  # padding row is zero
    scores = {name: torch.nn.functional.normalize(v, dim=1) @ item_text.T for name, v in user_vectors.items()}
    counts, _ = item_popularity(sequences["train_item_ids"], n_items)
    scores["popularity"] = torch.from_numpy(counts.astype(np.float32)).expand(len(users), -1)
    return {name: rank_metrics(full_ranks(s, arrays["target"], arrays["history"]).numpy())["ndcg@10"]
            for name, s in scores.items()}


def popular_hit_rate(sequences, counts: np.ndarray, n_items: int) -> float:
    """Reference for the named items: how often the valid target is among the same number of the
    most popular (training interactions) items the user has not seen."""
    popularity = np.bincount(np.concatenate(sequences["train_item_ids"].to_numpy()), minlength=n_items)
    ranked = np.argsort(-popularity[1:], kind="stable") + 1
    hits = []
    for history, target, k in zip(sequences["train_item_ids"], sequences["valid_target"], counts):
        seen = set(history)
        hits.append(target in [i for i in ranked[: k + len(seen)] if i not in seen][:k])
    return float(np.mean(hits))


def profile_line(p: dict) -> str:
    return (f"{p['rows']} rows ({', '.join(p['splits'])}), {p['distinct_rationales']:.0%} distinct texts; step 3 "
            f"names {p['named_new_items_per_user']:.1f} unseen catalogue items per user (valid prefix), "
            f"{p['distinct_named_items']} distinct items overall, the most named one for "
            f"{p['top_item_share_of_users']:.0%} of users; the user's next item is named for "
            f"{p['valid_target_named']:.1%} (valid) / {p['test_target_named']:.1%} (test) of users (as many of "
            f"the most popular unseen items: {p.get('valid_target_in_as_many_popular', float('nan')):.1%})."
            + ("" if "zero_shot_test_ndcg10" not in p else " Zero-shot test NDCG@10 (cosine to item texts, nothing "
               "trained): " + ", ".join(f"{k} {v:.4f}" for k, v in p["zero_shot_test_ndcg10"].items()) + "."))


def build_run(run_dir: Path, adapter: Path, max_new_tokens: int) -> None:
    from slim_ray.backfill import run_backfill
    from slim_ray.distill import export_student
    from slim_ray.prepare import run_prepare
    from slim_ray.student import ensure_student_base

    cfg = load_config(ROOT / "configs" / "ml100k.yaml", [
        f"run.output_dir={run_dir}", "backfill.splits=[train, valid, test]",
        f"backfill.max_new_tokens={max_new_tokens}"])
    if not (cfg.prepared_dir / "stats.json").is_file():
        run_prepare(cfg.data, cfg.prepared_dir)
    meta = json.loads((adapter / "meta.json").read_text())
    merged_meta = run_dir / "student" / "meta.json"
    if merged_meta.is_file() and json.loads(merged_meta.read_text()) != meta:
        sys.exit(f"{run_dir / 'student'} holds another student than {adapter}: use a new --run-dir")
    if not (run_dir / "student" / "merged").is_dir():
        export_student(adapter / "adapter", ensure_student_base(meta["base_model"]), run_dir / "student", meta)
    print("backfill:", run_backfill(cfg), flush=True)


def stage(run_dir: Path, workdir: Path, prefixes: str | None) -> Path:
    """A bench run folder with the run's prepared data and backfill; prefixes="valid" keeps only the
    valid-prefix rationales (fusion then serves train and test from them, as after a default backfill)."""
    for part in ("prepared", "backfill"):
        if not (run_dir / part).is_dir():
            sys.exit(f"{run_dir / part} is missing: --run-dir needs a run with prepare and backfill done")
        shutil.rmtree(workdir / part, ignore_errors=True)  # always the rationales being measured
        shutil.copytree(run_dir / part, workdir / part)
    if prefixes is not None:
        import pandas as pd

        path = workdir / "backfill" / "rationales.parquet"
        rows = pd.read_parquet(path)
        if prefixes not in set(rows["split"]) or set(rows["split"]) == {prefixes}:
            sys.exit(f"{path}: comparing prefixes needs a backfill of train, valid and test "
                     f"(`--set \"backfill.splits=[train, valid, test]\"`); it has {sorted(set(rows['split']))}")
        rows[rows["split"] == prefixes].to_parquet(path)
    return workdir


def plot(results: dict, out: Path) -> Path:
    """Left: test NDCG@10 per backbone and ID-based variant; right: the ID-agnostic step ablation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backbones = [b for b in results if b != ID_AGNOSTIC]
    fig, axes = plt.subplots(1, 2 if ID_AGNOSTIC in results else 1, figsize=(10, 3.8), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1]} if ID_AGNOSTIC in results else None)
    ax = axes[0, 0]
    variants = sorted({v for b in backbones for v in results[b]}, key=variant_order)
    width = 0.8 / max(len(variants), 1)
    for i, variant in enumerate(variants):
        cells = [results[b].get(variant, {}).get("full/ndcg@10", {"mean": 0.0, "std": 0.0}) for b in backbones]
        ax.bar(np.arange(len(backbones)) + i * width, [c["mean"] for c in cells], width,
               yerr=[c["std"] for c in cells], label=variant, capsize=3)
    ax.set_xticks(np.arange(len(backbones)) + width * (len(variants) - 1) / 2, backbones)
    ax.set_ylabel("test NDCG@10 (full ranking)")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # room for the legend above the bars
    ax.legend(fontsize=7, ncol=4, loc="upper center")
    if ID_AGNOSTIC in results:
        matchers = sorted(results[ID_AGNOSTIC])
        cells = [results[ID_AGNOSTIC][v]["full/ndcg@10"] for v in matchers]
        axes[0, 1].bar(range(len(matchers)), [c["mean"] for c in cells], yerr=[c["std"] for c in cells], capsize=3)
        axes[0, 1].set_xticks(range(len(matchers)), [v.replace("text_match", "all").replace("all-", "")
                                                     for v in matchers], fontsize=8)
        axes[0, 1].set_title("ID-agnostic text matching", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


if __name__ == "__main__":
    main()
