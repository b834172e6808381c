"""The pipeline's report: RUN_DIR/report/report.md plus PNG plots, built from RUN_DIR/manifest.json alone.

Plots: test metrics per variant (base vs SLIM, full ranking and sampled-100), training curves (train
loss and validation NDCG@10 per epoch of both backbones, the student's train/valid loss), rationale
quality (teacher vs untuned vs tuned student). Sections whose stage has not run are left out.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on cluster nodes or CI
import matplotlib.pyplot as plt  # noqa: E402

from slim_ray.pipeline import read_manifest  # noqa: E402
from slim_ray.printing import quality_caption  # noqa: E402

BAR_METRICS = ("hr@10", "ndcg@10", "hr@20", "ndcg@20", "mrr@10")
QUALITY = ("format_valid", "category_hit", "grounding")


def _results(manifest: dict) -> dict[str, dict]:
    return {name: entry["result"] for name, entry in manifest.get("stages", {}).items() if "result" in entry}


def _bars(ax, groups: dict[str, dict[str, float]], keys: tuple[str, ...], title: str) -> None:
    width = 0.8 / max(len(groups), 1)
    for i, (label, values) in enumerate(groups.items()):
        xs = [k + i * width for k in range(len(keys))]
        ax.bar(xs, [values.get(key, 0.0) for key in keys], width, label=label)
    ax.set_xticks([k + width * (len(groups) - 1) / 2 for k in range(len(keys))], [k.upper() for k in keys])
    ax.set_title(title)
    ax.legend()


def plot_metrics(results: dict, path: Path) -> bool:
    variants = {results[s]["model"]: results[s] for s in ("evaluate", "evaluate-slim") if s in results}
    if not variants:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    _bars(axes[0], {n: r["full"] for n, r in variants.items()}, BAR_METRICS, "test, full ranking (seen masked)")
    sampled = next(key for key in next(iter(variants.values())) if key.startswith("sampled"))  # sampled<N>
    _bars(axes[1], {n: r[sampled] for n, r in variants.items()}, BAR_METRICS, f"test, {sampled[7:]} sampled negatives")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_curves(results: dict, path: Path) -> bool:
    runs = {results[s]["name"]: results[s]["history"] for s in ("train", "train-slim") if s in results}
    distill = results.get("distill", {})
    # cross-fitted: the first fold's student stands for the curve (each fold's is in the manifest)
    student = (next(iter(distill["students"].values())) if distill.get("cross_fit") else distill).get("history")
    if not runs and not student:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, history in runs.items():
        epochs = [h["epoch"] for h in history]
        axes[0].plot(epochs, [h["train_loss"] for h in history], marker="o", label=name)
        axes[1].plot(epochs, [h["valid_ndcg@10"] for h in history], marker="o", label=name)
    axes[0].set_title("backbone train loss")
    axes[1].set_title("backbone valid NDCG@10 (model selection)")
    for key in ("train_loss", "valid_loss"):
        if student and any(key in h for h in student):
            axes[2].plot([h["epoch"] for h in student], [h.get(key) for h in student], marker="o", label=key)
    axes[2].set_title("student LoRA distillation loss")
    for ax in axes:
        ax.set_xlabel("epoch")
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_quality(results: dict, path: Path) -> bool:
    quality = results.get("evaluate-rationales")
    if not quality:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    _bars(ax, {name: quality[name] for name in ("teacher", "untuned", "tuned") if name in quality}, QUALITY,
          f"rationale quality on {quality['teacher'].get('users', '?')} held-out users")
    ax.set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _table(header: list[str], rows: list[list]) -> list[str]:
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(cell(v) for v in row) + " |" for row in rows] + [""]


def write_report(run_dir: Path) -> Path:
    """Writes RUN_DIR/report/{report.md, metrics.png, curves.png, rationale_quality.png}; returns report.md."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    results = _results(manifest)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# slim-ray run report: {run_dir}", "",
             f"Started {manifest.get('started_at', '?')}, finished {manifest.get('finished_at', 'not yet')}. "
             "Versions: " + ", ".join(f"{k} {v}" for k, v in manifest.get("versions", {}).items() if v) + ".", ""]
    stages = manifest.get("stages", {})
    lines += ["## Stages", ""] + _table(["stage", "wall s", "this run"], [
        [name, f"{e.get('wall_s', 0.0):.1f}", "skipped (up to date)" if e.get("skipped") else "ran"] for name, e in stages.items()])
    if "compare" in results:
        compared = results["compare"]
        lines += [f"## {compared['base_model']} vs {compared['slim_model']} (test, full ranking)", ""] + _table(
            ["metric", "base", "SLIM", "relative gain"],
            [[m.upper(), r["base"], r["slim"], "-" if r["gain"] is None else f"{r['gain']:+.1%}"]
             for m, r in compared["metrics"].items()])
    guard = results.get("train-slim", {}).get("leak_guard")
    if guard:
        lines += [f"Leak guard: {guard['rows_with_rationale']} of {guard['training_rows']} training rows used a rationale "
                  f"(at most {guard['max_staleness']} items older than the target), {guard['violations']} violations; "
                  f"students cross-fitted: {guard['student_cross_fitted']}.", ""]
    if plot_metrics(results, out / "metrics.png"):
        lines += ["![test metrics per variant](metrics.png)", ""]
    if plot_curves(results, out / "curves.png"):
        lines += ["## Training", "", "![training curves](curves.png)", ""]
    if "evaluate-rationales" in results:
        quality = results["evaluate-rationales"]
        lines += ["## Rationale quality (held-out users)", ""] + _table(
            ["model", *QUALITY], [[n, *(quality[n][k] for k in QUALITY)] for n in ("teacher", "untuned", "tuned")
                                  if n in quality])
        caption = quality_caption(quality)
        if caption:
            lines += [caption.capitalize() + ".", ""]
        if plot_quality(results, out / "rationale_quality.png"):
            lines += ["![rationale quality](rationale_quality.png)", ""]
    if "backfill" in results:
        b = results["backfill"]
        lines += ["## Backfill", "", f"{b.get('rows')} rationales for {b.get('users')} users ({b.get('generated')} "
                  f"generated, {b.get('from_cache')} from cache, {b.get('reused')} reused), engine {b.get('engine')}, "
                  f"{b.get('generation_tokens_per_s') or 0:.1f} generated tokens/s inside the engine calls (stage wall time "
                  f"{b.get('wall_s') or 0:.0f} s with Ray start, engine load and encoding), 3-step parse rate {b.get('parse_rate') or 0:.1%}.", ""]
    if "serve-demo" in results:
        lines += ["## Served requests", ""] + _table(["request", "body", "status"], [
            [name, f"`{e['request']}`", e["status"]] for name, e in results["serve-demo"].items()])
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
