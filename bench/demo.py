"""Wall time of the README's run command on the embedded default (ML-100k, local Ray), per stage.

  python bench/demo.py                          # bash scripts/demo.sh --fresh into runs/ml100k
  python bench/demo.py --run-dir runs/demo-b -- --set backfill.max_users=200

Runs the README command itself (`bash scripts/demo.sh --fresh`, so no stage is skipped from an
earlier run) into an emptied RUN_DIR (so no teacher or student answer comes from an earlier run's
response cache; the machine's model and wheel caches in ~/.cache/slim-ray stay warm), then reads the per-stage wall times from RUN_DIR/manifest.json. The demo's budget is
15 minutes on this 2-core machine (target 10). Writes bench/results/demo.json and a BENCHMARKS.md section.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, matmul_peak_gflops, publish  # noqa: E402

BUDGET_S = 15 * 60


def cache_listing() -> dict[str, list[str]]:
    """What the one-time caches (teacher GGUF + llama.cpp wheel, converted student) hold."""
    from slim_ray.config import cache_root

    return {part: sorted(p.name for p in (cache_root() / part).glob("*")) for part in ("models", "wheels")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/ml100k")
    parser.add_argument("extra", nargs="*", help="more `slim-ray pipeline` arguments (after --)")
    args = parser.parse_args()
    run_dir = ROOT / args.run_dir
    command = ["bash", "scripts/demo.sh", "--fresh", "--set", f"run.output_dir={args.run_dir}", *args.extra]
    log = ROOT / "runs" / "bench_demo.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    caches = cache_listing()  # before the run: a cold cache adds minutes of one-time set-up to the wall time
    warm = all(caches.values()) and len(caches["models"]) >= 2
    peak = matmul_peak_gflops(2)  # machines of one kind differ by ~10% from run to run: state this one's speed
    start = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    if code:
        sys.exit(f"the demo failed (exit {code}); see {log}")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stages = {name: s["wall_s"] for name, s in manifest["stages"].items()}
    results = manifest["stages"]
    compared = results["compare"]["result"]["metrics"]["ndcg@10"]
    backfill = results["backfill"]["result"]
    summary = {"demo_wall_s": round(wall, 1), "stage_wall_s": stages, "budget_s": BUDGET_S,
               "within_budget": wall <= BUDGET_S, "setup_and_startup_s": round(wall - sum(stages.values()), 1),
               "backfill_users": backfill["users"], "backfill_rows": backfill["rows"],
               "backfill_generation_tokens_per_s": backfill["generation_tokens_per_s"],
               "teacher_answers_from_cache": results["teach"]["result"]["from_cache"], "base_ndcg10": compared["base"],
               "slim_ndcg10": compared["slim"], "caches_warm": warm, "caches_before": caches,
               "matmul_peak_gflops": peak}
    rows = "\n".join(f"| {name} | {seconds:.0f} | {seconds / wall:.0%} |" for name, seconds in stages.items())
    table = (f"| stage | wall s | share |\n|---|---:|---:|\n{rows}\n"
             f"| setup check + Ray/process start-up | {summary['setup_and_startup_s']:.0f} | "
             f"{summary['setup_and_startup_s'] / wall:.0%} |\n| **total** | **{wall:.0f}** ({wall / 60:.1f} min) | |")
    notes = (f"Budget 15 min: {'met' if summary['within_budget'] else 'NOT met'}. Backfill: {backfill['rows']} "
             f"rationales for {backfill['users']} users at {backfill['generation_tokens_per_s']:.1f} tokens/s inside the vLLM calls (engine load, Ray start and encoding excluded). "
             f"Teacher answers taken from a response cache: {summary['teacher_answers_from_cache']} of {results['teach']['result']['rows']}. "
             f"Base vs SLIM test NDCG@10 at demo budgets: {compared['base']:.4f} vs {compared['slim']:.4f}. "
             "Caches in ~/.cache/slim-ray (offline teacher GGUF + llama.cpp wheel, converted student) "
             f"{'were warm' if warm else 'were NOT all warm: this includes one-time set-up'} before the run; "
             "a first run on a fresh machine also fetches the teacher and compiles llama.cpp (README). fp32 matmul "
             f"peak of this machine (2 threads), measured before the run: {peak:.0f} GFLOPS.")
    publish("demo", "End-to-end demo wall time (README run command, ML-100k)", {"summary": summary}, table, notes)


if __name__ == "__main__":
    main()
