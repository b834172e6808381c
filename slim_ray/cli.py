"""`slim-ray` command line: one sub-command per pipeline stage, all sharing one config.

Every command takes `--config FILE` (YAML) and repeatable `--set section.key=value` overrides;
stage-specific flags are shortcuts for the most used overrides.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console

from slim_ray.config import Config, load_config
from slim_ray.errors import ConfigError, SlimRayError
from slim_ray.printing import (console, print_backfill, print_compare, print_distill, print_eval, print_exchanges,
                               print_folds, print_index, print_ledger, print_quality, print_stats, print_trained)

app = typer.Typer(
    help="SLIM on Ray: distil LLM rationales into a small LM and fuse them into sequential "
    "recommenders. Stages: prepare -> teach -> distill -> backfill -> train -> serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

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


BackboneOpt = typer.Option(None, help="SASRec | GRU4Rec | SRGNN (train.backbone).")
FusionOpt = typer.Option(None, help="none | text | slim | text_match | dllm2rec | slim+dllm2rec "
                         "(train.fusion; all but none "
                         "need `slim-ray backfill` first).")
RationaleOpt = typer.Option(None, help="all | step1 | step2 | step3: rationale vector used by fusion "
                            "(train.rationale).")


@app.command()
def train(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
    backbone: Optional[str] = BackboneOpt,
    fusion: Optional[str] = FusionOpt,
    rationale: Optional[str] = RationaleOpt,
    strategy: Optional[str] = typer.Option(None, help="ddp | deepspeed (train.strategy)."),
    zero_stage: Optional[int] = typer.Option(None, help="DeepSpeed ZeRO stage 1-3 (train.zero_stage)."),
    num_workers: Optional[int] = typer.Option(None, help="Ray Train workers (train.num_workers)."),
    epochs: Optional[int] = typer.Option(None, help="Maximum epochs (train.epochs)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint of the "
                                "previous run instead of starting over."),
) -> None:
    """Train a sequential backbone with Ray Train; keep the best-validation model; evaluate on test."""
    from slim_ray.train import run_evaluate, run_train

    def action() -> None:
        cfg = _config(config, overrides, **{
            "train.backbone": backbone, "train.fusion": fusion, "train.rationale": rationale,
            "train.strategy": strategy, "train.zero_stage": zero_stage,
            "train.num_workers": num_workers, "train.epochs": epochs})
        meta = run_train(cfg, resume=resume)
        console.print(f"best epoch {meta['best_epoch']} (valid NDCG@10 {meta['valid_ndcg@10']:.4f}); "
                      f"model in [bold]{cfg.model_dir()}[/]")
        print_eval(run_evaluate(cfg))

    _guard(action)


@app.command("train-folds")
def train_folds(config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = SetOpt) -> None:
    """Cross-fitted backbones (one per data.folds fold, each without that fold's users): they pick the
    step-3 candidates of the teacher's and the student's prompts (teacher.candidates=backbone)."""
    from slim_ray.train import run_train_folds

    def action() -> None:
        cfg = _config(config, overrides)
        print_folds(run_train_folds(cfg))

    _guard(action)


@app.command()
def evaluate(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
    backbone: Optional[str] = BackboneOpt,
    fusion: Optional[str] = FusionOpt,
    rationale: Optional[str] = RationaleOpt,
    split: str = typer.Option("test", help="valid | test."),
    mask_history: bool = typer.Option(True, help="Full ranking excludes the user's history items "
                                      "(--no-mask-history: RecBole's protocol for sequential models)."),
) -> None:
    """Leave-one-out evaluation of a trained backbone: full ranking and sampled negatives."""
    from slim_ray.train import run_evaluate

    def action() -> None:
        if split not in ("valid", "test"):
            raise ConfigError(f"--split must be valid or test, got {split!r}")
        cfg = _config(config, overrides, **{"train.backbone": backbone, "train.fusion": fusion,
                                            "train.rationale": rationale})
        print_eval(run_evaluate(cfg, split=split, mask_history=mask_history))

    _guard(action)


@app.command()
def teach(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
    num_samples: Optional[int] = typer.Option(None, help="Users to sample (teacher.num_samples; paper: 1000)."),
    base_url: Optional[str] = typer.Option(None, help="OpenAI-compatible endpoint (teacher.base_url)."),
    model: Optional[str] = typer.Option(None, help="Model name at that endpoint (teacher.model)."),
) -> None:
    """Teacher rationales (3-step CoT) for sampled users via an OpenAI-compatible API on Ray Data.

    The API key is read from the env var named by teacher.api_key_env (OPENAI_API_KEY). With the
    default loopback base_url and nothing listening, the offline llama.cpp teacher is started.
    Re-running resumes: cached responses are never requested again.
    """
    from slim_ray.teach import run_teach

    def action() -> None:
        cfg = _config(config, overrides, **{"teacher.num_samples": num_samples, "teacher.base_url": base_url,
                                            "teacher.model": model})
        print_ledger(run_teach(cfg))
        console.print(f"rationales in [bold]{cfg.run.output_dir / 'teacher'}[/]")

    _guard(action)


@app.command("teacher-server")
def teacher_server(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
    port: int = typer.Option(8011, help="Port to listen on."),
    host: str = typer.Option("127.0.0.1", help="Interface: 0.0.0.0 serves every node of a cluster (it prints "
                             "the URL to set as teacher.base_url)."),
) -> None:
    """Serve the offline teacher (Qwen2.5-Coder-1.5B-Instruct GGUF, llama.cpp) until Ctrl-C."""
    from slim_ray.teacher_server import local_teacher

    def action() -> None:
        tc = _config(config, overrides).teacher
        with local_teacher(tc.model, port, tc.server_threads, tc.server_ctx, host=host) as url:
            console.print(f"teacher '{tc.model}' serving at [bold]{url}[/] (Ctrl-C to stop)")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass

    _guard(action)


@app.command()
def distill(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
    rationales: Optional[Path] = typer.Option(None, help="Teacher rationales: Parquet file or teacher "
                                              "folder (distill.rationales; default RUN_DIR/teacher)."),
    base_model: Optional[str] = typer.Option(None, help="Student base: smollm2-135m, an HF folder or a "
                                             "hub id (distill.base_model)."),
    strategy: Optional[str] = typer.Option(None, help="deepspeed | ddp (distill.strategy)."),
    zero_stage: Optional[int] = typer.Option(None, help="ZeRO stage 1-3 (distill.zero_stage)."),
    num_workers: Optional[int] = typer.Option(None, help="Ray Train workers (distill.num_workers)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs (distill.epochs)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint."),
) -> None:
    """LoRA-distil the student on (simplified prompt -> teacher rationale) with Ray Train + DeepSpeed."""
    from slim_ray.distill import run_distill

    def action() -> None:
        cfg = _config(config, overrides, **{
            "distill.rationales": rationales, "distill.base_model": base_model, "distill.strategy": strategy,
            "distill.zero_stage": zero_stage, "distill.num_workers": num_workers, "distill.epochs": epochs})
        print_distill(run_distill(cfg, resume=resume))
        console.print(f"student (adapter + merged model) in [bold]{cfg.run.output_dir / 'student'}[/]")

    _guard(action)


@app.command("evaluate-rationales")
def evaluate_rationales(config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = SetOpt) -> None:
    """Teacher vs untuned vs tuned student on held-out users: format, step-2 category hit, grounding."""
    from slim_ray.rationale_quality import run_evaluate_rationales

    _guard(lambda: print_quality(run_evaluate_rationales(_config(config, overrides))))


@app.command()
def backfill(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
    engine: Optional[str] = typer.Option(None, help="vllm | hf (backfill.engine)."),
    student: Optional[Path] = typer.Option(None, help="Student HF folder (backfill.student; default "
                                           "the distilled RUN_DIR/student[/fold{k}]/merged)."),
    num_actors: Optional[int] = typer.Option(None, help="Student actors (backfill.num_actors)."),
) -> None:
    """Student rationales for every user prefix + text vectors -> Parquet and LanceDB (incremental)."""
    from slim_ray.backfill import run_backfill

    def action() -> None:
        cfg = _config(config, overrides, **{"backfill.engine": engine, "backfill.student": student,
                                            "backfill.num_actors": num_actors})
        print_backfill(run_backfill(cfg))

    _guard(action)


@app.command()
def index(config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = SetOpt,
          backbone: Optional[str] = BackboneOpt, fusion: Optional[str] = FusionOpt) -> None:
    """Publish a trained model for serving: weights, item and known-user vectors (LanceDB) and the
    backfill's rationale table version, as one new bundle version."""
    from slim_ray.serve import publish_bundle

    _guard(lambda: print_index(publish_bundle(_config(config, overrides, **{"train.backbone": backbone,
                                                                          "train.fusion": fusion}))))


@app.command()
def pipeline(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
    fresh: bool = typer.Option(False, help="Ignore RUN_DIR/manifest.json and run every stage."),
    from_stage: Optional[str] = typer.Option(None, "--from", help="Re-run this stage and every later one."),
) -> None:
    """Run every stage end to end on one config (the README's run command); stages whose config and
    inputs are unchanged since a finished run are skipped. Ends with RUN_DIR/report/report.md."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from slim_ray.pipeline import run_pipeline
    from slim_ray.report import write_report

    printers = {"prepare": print_stats, "evaluate": print_eval, "teach": print_ledger, "distill": print_distill,
                "evaluate-rationales": print_quality, "backfill": print_backfill, "evaluate-slim": print_eval,
                "compare": print_compare, "index": print_index, "serve-demo": print_exchanges,
                "train": print_trained, "train-slim": print_trained, "train-folds": print_folds}
    bars = Progress(SpinnerColumn(finished_text="[green]✓"), TextColumn("{task.description:<28}"),
                    BarColumn(), TimeElapsedColumn(), console=console)
    tasks: dict[str, int] = {}

    def progress(stage: str, event: str) -> None:
        if event == "start":
            console.rule(f"[bold]{stage}")
            tasks[stage] = bars.add_task(stage, total=1)
        elif event == "done":
            bars.update(tasks[stage], completed=1)
            bars.stop_task(tasks[stage])
        else:  # skipped: up to date in RUN_DIR/manifest.json
            bars.stop_task(bars.add_task(f"{stage} (up to date)", total=1, completed=1))

    def action() -> None:
        cfg = _config(config, overrides)
        with bars:
            manifest = run_pipeline(cfg, lambda stage, result: printers[stage](result), progress,
                                    fresh=fresh, from_stage=from_stage)
        walls = {name: 0.0 if s["skipped"] else s["wall_s"] for name, s in manifest["stages"].items()}
        console.print("stage wall times: " + ", ".join(f"{k} {v:.1f}s" for k, v in walls.items()), soft_wrap=True)
        console.print(f"outputs under [bold]{cfg.run.output_dir}[/], report: [bold]{write_report(cfg.run.output_dir)}",
                      soft_wrap=True)

    _guard(action)


@app.command("show-config")
def show_config(config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = SetOpt) -> None:
    """Print the fully resolved config (defaults + file + overrides) as YAML."""
    from slim_ray.config import dump_config

    _guard(lambda: sys.stdout.write(dump_config(_config(config, overrides))))


if __name__ == "__main__":
    app()
