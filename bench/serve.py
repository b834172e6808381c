"""Recommend-and-explain under load on loopback, and LanceDB ANN vs exact search.

  python bench/serve.py --run-dir runs/ml100k                  # after the demo (model + backfill + student)
  python bench/serve.py --run-dir runs/ml100k --concurrency 16 --seconds 30

1. Cached path: POST /v1/recommend {user_id, k: 10} for known users (backfilled rationale), a fixed
   number of requests in flight (async httpx) for a fixed time: QPS, p50/p95/p99, errors.
2. Fresh path: raw histories, so the student writes a rationale per request (bounded: --fresh-requests).
3. ANN: recall@10 of the LanceDB index (IVF_HNSW_SQ, dot) against exact search on the same table, for
   the model's user vectors of every user; latency per query against numpy brute force.
Writes bench/results/serve.json and a BENCHMARKS.md section.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, publish  # noqa: E402

from slim_ray.config import load_config  # noqa: E402
from slim_ray.storage import load_prepared  # noqa: E402


async def load(url: str, bodies: list[dict], concurrency: int, seconds: float | None, limit: int | None) -> dict:
    import httpx

    latencies, errors, sent = [], 0, 0
    hops: dict[str, list[float]] = {}  # the server's own per-hop timings, from each response
    deadline = time.perf_counter() + seconds if seconds else None

    async def worker(client):
        nonlocal errors, sent
        while (deadline is None or time.perf_counter() < deadline) and (limit is None or sent < limit):
            body = bodies[sent % len(bodies)]
            sent += 1
            start = time.perf_counter()
            try:
                response = await client.post("/v1/recommend", json=body)
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - start)
            errors += not ok
            if ok:
                reply = response.json()
                for hop, value in {**reply["timings_ms"], "ingress": reply["latency_ms"]}.items():
                    hops.setdefault(hop, []).append(value)
                hops.setdefault("client", []).append(latencies[-1] * 1000)

    start, cpu = time.perf_counter(), time.process_time()
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    ms = np.asarray(latencies) * 1000
    return {"requests": len(latencies), "errors": int(errors), "qps": len(latencies) / wall, "concurrency": concurrency,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "wall_s": wall,
            "load_generator_cpu_share": cpu / wall / (os.cpu_count() or 1),
            "hop_p50_ms": {hop: float(np.median(values)) for hop, values in hops.items()}}


def in_process(cfg, bodies: list[dict]) -> dict:
    """The same request flow with plain calls (no HTTP, no Serve hops): the ceiling of one process."""
    from slim_ray.serve import IndexCore, RecommenderCore, recommend

    core, index = RecommenderCore(cfg), IndexCore(str(cfg.run.output_dir / "lancedb"))

    async def search(vector, k, exclude):
        return index.search(vector, k, exclude)

    async def no_student(history):
        raise RuntimeError("the cached path never calls the student")

    async def run() -> list[dict]:
        return [await recommend(core, no_student, search, body["user_id"], None, body["k"], True, True) for body in bodies]

    start = time.perf_counter()
    replies = asyncio.run(run())
    wall = time.perf_counter() - start
    hops = {hop: float(np.median([r["timings_ms"][hop] for r in replies])) for hop in replies[0]["timings_ms"]}
    return {"requests": len(bodies), "ms_per_request": wall / len(bodies) * 1000, "hop_p50_ms": hops}


def ann_vs_exact(cfg, n_queries: int = 943) -> dict:
    import torch

    from slim_ray.evaluation import split_arrays
    from slim_ray.serve import IndexCore
    from slim_ray.artifacts import fusion_vectors
    from slim_ray.fusion import load_trained

    model, meta = load_trained(cfg.model_dir())
    _, sequences, _ = load_prepared(cfg.prepared_dir)
    _, user_text, _ = fusion_vectors(cfg, meta["n_items"], sequences)
    arrays = split_arrays(sequences.head(n_queries), "test", meta["max_len"],
                          None if user_text is None else user_text["test"])
    with torch.no_grad():
        users = model.user_vectors(arrays).numpy()
        items = model.item_vectors()[1:].numpy()
    index = IndexCore(str(cfg.run.output_dir / "lancedb"))
    recalls, ann_s, exact_s, numpy_s = [], 0.0, 0.0, 0.0
    for vector in users:
        t0 = time.perf_counter()
        ann = {h["item_id"] for h in index.search(vector.tolist(), 10, [])["items"]}
        t1 = time.perf_counter()
        exact = {h["item_id"] for h in index.search(vector.tolist(), 10, [], exact=True)["items"]}
        t2 = time.perf_counter()
        brute = set((np.argpartition(-(items @ vector), 10)[:10] + 1).tolist())
        t3 = time.perf_counter()
        recalls.append(len(ann & exact) / 10)
        ann_s, exact_s, numpy_s = ann_s + t1 - t0, exact_s + t2 - t1, numpy_s + t3 - t2
        assert brute == exact or len(brute & exact) >= 9, "LanceDB exact search disagrees with numpy"
    n = len(users)
    return {"queries": n, "ann_recall10": float(np.mean(recalls)), "ann_ms": ann_s / n * 1000,
            "lancedb_exact_ms": exact_s / n * 1000, "numpy_brute_force_ms": numpy_s / n * 1000, "items": len(items)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "ml100k")
    parser.add_argument("--fusion", default="slim", help="which trained variant to serve")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--fresh-requests", type=int, default=16)
    args = parser.parse_args()

    from slim_ray.serve import build_index
    from slim_ray.serve_app import free_port, serving

    cfg = load_config(ROOT / "configs" / "ml100k.yaml", [f"run.output_dir={args.run_dir}", f"train.fusion={args.fusion}"])
    build_index(cfg)
    items, sequences, _ = load_prepared(cfg.prepared_dir)
    raw = dict(zip(items["item_id"], items["raw_id"].astype(str)))
    cached = [{"user_id": str(u), "k": 10} for u in sequences["raw_user_id"]]
    fresh = [{"history": [raw[int(i)] for i in seq[-10:-3]], "k": 10} for seq in sequences["item_ids"]]
    ann = ann_vs_exact(cfg)
    plain = in_process(cfg, cached[:300])
    with serving(cfg, port=free_port()) as url:
        asyncio.run(load(url, cached, 2, 5, None))  # warm-up
        cached_run = asyncio.run(load(url, cached, args.concurrency, args.seconds, None))
        fresh_run = asyncio.run(load(url, fresh, 2, None, args.fresh_requests))
    summary = {"qps": cached_run["qps"], "p50_ms": cached_run["p50_ms"], "p99_ms": cached_run["p99_ms"],
               "errors": cached_run["errors"], "ann_recall10": ann["ann_recall10"],
               "fresh_qps": fresh_run["qps"], "fresh_p50_ms": fresh_run["p50_ms"], "fresh_errors": fresh_run["errors"]}
    lines = ["| path | concurrency | requests | QPS | p50 ms | p95 ms | p99 ms | errors |", "|---|---|---|---|---|---|---|---|"]
    for name, r in (("cached rationale", cached_run), ("fresh rationale (student)", fresh_run)):
        lines.append(f"| {name} | {r['concurrency']} | {r['requests']} | **{r['qps']:.1f}** | {r['p50_ms']:.1f} | "
                     f"{r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} |")
    hops = cached_run["hop_p50_ms"]
    lines += ["", "Where a cached-path request's time goes (medians under the load above, ms):", "",
              "| client round trip | HTTP proxy + FastAPI + client (rest) | in the ingress replica | resolve | "
              "user vector (model forward) | index call (Serve handle hop) | LanceDB search in it |",
              "|---|---|---|---|---|---|---|",
              f"| {hops['client']:.1f} | {hops['client'] - hops['ingress']:.1f} | {hops['ingress']:.1f} | "
              f"{hops['resolve']:.2f} | {hops['user_vector']:.2f} | {hops['search']:.1f} | {hops['index']:.1f} |", "",
              f"Same flow in one process without HTTP or Serve (plain calls, {plain['requests']} requests one at a "
              f"time): {plain['ms_per_request']:.1f} ms per request (LanceDB search {plain['hop_p50_ms']['index']:.1f} "
              f"ms, user vector {plain['hop_p50_ms']['user_vector']:.2f} ms). The load generator itself used "
              f"{cached_run['load_generator_cpu_share']:.0%} of the machine's CPU during the cached run."]
    notes = (f"Ray Serve on 127.0.0.1 (ingress + recommender, LanceDB ItemIndex, HF student), load generator in "
             f"the same 2-core machine. ANN: recall@10 {ann['ann_recall10']:.3f} vs exact search over "
             f"{ann['items']} items for {ann['queries']} user vectors; per query {ann['ann_ms']:.2f} ms (index) vs "
             f"{ann['lancedb_exact_ms']:.2f} ms (LanceDB flat) vs {ann['numpy_brute_force_ms']:.3f} ms (numpy).")
    publish("serve", "Serving: recommend-and-explain under load (loopback)",
            {"summary": summary, "cached": cached_run, "fresh": fresh_run, "ann": ann, "in_process": plain}, "\n".join(lines), notes)


if __name__ == "__main__":
    main()
