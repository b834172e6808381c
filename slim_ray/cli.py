"""`slim-ray` command line: one sub-command per pipeline stage, all sharing one config.

Every command takes `--config FILE` (YAML) and repeatable `--set section.key=value` overrides;
stage-specific flags are shortcuts for the most used overrides.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from slim_ray.config import Config, load_config
from slim_ray.errors import SlimRayError

app = typer.Typer(
    help="SLIM on Ray: distil LLM rationales into a small LM and fuse them into sequential "
    "recommenders. Stages: prepare -> teach -> distill -> backfill -> train -> serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file (default: built-in ML-100k).")
SetOpt = typer.Option(None, "--set", "-s", help="Override a config value: section.key=value "
                      "(repeatable; value parsed as YAML), e.g. --set data.kcore=5.")


def _config(config: Optional[Path], overrides: Optional[List[str]], **flags) -> Config:
    """Config file, then --set overrides, then explicit flags (highest precedence)."""
    extra = [f"{key}={value}" for key, value in flags.items() if value is not None]
    return load_config(config, list(overrides or []) + extra)


def _guard(action: Callable[[], None]) -> None:
    """User errors become one line on stderr and exit status 2; bugs keep their traceback."""
    try:
        action()
    except SlimRayError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


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


@app.command()
def prepare(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
    format: Optional[str] = typer.Option(
        None, help="Raw format: recbole | amazon2014 | amazon2018 | amazon2023 (data.format)."),
    interactions: Optional[Path] = typer.Option(
        None, help="Interactions file: RecBole .inter or Amazon reviews (data.interactions). "
        "Omit both files with format=recbole for the ML-100k copy in the recbole package."),
    items: Optional[Path] = typer.Option(None, help="Item metadata file (data.items)."),
    rating_threshold: Optional[float] = typer.Option(
        None, help="Keep interactions with rating >= this (data.rating_threshold)."),
    kcore: Optional[int] = typer.Option(
        None, help="Iterative k-core filter; 0 disables (data.kcore)."),
    max_len: Optional[int] = typer.Option(
        None, help="Most recent items kept in each model history (data.max_len)."),
    min_seq_len: Optional[int] = typer.Option(
        None, help="Drop users with fewer interactions; >= 3 (data.min_seq_len)."),
    output_dir: Optional[Path] = typer.Option(
        None, help="Run directory; the dataset goes to OUTPUT_DIR/prepared (run.output_dir)."),
) -> None:
    """Read raw interactions + item metadata, filter, split leave-one-out, write Parquet + stats."""
    from slim_ray.prepare import run_prepare

    def action() -> None:
        cfg = _config(config, overrides, **{
            "data.format": format, "data.interactions": interactions, "data.items": items,
            "data.rating_threshold": rating_threshold, "data.kcore": kcore,
            "data.max_len": max_len, "data.min_seq_len": min_seq_len, "run.output_dir": output_dir})
        stats = run_prepare(cfg.data, cfg.prepared_dir)
        print_stats(stats)
        console.print(f"prepared dataset written to [bold]{cfg.prepared_dir}[/]")

    _guard(action)


@app.command()
def pipeline(config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = SetOpt) -> None:
    """Run every stage end to end on one config (the README's run command)."""
    from slim_ray.pipeline import run_pipeline

    def report(stage: str, result: dict) -> None:
        console.rule(f"[bold]{stage}")
        if stage == "prepare":
            print_stats(result)

    def action() -> None:
        cfg = _config(config, overrides)
        walls = run_pipeline(cfg, report)
        console.print("stage wall times: " + ", ".join(f"{k} {v:.1f}s" for k, v in walls.items()))
        console.print(f"outputs under [bold]{cfg.run.output_dir}[/]")

    _guard(action)


@app.command("show-config")
def show_config(config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = SetOpt) -> None:
    """Print the fully resolved config (defaults + file + overrides) as YAML."""
    from slim_ray.config import dump_config

    _guard(lambda: sys.stdout.write(dump_config(_config(config, overrides))))


if __name__ == "__main__":
    app()
