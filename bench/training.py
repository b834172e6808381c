"""Backbone training: objective `prefix` (RecBole's) vs `all_positions` (the original SASRec's), side by side.

  python bench/training.py                                  # SASRec + GRU4Rec both ways, SRGNN prefix; 3 seeds
  python bench/training.py --backbones SASRec --seeds 0     # one backbone, one seed a side
  python bench/training.py --objectives all_positions       # only these runs; finished runs (any objective)
                                                            # are reused from --workdir and the committed
                                                            # results (--fresh: not those) and reported

Both objectives see every training target (t = 1..n-3 of each ML-100k user) once an epoch. `prefix`
runs one forward pass per target (97k rows, batch 256); `all_positions` one per window of up to 50
targets (~2.2k rows, batch --window-batch), with the loss at every position. Each run: Ray Train,
1 worker x 2 threads, up to --max-epochs with early stopping on valid NDCG@10 (--patience), the best
epoch kept; test NDCG@10 by full ranking with history items masked. `epoch_s` is the mean training
time of an epoch (no validation, no Ray start); `to_best_s` the training seconds up to the kept
epoch. GFLOP per epoch: torch's FlopCounterMode on forward + backward of the first 64 rows of the
epoch's table, scaled to all its rows; achieved GFLOPS = that / epoch_s, against the fp32 matmul
peak measured at the start of the invocation that ran it (2 threads). Writes bench/results/training.json and a BENCHMARKS.md section.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, matmul_peak_gflops, publish  # noqa: E402

from slim_ray.config import all_positions_fits, load_config  # noqa: E402
from slim_ray.fusion import build_model  # noqa: E402
from slim_ray.prepare import run_prepare  # noqa: E402
from slim_ray.storage import load_prepared  # noqa: E402
from slim_ray.train import SELECT_METRIC, column_array, run_evaluate, run_train, training_table, training_windows  # noqa: E402

OBJECTIVES = {b: ("prefix", "all_positions") if all_positions_fits(b, "none") else ("prefix",)
              for b in ("SASRec", "GRU4Rec", "SRGNN")}


def epoch_gflop(cfg, sequences, n_items: int, sample: int = 64) -> tuple[float, int]:
    """(GFLOP of one training epoch, rows in it), counted on `sample` rows and scaled."""
    from torch.utils.flop_counter import FlopCounterMode

    tc = cfg.train
    table = (training_windows if tc.objective == "all_positions" else training_table)(sequences, cfg.data.max_len)
    rows = table.slice(0, sample)
    batch = {name: torch.from_numpy(column_array(rows, name).astype(np.int64))
             for name in ("item_seq", "item_seq_len", "pos_item")}
    torch.manual_seed(0)
    model = build_model("none", tc.backbone, n_items, cfg.data.max_len, tc.model, None)
    with FlopCounterMode(display=False) as counter:
        model.calculate_loss(batch).backward()
    return counter.get_total_flops() / 1e9 * table.num_rows / rows.num_rows, table.num_rows


def settings(objective: str, args) -> dict:
    """What a run was trained under: a finished run counts for the table only under the same settings."""
    return {"max_epochs": args.max_epochs, "patience": args.patience,
            "batch_size": args.window_batch if objective == "all_positions" else 256}


def run_key(r: dict) -> tuple[str, str, int]:
    return r["backbone"], r["objective"], r["seed"]


def committed_runs() -> list[dict]:
    """The runs in the committed bench/results/training.json, so a fresh machine (empty --workdir) adds rows
    to the table instead of replacing it."""
    path = ROOT / "bench" / "results" / "training.json"
    runs = json.loads(path.read_text())["runs"] if path.is_file() else []
    return [{k: v for k, v in r.items() if k != "of_peak"} for r in runs]


def finished_runs(args) -> list[dict]:
    """Every run that finished under this invocation's settings (any backbone or objective): those in
    --workdir, then the committed ones not rerun there (unless --fresh)."""
    found = {run_key(r): r for r in ([] if args.fresh else committed_runs())}
    found |= {run_key(r): r for r in (json.loads(path.read_text()) for path in sorted(args.workdir.glob("*/result.json")))}
    return [r for r in found.values() if r["settings"] == settings(r["objective"], args)]


def one_run(backbone: str, objective: str, offset: int, args) -> None:
    """Trains and tests one (backbone, objective, seed) unless it finished under the same settings, so an
    interrupted table resumes where it stopped (a prefix run takes tens of minutes here)."""
    done = args.workdir / f"{backbone}-{objective}-seed{offset}" / "result.json"
    if (backbone, objective, 42 + offset) in {run_key(r) for r in finished_runs(args)}:
        return
    cfg = load_config(ROOT / "configs" / "ml100k.yaml", args.base_overrides + [
        f"run.output_dir={args.workdir / f'{backbone}-{objective}-seed{offset}'}", f"run.seed={42 + offset}",
        f"train.backbone={backbone}", f"train.objective={objective}",
        f"train.batch_size={settings(objective, args)['batch_size']}"])
    run_prepare(cfg.data, cfg.prepared_dir)
    items, sequences, _ = load_prepared(cfg.prepared_dir)
    gflop, rows = epoch_gflop(cfg, sequences, len(items) + 1)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"shuffle_buffer": rows})})  # full reshuffle
    meta = run_train(cfg)
    test = run_evaluate(cfg)["full"]
    train_s = [h["train_s"] for h in meta["history"]]
    epoch_s = float(np.mean(train_s))
    result = {"backbone": backbone, "objective": objective, "seed": cfg.run.seed, "rows_per_epoch": rows,
              "batch_size": cfg.train.batch_size, "best_epoch": meta["best_epoch"], "epochs_run": meta["epochs_run"],
              "valid_ndcg10": meta[SELECT_METRIC], "test_ndcg10": test["ndcg@10"], "test_hr10": test["hr@10"],
              "epoch_s": epoch_s, "to_best_s": float(sum(train_s[: meta["best_epoch"]])),
              "gflop_per_epoch": gflop, "gflops": gflop / epoch_s, "train_wall_s": meta["train_wall_s"],
              "matmul_peak_gflops": args.peak, "settings": settings(objective, args)}
    print(json.dumps(result), flush=True)
    done.write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="offsets to run.seed 42")
    parser.add_argument("--objectives", nargs="+", default=["prefix", "all_positions"], choices=["prefix", "all_positions"],
                        help="run only these (finished runs of the others are still reported from --workdir)")
    parser.add_argument("--max-epochs", type=int, default=100)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--window-batch", type=int, default=32, help="windows per batch (all_positions)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench_training")
    parser.add_argument("--fresh", action="store_true", help="ignore the runs in the committed results file")
    args = parser.parse_args()
    args.base_overrides = [f"train.epochs={args.max_epochs}", f"train.patience={args.patience}",
                           "train.num_workers=1", "train.cpus_per_worker=2", "train.lr=0.001", "train.fusion=none"]

    args.peak = matmul_peak_gflops(2)  # this invocation's; each run keeps the peak measured beside it
    for backbone in args.backbones:
        for objective in [o for o in OBJECTIVES[backbone] if o in args.objectives]:
            for offset in args.seeds:
                one_run(backbone, objective, offset, args)
    runs = finished_runs(args)
    values = lambda b, o, key: [r[key] for r in runs if r["backbone"] == b and r["objective"] == o]  # noqa: E731
    mean = lambda b, o, key: float(np.mean(values(b, o, key)))  # noqa: E731
    std = lambda b, o, key: float(np.std(values(b, o, key)))  # noqa: E731
    for r in runs:
        r["of_peak"] = r["gflops"] / r["matmul_peak_gflops"]
    pairs = [(b, o) for b in OBJECTIVES for o in OBJECTIVES[b] if values(b, o, "seed")]  # those with runs
    backbones = list(dict.fromkeys(b for b, _ in pairs))
    per_pair = lambda key: {b: {o: mean(b, o, key) for bb, o in pairs if bb == b} for b in backbones}  # noqa: E731
    by_objective = lambda key: {o: float(np.mean([r[key] for r in runs if r["objective"] == o]))  # noqa: E731
                                for o in ("prefix", "all_positions") if any(r["objective"] == o for r in runs)}
    peaks = [r["matmul_peak_gflops"] for r in runs]
    from scipy import stats

    both = [b for b in backbones if all(values(b, o, "seed") for o in ("prefix", "all_positions"))]
    # Seeds do not pair runs across objectives (different rows, batches, data order): Welch's test.
    objective_choice = {b: {"prefix_over_all_positions_ndcg10": mean(b, "prefix", "test_ndcg10")
                            / mean(b, "all_positions", "test_ndcg10"),
                            "p_value": float(stats.ttest_ind(values(b, "prefix", "test_ndcg10"),
                                                             values(b, "all_positions", "test_ndcg10"),
                                                             equal_var=False).pvalue),
                            "prefix_over_all_positions_to_best_s": mean(b, "prefix", "to_best_s")
                            / mean(b, "all_positions", "to_best_s")} for b in both}
    summary = {"epoch_s": per_pair("epoch_s"), "test_ndcg10": per_pair("test_ndcg10"), "to_best_s": per_pair("to_best_s"),
               "objective_choice": objective_choice,
               "gflops": by_objective("gflops"), "gflops_of_matmul_peak": by_objective("of_peak"),
               "matmul_peak_gflops": float(np.mean(peaks)),
               "seeds": {f"{b}/{o}": len(values(b, o, "seed")) for b, o in pairs}}
    lines = ["| backbone | objective | seeds | rows/epoch | batch | test NDCG@10 | valid NDCG@10 | best epoch | epoch s "
             "| s to best epoch | GFLOP/epoch | GFLOPS | of matmul peak |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    def spread(b: str, o: str) -> str:  # one seed has no spread to show
        return f" ± {std(b, o, 'test_ndcg10'):.4f}" if len(values(b, o, "seed")) > 1 else " (1 seed)"

    for b, o in pairs:
        first = next(r for r in runs if r["backbone"] == b and r["objective"] == o)
        lines.append(f"| {b} | {o} | {len(values(b, o, 'seed'))} | {first['rows_per_epoch']} | {first['batch_size']} | "
                     f"{mean(b, o, 'test_ndcg10'):.4f}{spread(b, o)} | {mean(b, o, 'valid_ndcg10'):.4f} | "
                     f"{mean(b, o, 'best_epoch'):.1f} | {mean(b, o, 'epoch_s'):.1f} | {mean(b, o, 'to_best_s'):.0f} | "
                     f"{first['gflop_per_epoch']:.0f} | {mean(b, o, 'gflops'):.1f} | {mean(b, o, 'of_peak'):.1%} |")
    notes = (f"ML-100k, Ray Train 1 worker x 2 threads, Adam lr 0.001, up to {args.max_epochs} epochs, patience "
             f"{args.patience} on valid NDCG@10 (history masked), mean ± std over seeds; test full ranking, history "
             f"masked. Each run's GFLOPS is set against the fp32 matmul peak (2 threads) measured at the start of "
             f"the invocation that ran it ({min(peaks):.0f}-{max(peaks):.0f} GFLOPS). Epoch s is training only; "
             "GFLOP counts the model's forward + backward (FlopCounterMode, scaled from 64 rows), not the data "
             "pipeline or the optimizer. Rows this command did not run come from the committed results of earlier "
             "invocations (the same settings; --fresh drops them).")
    for b, c in objective_choice.items():
        notes += (f" {b}: prefix / all-positions test NDCG@10 = {c['prefix_over_all_positions_ndcg10']:.3f} "
                  f"(Welch p {c['p_value']:.2f}) at {c['prefix_over_all_positions_to_best_s']:.0f}x the training "
                  "seconds to the best epoch.")
    publish("training", "Backbone training: prefix vs all-positions objective (ML-100k)",
            {"summary": summary, "runs": runs}, "\n".join(lines), notes)


if __name__ == "__main__":
    main()
