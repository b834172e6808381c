"""SLIM table v2 on ML-100k: every backbone without and with fusion, leak-free, seeds paired, p-values.

  python bench/slim.py --run-dir runs/slim7 --students bench/data/student_ml100k_v2 \
      --backbones SASRec --variants none slim title_oracle genre_oracle --seeds 1 2 3 4 5
  python bench/slim.py --run-dir runs/slim7 --audit          # the signal audit only (bench/signal_audit.py)
  python bench/slim.py --report-only                         # re-render BENCHMARKS.md from bench/results/slim.json
  python bench/slim.py --run-dir runs/oracle_check --oracles-only --backbones SASRec \
      --variants none title_oracle genre_oracle --seeds 1 --epochs 4   # the machinery check, no student needed

--oracles-only builds a run without any student (prepare + the checkpoint rows + item vectors), so
that the positive controls check the fusion design before rationales exist.
--students builds the run first (incremental): prepare, the cross-fitted fold backbones that pick
step-3 candidates (`train-folds`, kept in bench/data/fold_models_ml100k), the cross-fitted students
exported from the committed adapters (fold{k}/adapter + meta.json), and the backfill of every user's
checkpoints (slim_ray/prefixes.py). The backfill's response cache is committed
(bench/data/student_backfill_ml100k): a backfill longer than one sitting goes on where it stopped.

Variants (all selected on validation NDCG@10 with early stopping, test scored by full ranking with
history masked and by 100 sampled negatives, cold-item slice, EFD/EPC):
  none, text            the backbone; + item texts (ID-based, no rationale)
  slim                  + the student's rationale of each row's latest checkpoint before its target
  slim_leaky            the pre-checkpoint design, measured beside it: every training row of a user gets
                        the valid prefix's rationale, which holds its target (train.leaky_baseline)
  slim_minus            SLIM⁻, the paper's row: the teacher's own rationales (bench/data/teacher_ml100k_v2) used
                        directly on the users it covers, at the checkpoints it wrote them for; other rows none
  dllm2rec, slim+dllm2rec  ranking + embedding distillation from the rationales' step-3 items
  text_match            ID-agnostic text matching (no backbone; the "ID-agnostic" row)
  title_oracle, genre_oracle  positive controls, benchmark only: each checkpoint's "rationale" is the
                        text of the item right after it (title + genres) / its genres only, encoded and
                        fused exactly like real rationales. They leak on purpose: the title oracle checks
                        the machinery (it must lift far above the base), the genre oracle prices perfect
                        step-2 knowledge.
Results merge per (backbone, variant, seed), so a table can be filled across sessions.
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
from _report import PREFIX_OBJECTIVE, ROOT, command, publish  # noqa: E402
from signal_audit import ORACLES, oracle_backfill, run_audit, stage_checks, teacher_backfill  # noqa: E402

from slim_ray.config import all_positions_fits, load_config  # noqa: E402
from slim_ray.fusion import uses_rationale  # noqa: E402
from slim_ray.train import run_evaluate, run_train  # noqa: E402

COLUMNS = [("full", "ndcg@10"), ("full", "hr@10"), ("full", "hr@20"), ("sampled100", "ndcg@10"),
           ("full", "efd@10"), ("full", "epc@10"), ("cold", "ndcg@10")]
ID_AGNOSTIC = "ID-agnostic"  # the table's "backbone" for text_match: one linear g_t, no item ids
VARIANTS = {  # variant -> (train.fusion, rationale source, extra overrides)
    "none": ("none", "student", []), "text": ("text", "student", []), "slim": ("slim", "student", []),
    "slim_leaky": ("slim", "student", ["train.leaky_baseline=true"]),
    "slim_minus": ("slim", "teacher", []),
    "dllm2rec": ("dllm2rec", "student", []), "slim+dllm2rec": ("slim+dllm2rec", "student", []),
    "text_match": ("text_match", "student", []),
    "title_oracle": ("slim", "title_oracle", []), "genre_oracle": ("slim", "genre_oracle", []),
}
ORDER = list(VARIANTS)
# (summary key, variant, reference variant, what the notes call the comparison)
COMPARISONS = [
    ("slim_over_base_ndcg10", "slim", "none", "SLIM over the base"),
    ("text_over_base_ndcg10", "text", "none", "item texts only (+text) over the base"),
    ("slim_leaky_over_base_ndcg10", "slim_leaky", "none", "the old one-rationale-per-user design over the base"),
    ("slim_minus_over_base_ndcg10", "slim_minus", "none", "SLIM⁻ (the teacher's rationales, on the users it covers) over the base"),
    ("dllm2rec_over_base_ndcg10", "dllm2rec", "none", "DLLM2Rec over the base"),
    ("slim_dllm2rec_over_slim_ndcg10", "slim+dllm2rec", "slim", "SLIM+DLLM2Rec over SLIM"),
    ("slim_dllm2rec_over_base_ndcg10", "slim+dllm2rec", "none", "SLIM+DLLM2Rec over the base"),
    ("title_oracle_over_base_ndcg10", "title_oracle", "none", "the title oracle over the base"),
    ("genre_oracle_over_base_ndcg10", "genre_oracle", "none", "the genre oracle over the base"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "slim7")
    parser.add_argument("--students", type=Path, default=None,
                        help="committed cross-fitted adapters (fold{k}/adapter + meta.json): build the run first")
    parser.add_argument("--fold-models", type=Path, default=ROOT / "bench" / "data" / "fold_models_ml100k",
                        help="with --students: the cross-fitted fold backbones whose top items are the students' "
                        "candidates; trained once and kept there (committed), so every sitting sends the same prompts")
    parser.add_argument("--backfill-cache", type=Path, default=ROOT / "bench" / "data" / "student_backfill_ml100k",
                        help="with --students: the students' response cache (backfill.cache_dir), committed so that "
                        "a backfill longer than one sitting resumes on any machine")
    parser.add_argument("--checkpoints", type=int, default=10, help="training checkpoints per user for --students "
                        "(data.checkpoints_per_user); an existing run keeps what its backfill was built with")
    parser.add_argument("--stride", type=int, default=None, help="items between training checkpoints "
                        "(data.checkpoint_stride; default: the config's); an existing run keeps its own")
    parser.add_argument("--backbones", nargs="+", default=["SASRec", "GRU4Rec", "SRGNN"])
    parser.add_argument("--variants", nargs="+", default=["none", "slim"], choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    parser.add_argument("--epochs", type=int, default=50, help="maximum epochs; early stopping on valid NDCG@10")
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--objective", choices=["prefix", "all_positions"], default="prefix",
                        help="train.objective (bench/training.py compares them); SRGNN always trains on prefixes")
    parser.add_argument("--window-batch", type=int, default=32, help="windows per batch under all_positions")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override; needs --tag")
    parser.add_argument("--tag", default=None, help="row suffix for --set runs, e.g. slim + --tag rw0.1 -> slim-rw0.1")
    parser.add_argument("--oracles-only", action="store_true", help="build a student-free run: only none, text and "
                        "the oracle variants can be measured on it")
    parser.add_argument("--audit", action="store_true", help="run the signal audit (and nothing else)")
    parser.add_argument("--teacher-set", type=Path, default=ROOT / "bench" / "data" / "teacher_ml100k_v2.parquet")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()
    if args.overrides and not args.tag:
        parser.error("--set changes the model: name its rows with --tag")
    stride = args.stride or load_config(ROOT / "configs" / "ml100k.yaml").data.checkpoint_stride
    if (args.run_dir / "backfill" / "manifest.json").is_file() and not args.students:
        built = json.loads((args.run_dir / "backfill" / "manifest.json").read_text())["checkpoints"]
        args.checkpoints, stride = built["per_user"], built["stride"]
    overrides = [f"data.checkpoints_per_user={args.checkpoints}", f"data.checkpoint_stride={stride}",
                 "train.shuffle_buffer=1000000"]  # full reshuffle
    if args.students:
        build_run(args.run_dir, args.students, overrides + [f"backfill.max_new_tokens={args.max_new_tokens}",
                                                            f"backfill.cache_dir={args.backfill_cache}"], args.fold_models)
    if args.oracles_only:
        build_oracle_run(args.run_dir, overrides)
        if set(args.variants) - {"none", "text", *ORACLES}:
            parser.error("an --oracles-only run has no student rationales: variants none, text and the oracles only")

    results_path = ROOT / "bench" / "results" / "slim.json"
    saved = json.loads(results_path.read_text()) if results_path.exists() else {}
    results = saved.get("results", {}) if saved.get("version") == 2 else {}
    signal = saved.get("signal", {}) if saved.get("version") == 2 else {}
    if args.audit:
        signal = run_audit(args.run_dir, args.teacher_set, results)
        return report(results, signal)
    if args.report_only:
        return report(results, signal)
    workdirs: dict[str, Path] = {}
    for backbone in args.backbones:
        for variant in args.variants:
            fusion, source, extra = VARIANTS[variant]
            if fusion == "text_match" and backbone != args.backbones[0]:
                continue  # backbone-free: measured once
            if source not in workdirs:
                workdirs[source] = stage(args.run_dir, ROOT / "runs" / f"bench_slim_{source}", source, args.teacher_set)
            key = variant + (f"-{args.tag}" if args.tag else "")
            per_seed = {}
            fits = all_positions_fits(backbone, fusion, leaky_baseline="train.leaky_baseline=true" in extra)
            objective = args.objective if fits else "prefix"
            batch = (["train.objective=all_positions", f"train.batch_size={args.window_batch}"]
                     if objective == "all_positions" else PREFIX_OBJECTIVE)
            for seed in args.seeds:
                cfg = load_config(ROOT / "configs" / "ml100k.yaml", [
                    *batch, f"run.output_dir={workdirs[source]}", f"run.seed={seed}", f"train.backbone={backbone}",
                    f"train.fusion={fusion}", f"train.epochs={args.epochs}", f"train.patience={args.patience}",
                    *overrides, *extra, *args.overrides])
                meta = run_train(cfg)
                r = run_evaluate(cfg)
                guard = meta.get("leak_guard") or {}
                per_seed[seed] = {"best_epoch": r["best_epoch"], "epochs_run": meta["epochs_run"],
                                  "text_row_share": guard["rows_with_rationale"] / guard["training_rows"] if guard else None,
                                  "leak_free": None if not uses_rationale(fusion) else
                                  (source in ("student", "teacher") and bool(guard.get("leak_free"))),
                                  **{f"{p}/{m}": r[p].get(m, float("nan")) for p, m in COLUMNS}}
            built = json.loads((args.run_dir / "backfill" / "manifest.json").read_text())["checkpoints"]
            setting = {"max_epochs": args.epochs, "patience": args.patience, "objective": objective,
                       "checkpoints": built["per_user"],
                       "stride": built["stride"],
                       "rationales": os.path.relpath(args.run_dir / "backfill", ROOT),
                       **({"overrides": args.overrides} if args.overrides else {})}
            row = ID_AGNOSTIC if fusion == "text_match" else backbone
            old = results.setdefault(row, {}).get(key)
            earlier = {"objective": "prefix", **(old or {})}  # rows from before objectives were recorded
            if old and {k: earlier.get(k) for k in setting} == setting:  # same setting: other seeds are kept
                per_seed = {**{int(s): v for s, v in old["per_seed"].items()}, **per_seed}
                commands = list(dict.fromkeys([*old["commands"], command()]))
            else:
                commands = [command()]
            results[row][key] = {**setting, "commands": commands, "per_seed": per_seed, **summarize(per_seed)}
            print(row, key, results[row][key]["full/ndcg@10"], flush=True)
            report(results, signal)  # after every cell: a long sweep killed midway keeps what it measured


def ordered(variants: dict) -> list:
    """A backbone's (variant, entry) pairs in the table's order (tagged checks after their variant)."""
    return sorted(variants.items(), key=lambda kv: (ORDER.index(kv[0].split("-")[0]), kv[0]))


def same_budget(a: dict, b: dict) -> bool:
    """Rows compare only when trained under the same budget (max epochs, patience) and objective."""
    budget = lambda e: (e["max_epochs"], e["patience"], e.get("objective", "prefix"))  # noqa: E731
    return budget(a) == budget(b)


def summarize(per_seed: dict) -> dict:
    seeds = sorted(per_seed)
    return {"seeds": seeds, **{f"{p}/{m}": {"mean": float(np.mean(v)), "std": float(np.std(v))}
                               for p, m in COLUMNS for v in [[per_seed[s][f"{p}/{m}"] for s in seeds]]}}


def paired(a: dict, b: dict) -> list[float]:
    """Per-seed test NDCG@10 differences a - b over the seeds both have (same init and data order)."""
    pa, pb = ({int(s): v["full/ndcg@10"] for s, v in e["per_seed"].items()} for e in (a, b))
    return [pa[s] - pb[s] for s in sorted(pa) if s in pb]


def relative_gain(a: dict, b: dict) -> float:
    pa, pb = ({int(s): v["full/ndcg@10"] for s, v in e["per_seed"].items()} for e in (a, b))
    common = sorted(set(pa) & set(pb))
    return float(np.mean([pa[s] for s in common]) / np.mean([pb[s] for s in common]) - 1)


def p_value(diffs: list[float]) -> float | None:
    """Two-sided paired t-test of the per-seed differences (None under 2 seeds)."""
    from scipy import stats

    return float(stats.ttest_1samp(diffs, 0.0).pvalue) if len(diffs) >= 2 else None


def report(results: dict, signal: dict) -> None:
    summary: dict = {"seeds": {}}
    notes = ["Mean ± std over seeds; each run trains up to its row's max epochs with early stopping at its patience "
             "(both in bench/results/slim.json) and keeps its best validation-NDCG@10 epoch (history masked); test full "
             "ranking with history masked, and 100 sampled negatives. p: two-sided paired t-test over seeds."]
    for name, a, b, label in COMPARISONS:
        gains = {bb: relative_gain(r[a], r[b]) for bb, r in results.items() if a in r and b in r and same_budget(r[a], r[b])}
        diffs = {bb: paired(results[bb][a], results[bb][b]) for bb in gains}
        summary[name] = gains
        summary.setdefault("p_value_by_comparison", {})[name] = pvals = {bb: p_value(d) for bb, d in diffs.items()}
        if gains:
            notes.append(f"Relative test NDCG@10 of {label}: " + ", ".join(
                f"{bb} {g:+.1%} (per-seed {', '.join(f'{d:+.4f}' for d in diffs[bb])}; p {fmt_p(pvals[bb])})"
                for bb, g in gains.items()) + ".")
    summary["p_value"] = summary["p_value_by_comparison"]["slim_over_base_ndcg10"]
    for backbone, r in results.items():
        if "slim" in r:
            summary["seeds"][backbone] = len(r["slim"]["seeds"])
    slim_runs = [v for r in results.values() for k, e in r.items() if k == "slim" for v in e["per_seed"].values()]
    summary["leak_free"] = bool(slim_runs) and all(v["leak_free"] for v in slim_runs)
    genre = summary.get("genre_oracle_over_base_ndcg10", {})
    summary["share_of_genre_oracle_lift"] = {bb: summary["slim_over_base_ndcg10"][bb] / g
                                             for bb, g in genre.items() if bb in summary["slim_over_base_ndcg10"] and g}
    summary["signal"] = {**signal, **{k: summary[k]["SASRec"] for k in ("title_oracle_over_base_ndcg10",
                                                                       "genre_oracle_over_base_ndcg10") if "SASRec" in summary[k]}}
    if signal:  # where the signal is lost, judged on SASRec (the table's headline backbone)
        stages = stage_checks(signal, summary["title_oracle_over_base_ndcg10"].get("SASRec"),
                              summary["slim_over_base_ndcg10"].get("SASRec"))
        summary["signal_stages"] = stages
    lines = ["| backbone | variant | objective | rationales | seeds | epochs run | " + " | ".join(f"{p} {m.upper()}" for p, m in COLUMNS) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(COLUMNS)]
    for backbone, variants in results.items():
        for variant, e in ordered(variants):
            cells = [f"{e[f'{p}/{m}']['mean']:.4f} ± {e[f'{p}/{m}']['std']:.4f}" for p, m in COLUMNS]
            epochs = "/".join(str(v["epochs_run"]) for v in e["per_seed"].values())
            lines.append(f"| {backbone} | {variant} | {e.get('objective', 'prefix')} | {design(e)} | {len(e['seeds'])} | "
                         f"{epochs} | " + " | ".join(cells) + " |")
    if signal:
        notes.append("Signal audit (bench/signal_audit.py, test checkpoints): " + ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in signal.items() if not isinstance(v, dict)) + ".")
        notes.append(f"Where the signal is lost (bench/signal_audit.py stage_checks): **{stages['lost_at']}**. " + "; ".join(
            f"{stage} {'passes' if c['passed'] else 'fails' if c['measured'] else 'not measured'} ({c['evidence']})"
            for stage, c in stages.items() if stage != "lost_at") + ".")
    notes.append("Runs: " + "; ".join(f"`{c}`" for c in dict.fromkeys(
        c for v in results.values() for m in v.values() for c in m["commands"])) + ".")
    notes.append("Chart: `bench/results/slim.png` (test NDCG@10: per backbone its real variants, each seed a small dot and "
                 "mean ± std a large one, zoomed, the dotted line is the base; ID-agnostic text matching beside SASRec's base; "
                 "the oracles in a last panel of bars from 0; grey marks were trained under another objective or budget "
                 "than the base, named in their label, and do not compare with the line), drawn from these results by the "
                 "same command.")
    publish("slim", "SLIM fusion on ML-100k, v2 (leak-free checkpoints, grounded cross-fitted student)",
            {"version": 2, "summary": summary, "results": results, "signal": signal}, "\n".join(lines), "\n\n".join(notes))
    chart(results, ROOT / "bench" / "results" / "slim.png")


def chart(results: dict, path: Path) -> None:
    """Test NDCG@10 (full ranking). One panel per backbone with its real variants: each seed a small dot,
    the mean ± std a large one, the base a dotted line, the axis zoomed on them. The positive controls
    (oracles, which leak on purpose) in a last panel of bars from 0 beside their base. Grey: trained under
    another budget or objective than the base (labelled), so not against its line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def label(k: str, e: dict, other: bool) -> str:
        n = len(e["seeds"])
        return f"{k} ({n} seed{'s' * (n > 1)}" + (f"; {e.get('objective', 'prefix')}, {e['max_epochs']} ep" if other else "") + ")"

    real = {bb: [(k, e) for k, e in ordered(v) if k.split("-")[0] not in ORACLES] for bb, v in results.items()
            if bb != ID_AGNOSTIC}
    if ID_AGNOSTIC in results and "SASRec" in real:  # backbone-free: shown against the SASRec base
        real["SASRec"] += [(f"{k} ({ID_AGNOSTIC})", e) for k, e in ordered(results[ID_AGNOSTIC])]
    real = {bb: rows for bb, rows in real.items() if rows}
    controls = [(bb, k, e) for bb, v in results.items() for k, e in ordered(v) if k.split("-")[0] in ORACLES]
    panels = len(real) + bool(controls)
    grid = (panels + 1) // 2
    height = 0.42 * max([len(r) for r in real.values()] + [len(controls) + 1]) + 1.3
    fig, axes = plt.subplots(grid, 2, figsize=(14, height * grid), squeeze=False)
    axes = axes.ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    for ax, (backbone, variants) in zip(axes, real.items()):
        base = results[backbone].get("none")
        other = [base is not None and not same_budget(e, base) for _, e in variants]
        for y, ((k, e), o) in enumerate(zip(variants, other)):
            color = "tab:gray" if o else "tab:blue"
            seeds = [v["full/ndcg@10"] for v in e["per_seed"].values()]
            ax.plot(seeds, [y] * len(seeds), "o", ms=3, color=color, alpha=0.5)
            m = e["full/ndcg@10"]
            ax.errorbar(m["mean"], y, xerr=m["std"], fmt="o", ms=7, color=color, capsize=3)
            ax.annotate(f"{m['mean']:.4f}", (m["mean"], y), xytext=(0, 7), textcoords="offset points",
                        ha="center", fontsize=8)
        if base is not None:
            ax.axvline(base["full/ndcg@10"]["mean"], color="k", linestyle=":")
        ax.set_yticks(range(len(variants)), [label(k, e, o) for (k, e), o in zip(variants, other)])
        ax.set_ylim(len(variants) - 0.5, -0.7)
        ax.set_title(backbone)
        ax.set_xlabel("test NDCG@10 (full ranking)")
    if controls:
        ax = axes[panels - 1]
        rows = [(f"{bb} none", results[bb]["none"], False) for bb in dict.fromkeys(bb for bb, _, _ in controls)
                if "none" in results[bb]]
        rows += [(f"{bb} {k}", e, "none" in results[bb] and not same_budget(e, results[bb]["none"])) for bb, k, e in controls]
        means = [e["full/ndcg@10"]["mean"] for _, e, _ in rows]
        ax.barh([label(n, e, o) for n, e, o in rows], means, color=["tab:gray" if o else "tab:green" for *_, o in rows])
        for y, m in enumerate(means):
            ax.text(m, y, f" {m:.4f}", va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, max(means) * 1.25)
        ax.set_title("positive controls (oracles, benchmark only)")
        ax.set_xlabel("test NDCG@10 (full ranking)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def design(entry: dict) -> str:
    """Where a row's rationales come from: training checkpoints per user x stride, the staleness cap,
    and the share of training rows that had one."""
    if entry["per_seed"] and all(v.get("leak_free") is None for v in entry["per_seed"].values()):
        return "-"  # no rationale vectors in this variant
    staleness = next((o.split("=")[1] for o in entry.get("overrides", []) if o.startswith("train.max_staleness=")), "any")
    shares = [v["text_row_share"] for v in entry["per_seed"].values() if v.get("text_row_share") is not None]
    covered = f", {shares[0]:.0%} of training rows" if shares else ""
    return f"{entry['checkpoints']} x stride {entry.get('stride', 5)}, staleness {staleness}{covered}"


def fmt_p(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.3f}"


def build_run(run_dir: Path, students: Path, overrides: list[str], fold_models: Path) -> None:
    """prepare -> the fold backbones (copied from `fold_models`, or trained and kept there) -> cross-fitted
    students from the committed adapters -> backfill."""
    from slim_ray.artifacts import student_dir
    from slim_ray.backfill import run_backfill
    from slim_ray.candidates import fold_model_name
    from slim_ray.distill import export_student
    from slim_ray.prepare import run_prepare
    from slim_ray.student import ensure_student_base
    from slim_ray.train import run_train_folds

    cfg = load_config(ROOT / "configs" / "ml100k.yaml", [f"run.output_dir={run_dir}", "teacher.candidates=backbone",
                                                         "train.epochs=8", *PREFIX_OBJECTIVE, "backfill.max_users=null",
                                                         *overrides])  # every user, unlike the demo
    if not (cfg.prepared_dir / "stats.json").is_file():
        run_prepare(cfg.data, cfg.prepared_dir)
    names = [fold_model_name(cfg.train.backbone, fold, cfg.data.folds) for fold in range(cfg.data.folds)]
    for name in names:
        if (fold_models / name / "model.pt").is_file() and not (cfg.model_dir(name) / "model.pt").is_file():
            shutil.copytree(fold_models / name, cfg.model_dir(name), dirs_exist_ok=True)
    if not all((cfg.model_dir(name) / "model.pt").is_file() for name in names):
        print("fold backbones:", run_train_folds(cfg), flush=True)
        for name in names:  # keep them: the next sitting's prompts (and cache keys) stay the same
            shutil.copytree(cfg.model_dir(name), fold_models / name, dirs_exist_ok=True)
    for fold in range(cfg.data.folds):
        meta = json.loads((students / f"fold{fold}" / "meta.json").read_text())
        if meta.get("holdout_fold") != fold:
            sys.exit(f"{students / f'fold{fold}'} was not trained without fold {fold}")
        if not (student_dir(cfg, fold) / "merged").is_dir():
            export_student(students / f"fold{fold}" / "adapter", ensure_student_base(meta["base_model"]),
                           student_dir(cfg, fold), meta)
    print("backfill:", run_backfill(cfg), flush=True)


def build_oracle_run(run_dir: Path, overrides: list[str]) -> None:
    """prepare + a backfill-shaped table of every user's checkpoints with no rationale (empty text, zero
    vectors: the oracle staging replaces both) and the encoded item texts."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from slim_ray.text_encoder import DEFAULT_ENCODER, load_encoder
    from slim_ray.prefixes import checkpoint_rows
    from slim_ray.prepare import run_prepare
    from slim_ray.storage import load_prepared

    cfg = load_config(ROOT / "configs" / "ml100k.yaml", [f"run.output_dir={run_dir}", *overrides])
    if (run_dir / "backfill" / "manifest.json").is_file():
        return
    run_prepare(cfg.data, cfg.prepared_dir)
    items, sequences, _ = load_prepared(cfg.prepared_dir)
    rows = checkpoint_rows(sequences, cfg.data.checkpoints_per_user, cfg.data.checkpoint_stride).assign(rationale="", parsed=False)
    dim = 384
    for column in ("embedding", "step1_embedding", "step2_embedding", "step3_embedding"):
        rows[column] = [np.zeros(dim, np.float32)] * len(rows)
    items = items.assign(embedding=list(load_encoder(DEFAULT_ENCODER, threads=2).encode(
        items["text"].tolist(), batch_size=64, normalize_embeddings=True).astype(np.float32)))
    out = run_dir / "backfill"
    out.mkdir(parents=True, exist_ok=True)
    for frame, name in ((rows, "rationales"), (items, "items")):
        pq.write_table(pa.Table.from_pandas(pd.DataFrame(frame), preserve_index=False).replace_schema_metadata(None),
                       out / f"{name}.parquet")
    (out / "manifest.json").write_text(json.dumps({
        "oracle_only": True, "rows": len(rows), "encoder": DEFAULT_ENCODER,
        "checkpoints": {"per_user": cfg.data.checkpoints_per_user, "stride": cfg.data.checkpoint_stride, "folds": cfg.data.folds,
                        "by_split": rows["split"].value_counts().to_dict()}}, indent=2))


def stage(run_dir: Path, workdir: Path, source: str, teacher_set: Path) -> Path:
    """A bench run folder with the run's prepared data and backfill ("student"), the teacher's rationales
    at its checkpoints instead ("teacher", SLIM⁻), or each checkpoint's rationale replaced by an oracle
    text (ORACLES), re-encoded."""
    for part in ("prepared", "backfill"):
        if not (run_dir / part).is_dir():
            sys.exit(f"{run_dir / part} is missing: build the run first (--students)")
        shutil.rmtree(workdir / part, ignore_errors=True)  # always the rationales being measured
        shutil.copytree(run_dir / part, workdir / part)
    if source in ORACLES:
        oracle_backfill(workdir, source)
    elif source == "teacher":
        teacher_backfill(workdir, teacher_set)
    return workdir


if __name__ == "__main__":
    main()
