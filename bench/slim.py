"""SLIM on ML-100k: each backbone without and with fusion, mean ± std over seeds, one table + a chart.

  python bench/slim.py --run-dir runs/ml100k                       # after the demo (needs its backfill)
  python bench/slim.py --run-dir runs/ml100k --backbones SASRec --variants none slim --seeds 1 2 3

Every model trains with the same budget (epochs, batch, lr) on the same split and is selected on
validation NDCG@10 only; test is scored by full ranking (history masked) and 100 sampled negatives.
Variants: none (the backbone), text (item texts fused), slim (item texts + rationales), text_match
(ID-agnostic). Writes bench/results/slim.json (summary: slim_over_base_ndcg10 per backbone = relative
gain of the seed means), bench/results/slim.png, and a BENCHMARKS.md section.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, publish  # noqa: E402

from slim_ray.config import load_config  # noqa: E402
from slim_ray.train import run_evaluate, run_train  # noqa: E402

COLUMNS = [("full", "ndcg@10"), ("full", "hr@10"), ("full", "hr@20"), ("sampled100", "ndcg@10"),
           ("full", "efd@10"), ("full", "epc@10"), ("cold", "ndcg@10")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "ml100k",
                        help="a run folder with prepared/ and backfill/ (the demo's)")
    parser.add_argument("--backbones", nargs="+", default=["SASRec", "GRU4Rec", "SRGNN"])
    parser.add_argument("--variants", nargs="+", default=["none", "text", "slim"],
                        choices=["none", "text", "slim", "text_match"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()

    workdir = ROOT / "runs" / "bench_slim"
    for part in ("prepared", "backfill"):  # same data, same rationales as the run being measured
        if not (workdir / part).exists():
            shutil.copytree(args.run_dir / part, workdir / part)
    results: dict = {}
    for backbone in args.backbones:
        for variant in args.variants:
            reports = []
            for seed in args.seeds:
                cfg = load_config(ROOT / "configs" / "ml100k.yaml", [
                    f"run.output_dir={workdir}", f"run.seed={seed}", f"train.backbone={backbone}",
                    f"train.fusion={variant}", f"train.epochs={args.epochs}", "train.patience=100"])
                run_train(cfg)
                reports.append(run_evaluate(cfg))
            results.setdefault(backbone, {})[variant] = {
                f"{protocol}/{metric}": {"mean": float(np.mean(v)), "std": float(np.std(v)), "runs": v}
                for protocol, metric in COLUMNS
                for v in [[r[protocol].get(metric, float("nan")) for r in reports]]}
            print(backbone, variant, results[backbone][variant]["full/ndcg@10"], flush=True)

    gains = {b: (r["slim"]["full/ndcg@10"]["mean"] / r["none"]["full/ndcg@10"]["mean"] - 1)
             for b, r in results.items() if "slim" in r and "none" in r}
    lines = ["| backbone | variant | " + " | ".join(f"{p} {m.upper()}" for p, m in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for backbone, variants in results.items():
        for variant, metrics in variants.items():
            cells = [f"{metrics[f'{p}/{m}']['mean']:.4f} ± {metrics[f'{p}/{m}']['std']:.4f}" for p, m in COLUMNS]
            lines.append(f"| {backbone} | {variant} | " + " | ".join(cells) + " |")
    chart = plot(results, ROOT / "bench" / "results" / "slim.png")
    notes = (f"{len(args.seeds)} seeds x {args.epochs} epochs per model, selection on validation NDCG@10; "
             f"rationales from {args.run_dir / 'backfill'}; relative NDCG@10 gain of SLIM over the base "
             f"(seed means): {', '.join(f'{b} {g:+.1%}' for b, g in gains.items())}. Chart: `{chart.name}`.")
    publish("slim", "SLIM fusion on ML-100k (base vs +text vs +rationale)",
            {"summary": {"slim_over_base_ndcg10": gains, "seeds": args.seeds, "epochs": args.epochs},
             "results": results}, "\n".join(lines), notes)


def plot(results: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    backbones = list(results)
    variants = list(next(iter(results.values())))
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        means = [results[b][variant]["full/ndcg@10"]["mean"] for b in backbones]
        stds = [results[b][variant]["full/ndcg@10"]["std"] for b in backbones]
        ax.bar(np.arange(len(backbones)) + i * width, means, width, yerr=stds, label=variant, capsize=3)
    ax.set_xticks(np.arange(len(backbones)) + width * (len(variants) - 1) / 2, backbones)
    ax.set_ylabel("test NDCG@10 (full ranking)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


if __name__ == "__main__":
    main()
