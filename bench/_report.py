"""Shared by every bench script: write results JSON and replace the bench's section in BENCHMARKS.md."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# RecBole's training protocol (one row per prefix, batch 256): the benches whose results were measured on it
# pin it, so they stay reproducible whatever objective configs/ml100k.yaml (the demo) uses.
PREFIX_OBJECTIVE = ["train.objective=prefix", "train.batch_size=256"]


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, {platform.system()} {platform.machine()}, no GPU"


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def publish(name: str, title: str, results: dict, table_md: str, notes: str = "") -> None:
    """results -> bench/results/<name>.json; a section between markers in BENCHMARKS.md."""
    context = {"command": command(), "machine": machine(),
               "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    out = ROOT / "bench" / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**results, "context": context}, indent=2) + "\n")
    section = (f"<!-- {name}:start -->\n## {title}\n\n"
               f"Command: `{context['command']}`  \nMachine: {context['machine']}  \nDate: {context['date']}\n\n"
               f"{table_md.strip()}\n\n{notes.strip()}\n<!-- {name}:end -->")
    bench_md = ROOT / "BENCHMARKS.md"
    text = bench_md.read_text() if bench_md.exists() else "# Benchmarks\n\nEvery number here comes from a script under `bench/`; raw results in `bench/results/`.\n"
    pattern = re.compile(rf"<!-- {name}:start -->.*?<!-- {name}:end -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    bench_md.write_text(text)
    print(f"wrote {out} and the '{name}' section of {bench_md}")


def matmul_peak_gflops(threads: int) -> float:
    """fp32 matmul throughput of this CPU at the engines' thread count: the compute ceiling."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ b
    return 2 * 2048**3 * reps / (time.perf_counter() - start) / 1e9
