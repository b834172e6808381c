"""SASRec on ML-100k: 1 worker vs DDP with 2 workers vs DeepSpeed ZeRO-2 (and optionally ZeRO-3).

  python bench/distributed.py --epochs 3

Same global batch (256), same epochs, same data order seed. The 1-worker run is repeated with a
second seed to show the run-to-run noise; distributed runs should differ from 1 worker by about
that much. Writes bench/results/distributed.json and a BENCHMARKS.md section.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import PREFIX_OBJECTIVE, ROOT, publish  # noqa: E402

from slim_ray.config import load_config  # noqa: E402
from slim_ray.prepare import run_prepare  # noqa: E402
from slim_ray.train import run_evaluate, run_train  # noqa: E402

RUNS = {
    "1 worker (seed 42)": ["train.num_workers=1", "train.cpus_per_worker=2", "run.seed=42"],
    "1 worker (seed 43)": ["train.num_workers=1", "train.cpus_per_worker=2", "run.seed=43"],
    "DDP, 2 workers": ["train.num_workers=2", "train.cpus_per_worker=1", "train.strategy=ddp"],
    "ZeRO-2, 2 workers": ["train.num_workers=2", "train.cpus_per_worker=1", "train.strategy=deepspeed",
                          "train.zero_stage=2"],
    "ZeRO-3, 2 workers": ["train.num_workers=2", "train.cpus_per_worker=1", "train.strategy=deepspeed",
                          "train.zero_stage=3"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--runs", nargs="+", default=list(RUNS)[:4], choices=list(RUNS))
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench_distributed")
    args = parser.parse_args()

    rows = {}
    for name in args.runs:
        cfg = load_config(ROOT / "configs" / "ml100k.yaml", [
            f"run.output_dir={args.workdir}", f"train.epochs={args.epochs}", "train.patience=100",
            "train.backbone=SASRec", *PREFIX_OBJECTIVE, *RUNS[name]])
        if not cfg.prepared_dir.exists():
            run_prepare(cfg.data, cfg.prepared_dir)
        start = time.perf_counter()
        meta = run_train(cfg)
        wall = time.perf_counter() - start
        test = run_evaluate(cfg)["full"]
        rows[name] = {"valid_ndcg@10": meta["valid_ndcg@10"], "test_ndcg@10": test["ndcg@10"],
                      "test_hr@10": test["hr@10"], "final_train_loss": meta["history"][-1]["train_loss"],
                      "wall_s": wall}
        print(name, rows[name], flush=True)

    base = [rows[n]["test_ndcg@10"] for n in rows if n.startswith("1 worker")]
    mean = sum(base) / len(base)
    noise = max(base) - min(base) if len(base) > 1 else None
    for row in rows.values():
        row["delta_vs_1worker_mean"] = row["test_ndcg@10"] - mean
    summary = {"epochs": args.epochs, "one_worker_mean_test_ndcg10": mean, "seed_spread_test_ndcg10": noise,
               "max_abs_delta_distributed": max((abs(r["delta_vs_1worker_mean"]) for n, r in rows.items()
                                                 if not n.startswith("1 worker")), default=None)}
    lines = ["| run | valid NDCG@10 | test NDCG@10 | test HR@10 | Δ test NDCG@10 vs 1-worker mean "
             "| final train loss | wall s |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['valid_ndcg@10']:.4f} | {r['test_ndcg@10']:.4f} | {r['test_hr@10']:.4f} | "
                     f"{r['delta_vs_1worker_mean']:+.4f} | {r['final_train_loss']:.4f} | {r['wall_s']:.0f} |")
    notes = (f"SASRec (RecBole defaults), {args.epochs} epochs, global batch 256 split across workers, "
             f"gloo on CPU. Seed spread of the 1-worker runs (test NDCG@10): "
             f"{noise if noise is None else f'{noise:.4f}'}; the distributed runs' largest deviation "
             f"from the 1-worker mean: {summary['max_abs_delta_distributed'] or 0:.4f}. Wall times include "
             "Ray start-up and DeepSpeed initialisation; 2 workers share the same 2 cores as 1 worker x 2 threads.")
    publish("distributed", "Ray Train strategies: 1 worker vs DDP vs DeepSpeed ZeRO (SASRec, ML-100k)",
            {"summary": summary, "runs": rows}, "\n".join(lines), notes)


if __name__ == "__main__":
    main()
