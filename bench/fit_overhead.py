"""What a Ray Train fit costs beyond its epochs, at Ray's controller poll interval (2 s) and ours (0.2 s).

  python bench/fit_overhead.py                  # SASRec on ML-100k (demo config), 2 epochs, 3 fits a setting
  python bench/fit_overhead.py --repeats 5

Ray Train V2's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s): it
takes one epoch report per poll (a worker's report waits until the previous one was taken) and sees
the run end one poll after the last report. `ray.train_poll_s` sets it for every fit (default 0.2).
Fits alternate between the settings inside one local Ray, as the pipeline runs its stages. A fit's
wall is `run_train` from call to return (worker start, data, epochs, checkpoints, export); its
training seconds are the epochs' own (train + validation) from the run's history; overhead is the
difference. Writes bench/results/fit_overhead.json and a BENCHMARKS.md section.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, publish  # noqa: E402

from slim_ray.config import load_config  # noqa: E402
from slim_ray.prepare import run_prepare  # noqa: E402
from slim_ray.ray_session import ray_session  # noqa: E402
from slim_ray.train import run_train  # noqa: E402

SETTINGS = {"Ray default (2 s)": 2.0, "slim-ray default (0.2 s)": 0.2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench_fit_overhead")
    args = parser.parse_args()
    base = load_config(ROOT / "configs" / "ml100k.yaml", [
        f"run.output_dir={args.workdir}", f"train.epochs={args.epochs}"])
    run_prepare(base.data, base.prepared_dir)
    fits = {name: [] for name in SETTINGS}
    with ray_session(base.ray):
        run_train(base)  # warm-up: first-use costs (imports, caches) go to neither setting
        for _ in range(args.repeats):
            for name, poll in SETTINGS.items():
                cfg = base.model_copy(update={"ray": base.ray.model_copy(update={"train_poll_s": poll})})
                start = time.perf_counter()
                meta = run_train(cfg)
                wall = time.perf_counter() - start
                training = sum(h["epoch_s"] for h in meta["history"])
                fits[name].append({"wall_s": wall, "training_s": training, "overhead_s": wall - training})
                print(name, fits[name][-1], flush=True)
    mean = {name: {k: float(np.mean([f[k] for f in runs])) for k in ("wall_s", "training_s", "overhead_s")}
            for name, runs in fits.items()}
    ray_default, ours = (mean[name] for name in SETTINGS)
    summary = {"poll_s": SETTINGS, "fit_wall_s": {n: m["wall_s"] for n, m in mean.items()},
               "overhead_s": {n: m["overhead_s"] for n, m in mean.items()},
               "saved_per_fit_s": ray_default["wall_s"] - ours["wall_s"],
               "overhead_ratio": ours["overhead_s"] / ray_default["overhead_s"],
               "epochs": args.epochs, "repeats": args.repeats}
    rows = "\n".join(f"| {n} | {m['wall_s']:.1f} | {m['training_s']:.1f} | {m['overhead_s']:.1f} |" for n, m in mean.items())
    table = ("| controller poll | fit wall s | epochs s | overhead s |\n|---|---|---|---|\n" + rows)
    notes = (f"SASRec on ML-100k (configs/ml100k.yaml: all-positions objective, 1 worker x 2 threads), {args.epochs} "
             f"epochs a fit, {args.repeats} fits a setting alternating inside one local Ray after a warm-up fit; means. "
             f"Fit wall: `run_train` from call to return (worker start, data, epochs, checkpoints, model export). "
             f"Overhead: wall minus the epochs' own seconds. The 0.2 s poll saves {summary['saved_per_fit_s']:.1f} s a "
             f"fit ({summary['overhead_ratio']:.2f}x the overhead); the demo runs six fits.")
    publish("fit_overhead", "Ray Train fit overhead: controller poll interval", {"summary": summary, "fits": fits},
            table, notes)


if __name__ == "__main__":
    main()
