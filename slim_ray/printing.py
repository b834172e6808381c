"""Rich tables and lines for each stage's result, shared by the stage commands and the pipeline."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

console = Console()


def print_stats(stats: dict) -> None:
    table = Table(title=f"Dataset statistics ({stats['domain']})")
    table.add_column("")
    table.add_column("before filtering", justify="right")
    table.add_column("after filtering", justify="right")
    before, after = stats["before_filtering"], stats["after_filtering"]
    for key in ("users", "items", "interactions"):
        table.add_row(key, f"{before[key]:,}", f"{after[key]:,}")
    table.add_row("density", f"{before['density']:.4%}", f"{after['density']:.4%}")
    table.add_row("avg sequence length", "", f"{after['avg_seq_len']:.1f}")
    console.print(table)


def print_eval(report: dict) -> None:
    negatives = report["protocol"]["negatives"]
    masking = "masks" if report["protocol"]["full_ranking_masks_history"] else "does not mask"
    table = Table(title=f"{report.get('model', report['backbone'])} on {report['split']} ({report['users']} users; full ranking "
                  f"{masking} history items)")
    table.add_column("protocol")
    for metric in ("hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20", "mrr@10"):
        table.add_column(metric.upper(), justify="right")
    cold = report["cold"]
    rows = [("full ranking", report["full"]), (f"sampled {negatives} negatives", report[f"sampled{negatives}"]),
            (f"cold items ({cold['users']} users)", cold)]
    for name, values in rows:
        table.add_row(name, *(f"{values[m]:.4f}" if m in values else "-" for m in
                              ("hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20", "mrr@10")))
    console.print(table)
    console.print(f"popularity bias (full ranking): EFD@10 {report['full']['efd@10']:.4f}  "
                  f"EPC@10 {report['full']['epc@10']:.4f}")


def print_ledger(ledger: dict) -> None:
    table = Table(title=f"Teacher ledger ({ledger['model']})")
    table.add_column("")
    table.add_column("value", justify="right")
    for key in ("rows", "rationales", "failures", "from_cache", "requests", "retries", "prompt_tokens",
                "completion_tokens", "truncated", "flagged_history_item", "flagged_unknown_item"):
        table.add_row(key.replace("_", " "), f"{ledger[key]:,}")
    table.add_row("parse rate (3 steps)", f"{ledger['parse_rate']:.1%}")
    table.add_row("estimated cost", f"${ledger['estimated_cost_usd']:.4f}")
    table.add_row("rationales / min (fresh calls)", f"{ledger['rationales_per_min']:.2f}")
    table.add_row("wall time", f"{ledger['wall_s']:.0f} s")
    table.add_row("step-3 candidates", ledger.get("candidates", "popular"))  # older ledgers: popular
    console.print(table)
    for label, key in (("failures", "failures_by_reason"), ("retries", "retries_by_reason")):
        if ledger[key]:
            console.print(f"{label} by reason: " + ", ".join(f"{k} {v}" for k, v in ledger[key].items()))


def print_folds(result: dict) -> None:
    for name, meta in result["models"].items():
        console.print(f"{name}: best epoch {meta['best_epoch']} (valid NDCG@10 {meta['valid_ndcg@10']:.4f})")


def print_distill(meta: dict) -> None:
    if meta.get("cross_fit"):  # one student per fold, each trained without that fold's users
        for fold, student in meta["students"].items():
            console.print(f"student without fold {fold}:")
            print_distill(student)
        return
    table = Table(title=f"Distillation ({meta['train_rows']} rationales, {meta['train_users']} users)")
    for column in ("epoch", "train loss", "valid loss", "epoch s"):
        table.add_column(column, justify="right")
    for h in meta["history"]:
        table.add_row(str(h["epoch"]), f"{h['train_loss']:.4f}", f"{h['valid_loss']:.4f}", f"{h['epoch_s']:.0f}")
    console.print(table)
    console.print(f"best epoch {meta['best_epoch']} (valid loss {meta['valid_loss']:.4f})")


def quality_caption(report: dict) -> str:
    if "margin95" not in report:  # a report written before the margin was recorded
        return ""
    note = "a smoke check, not a measurement (bench/rationales.py measures it)" if report["smoke_check"] else "measured"
    return f"shares ±{report['margin95']:.2f} at 95% by chance alone: {note}"


def print_quality(report: dict) -> None:
    table = Table(title=f"Rationale quality on {report['teacher']['users']} held-out users", caption=quality_caption(report))
    table.add_column("")
    for column in ("format valid", "category hit", "grounding", "off list"):
        table.add_column(column, justify="right")
    for name in ("teacher", "untuned", "tuned"):
        r = report[name]
        table.add_row(name, f"{r['format_valid']:.3f}", f"{r['category_hit']:.3f}", f"{r['grounding']:.3f}",
                      f"{r['off_list']:.3f}")
    console.print(table)


def print_backfill(manifest: dict) -> None:
    students = ", ".join(manifest["model_versions"].values())
    table = Table(title=f"Backfill ({manifest['engine']}, student{'s' if len(manifest['model_versions']) > 1 else ''} {students})")
    for column in ("rows", "users", "generated", "from cache", "reused", "items encoded", "parse rate",
                   "generation tok/s"):
        table.add_column(column, justify="right")
    speed = f"{manifest['generation_tokens_per_s']:.1f}" if manifest["generation_tokens_per_s"] else "-"
    table.add_row(*(str(manifest[k]) for k in ("rows", "users", "generated", "from_cache", "reused",
                                                "items_encoded")), f"{manifest['parse_rate']:.1%}", speed)
    console.print(table)
    console.print(f"LanceDB {manifest['lancedb']['uri']}: table versions {manifest['lancedb']['versions']}")


def print_compare(result: dict) -> None:
    table = Table(title=f"{result['base_model']} vs {result['slim_model']} (test, full ranking)")
    for column in ("metric", "base", "SLIM", "relative gain"):
        table.add_column(column, justify="right")
    for metric, r in result["metrics"].items():
        gain = f"{r['gain']:+.1%}" if r["gain"] is not None else "-"
        table.add_row(metric.upper(), f"{r['base']:.4f}", f"{r['slim']:.4f}", gain)
    console.print(table)


def print_trained(meta: dict) -> None:
    console.print(f"{meta['name']}: best epoch {meta['best_epoch']} of {meta['epochs_run']} "
                  f"(valid NDCG@10 {meta['valid_ndcg@10']:.4f})")


def print_index(manifest: dict) -> None:
    console.print(f"Serving bundle v{manifest['version']} of {manifest['model']}: {manifest['items']} items "
                  f"({manifest['search']} search), {manifest['users']} known users, rationales "
                  f"{'none' if manifest['rationales'] is None else 'table version ' + str(manifest['rationales']['version'])}")


def print_exchanges(exchanges: dict) -> None:
    for name, exchange in exchanges.items():
        console.print(f"[bold]{name}[/]: POST /v1/recommend {json.dumps(exchange['request'])} -> {exchange['status']}")
        console.print_json(json.dumps(exchange["response"]))
