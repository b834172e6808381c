"""`slim-ray` command line: one sub-command per pipeline stage, all sharing one config.

Every command takes `--config FILE` (YAML), repeatable `--set section.key=value` overrides, and one
`--section.key VALUE` option per field of the config sections it reads, generated from the config
model (`config_options`): help text from the field descriptions, values parsed as YAML like --set.
"""

from __future__ import annotations

import functools
import inspect
import sys
import time
import typing
from pathlib import Path
from typing import Callable, Iterator, List, Literal, Optional

import typer
from pydantic import BaseModel
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


def config_fields(model: type[BaseModel], prefix: str) -> Iterator[tuple[str, object]]:
    """(dotted key, pydantic field) for every leaf field of a config section, nested sections included."""
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from config_fields(field.annotation, f"{prefix}.{name}")
        else:
            yield f"{prefix}.{name}", field


def _field_help(field) -> str:
    choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is Literal else ()
    default = field.get_default(call_default_factory=True)
    return " ".join(part for part in (field.description or "", f"One of {' | '.join(map(str, choices))}." if choices else "",
                                      f"Default: {default}.") if part)


def config_options(*sections: str):
    """Give a command one `--section.key` option per field of `sections` (ALL: every section); the
    values given reach the command as `--set` overrides, after those (flags take precedence)."""
    sections = tuple(Config.model_fields) if sections == ("ALL",) else sections

    def wrap(fn):
        hints = typing.get_type_hints(fn)
        params = [p.replace(annotation=hints[p.name]) for p in inspect.signature(fn).parameters.values()]
        generated = {}
        for section in sections:
            for key, field in config_fields(Config.model_fields[section].annotation, section):
                name = key.replace(".", "__")
                generated[name] = key
                params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                                                default=typer.Option(None, f"--{key}", help=_field_help(field), metavar="VALUE",
                                                                     rich_help_panel=f"Config: {section}")))

        @functools.wraps(fn)
        def command(**kwargs):
            flags = [f"{key}={kwargs.pop(name)}" for name, key in generated.items() if kwargs.get(name) is not None]
            for name in generated:
                kwargs.pop(name, None)
            return fn(**{**kwargs, "overrides": list(kwargs.get("overrides") or []) + flags})

        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command
    return wrap


def _config(config: Optional[Path], overrides: Optional[List[str]]) -> Config:
    """Config file, then --set overrides, then --section.key flags (highest precedence)."""
    return load_config(config, list(overrides or []))


def _guard(action: Callable[[], None]) -> None:
    """User errors become one line on stderr and exit status 2; bugs keep their traceback."""
    try:
        action()
    except SlimRayError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


@app.command()
@config_options("run", "data")
def prepare(config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = SetOpt) -> None:
    """Read raw interactions + item metadata, filter, split leave-one-out, write Parquet + stats.
    With neither --data.interactions nor --data.items and --data.format recbole: the ML-100k copy in
    the recbole package."""
    from slim_ray.prepare import run_prepare

    def action() -> None:
        cfg = _config(config, overrides)
        stats = run_prepare(cfg.data, cfg.prepared_dir)
        print_stats(stats)
        console.print(f"prepared dataset written to [bold]{cfg.prepared_dir}[/]")

    _guard(action)


ResumeOpt = typer.Option(False, "--resume", help="Continue from the latest checkpoint of the previous run "
                         "instead of starting over.")


@app.command()
@config_options("run", "train", "ray")
def train(config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = SetOpt,
          resume: bool = ResumeOpt) -> None:
    """Train a sequential backbone with Ray Train; keep the best-validation model; evaluate on test.
    Fusion variants (--train.fusion slim, ...) need `slim-ray backfill` first."""
    from slim_ray.train import run_evaluate, run_train

    def action() -> None:
        cfg = _config(config, overrides)
        meta = run_train(cfg, resume=resume)
        console.print(f"best epoch {meta['best_epoch']} (valid NDCG@10 {meta['valid_ndcg@10']:.4f}); "
                      f"model in [bold]{cfg.model_dir()}[/]")
        print_eval(run_evaluate(cfg))

    _guard(action)


@app.command("train-folds")
@config_options("run", "data", "train", "ray")
def train_folds(config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = SetOpt) -> None:
    """Cross-fitted backbones (one per data.folds fold, each without that fold's users): they pick the
    step-3 candidates of the teacher's and the student's prompts (teacher.candidates=backbone)."""
    from slim_ray.train import run_train_folds

    def action() -> None:
        cfg = _config(config, overrides)
        print_folds(run_train_folds(cfg))

    _guard(action)


@app.command()
@config_options("run", "train")
def evaluate(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
    split: str = typer.Option("test", help="valid | test."),
    mask_history: bool = typer.Option(True, help="Full ranking excludes the user's history items "
                                      "(--no-mask-history: RecBole's protocol for sequential models)."),
) -> None:
    """Leave-one-out evaluation of a trained backbone: full ranking and sampled negatives."""
    from slim_ray.train import run_evaluate

    def action() -> None:
        if split not in ("valid", "test"):
            raise ConfigError(f"--split must be valid or test, got {split!r}")
        print_eval(run_evaluate(_config(config, overrides), split=split, mask_history=mask_history))

    _guard(action)


@app.command()
@config_options("run", "data", "teacher", "ray")
def teach(config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = SetOpt) -> None:
    """Teacher rationales (3-step CoT) for sampled users via an OpenAI-compatible API on Ray Data.

    The API key is read from the env var named by teacher.api_key_env (OPENAI_API_KEY). With the
    default loopback base_url and nothing listening, the offline llama.cpp teacher is started.
    Re-running resumes: cached responses are never requested again.
    """
    from slim_ray.teach import run_teach

    def action() -> None:
        cfg = _config(config, overrides)
        print_ledger(run_teach(cfg))
        console.print(f"rationales in [bold]{cfg.run.output_dir / 'teacher'}[/]")

    _guard(action)


@app.command("teacher-server")
@config_options("teacher")
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
        with local_teacher(tc.model, port, tc.server_threads, tc.server_ctx, host=host,
                           command=tc.server_command) as url:
            console.print(f"teacher '{tc.model}' serving at [bold]{url}[/] (Ctrl-C to stop)")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass

    _guard(action)


@app.command()
@config_options("run", "data", "distill", "ray")
def distill(config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = SetOpt,
            resume: bool = ResumeOpt) -> None:
    """LoRA-distil the student on (simplified prompt -> teacher rationale) with Ray Train + DeepSpeed."""
    from slim_ray.distill import run_distill

    def action() -> None:
        cfg = _config(config, overrides)
        print_distill(run_distill(cfg, resume=resume))
        console.print(f"student (adapter + merged model) in [bold]{cfg.run.output_dir / 'student'}[/]")

    _guard(action)


@app.command("evaluate-rationales")
@config_options("run", "distill", "backfill")
def evaluate_rationales(config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = SetOpt) -> None:
    """Teacher vs untuned vs tuned student on held-out users: format, step-2 category hit, grounding."""
    from slim_ray.rationale_quality import run_evaluate_rationales

    _guard(lambda: print_quality(run_evaluate_rationales(_config(config, overrides))))


@app.command()
@config_options("run", "data", "backfill", "ray")
def backfill(config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = SetOpt) -> None:
    """Student rationales for every user prefix + text vectors -> Parquet and LanceDB (incremental)."""
    from slim_ray.backfill import run_backfill

    _guard(lambda: print_backfill(run_backfill(_config(config, overrides))))


@app.command()
@config_options("run", "train", "serve")
def index(config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = SetOpt) -> None:
    """Publish a trained model for serving: weights, item and known-user vectors (LanceDB) and the
    backfill's rationale table version, as one new bundle version."""
    from slim_ray.serve import publish_bundle

    _guard(lambda: print_index(publish_bundle(_config(config, overrides))))


@app.command()
@config_options("ALL")
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
@config_options("ALL")
def show_config(config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = SetOpt) -> None:
    """Print the fully resolved config (defaults + file + overrides) as YAML."""
    from slim_ray.config import dump_config

    _guard(lambda: sys.stdout.write(dump_config(_config(config, overrides))))


if __name__ == "__main__":
    app()
