"""Stage `teach`: a large teacher LLM writes 3-step rationales for a seeded sample of users.

Pure core: `build_requests` (sample users, ground step 3 with candidates, render prompts, content
hashes), `annotate` (parse + grounding flags), `summarize` (the ledger). Ray wrapper: Ray Data
streams the requests through `TeacherActor`s (map_batches on an actor pool), each calling the API
through `ChatCaller` (retries, backoff, Retry-After, a rate limiter shared as a Ray actor, cache).
Every input row comes out as a rationale or as a recorded failure; rows are never dropped.
Output: RUN_DIR/teacher/{shards/*.parquet, ledger.json}, replaced atomically at the end.
"""

from __future__ import annotations

import contextlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from slim_ray.config import Config, TeacherConfig
from slim_ray.errors import DataError
from slim_ray.evaluation import item_popularity, mask_seen, split_arrays
from slim_ray.llm_api import ChatCaller, ResponseCache, TokenBucketLimiter, resolve_api_key
from slim_ray.prepare import load_prepared, write_atomic_dir
from slim_ray.prompts import (
    PROMPT_VERSION, TitleIndex, named_aspects, prompt_hash, student_messages, teacher_messages, validate,
)

_LIST_INT, _LIST_STR = pa.list_(pa.int32()), pa.list_(pa.string())
OUTPUT_SCHEMA = pa.schema([
    ("user_id", pa.int32()), ("raw_user_id", pa.string()), ("split", pa.string()),
    ("history_ids", _LIST_INT), ("seen_ids", _LIST_INT), ("candidate_ids", _LIST_INT),
    ("next_item_id", pa.int32()),
    ("teacher_messages", pa.string()), ("student_messages", pa.string()), ("cache_key", pa.string()),
    ("model", pa.string()), ("prompt_version", pa.string()),
    ("rationale", pa.string()), ("finish_reason", pa.string()), ("steps", _LIST_STR), ("parsed", pa.bool_()),
    ("flags", _LIST_STR), ("named", pa.int32()), ("in_catalogue", pa.int32()), ("in_history", pa.int32()),
    ("unknown", pa.int32()), ("named_item_ids", _LIST_INT), ("step2_aspects", _LIST_STR),
    ("prompt_tokens", pa.int32()), ("completion_tokens", pa.int32()), ("attempts", pa.int32()),
    ("retries", pa.int32()), ("retry_reasons", _LIST_STR), ("error", pa.string()),
    ("error_detail", pa.string()), ("from_cache", pa.bool_()), ("latency_s", pa.float64()),
])


def aspect_vocabulary(items: pd.DataFrame, limit: int = 30) -> list[str]:
    """Genres/categories by frequency; shown in the prompt only when the vocabulary is small."""
    counts = pd.Series([c for cats in items["categories"] for c in cats if c != "unknown"]).value_counts()
    return sorted(counts.index.tolist()) if 0 < len(counts) <= limit else []


def candidate_ids(history: set[int], popular: np.ndarray, n: int, rng: np.random.Generator,
                  preferred: list[int] = ()) -> list[int]:
    """`preferred` (e.g. a backbone's top-K) first, then popular unseen items; shuffled (seeded)."""
    picked: list[int] = []
    for item in list(preferred) + popular.tolist():
        if len(picked) == n:
            break
        if item not in history and item not in picked and item > 0:
            picked.append(int(item))
    rng.shuffle(picked)
    return picked


def build_requests(items: pd.DataFrame, sequences: pd.DataFrame, tc: TeacherConfig, domain: str,
                   seed: int, num_samples: int | None = None,
                   preferred: dict[int, list[int]] | None = None) -> pd.DataFrame:
    """One request row per sampled user: prompts over the training prefix (valid/test stay unseen)."""
    eligible = sequences[sequences["train_item_ids"].map(len) >= 2]
    n = min(num_samples or tc.num_samples, len(eligible))
    sample = eligible.sample(n=n, random_state=seed).sort_values("user_id")
    by_id = items.set_index("item_id")[["title", "categories", "brand", "year"]].to_dict("index")
    counts, _ = item_popularity(sequences["train_item_ids"], len(items) + 1)
    popular = np.argsort(-counts, kind="stable")
    vocabulary = aspect_vocabulary(items)
    params = {"model": tc.model, "max_tokens": tc.max_tokens, "temperature": tc.temperature}
    rows = []
    for user in sample.itertuples():
        train = [int(i) for i in user.train_item_ids]
        history = train[-tc.history_len:]
        # Seeded per user, so a user's prompt (and cache key) is the same whatever else is sampled.
        rng = np.random.default_rng([seed, int(user.user_id)])
        cands = candidate_ids(set(train), popular, tc.n_candidates, rng, (preferred or {}).get(user.user_id, []))
        teacher = teacher_messages([by_id[i] for i in history], [by_id[i] for i in cands], domain,
                                   tc.n_recommend, vocabulary)
        rows.append({
            "user_id": user.user_id, "raw_user_id": user.raw_user_id, "split": "train",
            "history_ids": history, "seen_ids": train, "candidate_ids": cands,
            "next_item_id": int(user.valid_target),
            "teacher_messages": json.dumps(teacher),
            "student_messages": json.dumps(student_messages([by_id[i] for i in history], domain)),
            "cache_key": prompt_hash(teacher, **params), "model": tc.model, "prompt_version": PROMPT_VERSION,
        })
    return pd.DataFrame(rows)


def annotate(row: dict, index: TitleIndex, vocabulary: list[str]) -> dict:
    """Parse the rationale into steps and flag items that are seen or not in the catalogue."""
    if row.get("rationale") is None:
        return {"steps": ["", "", ""], "parsed": False, "flags": ["failed"], "named": 0, "in_catalogue": 0,
                "in_history": 0, "unknown": 0, "named_item_ids": [], "step2_aspects": []}
    checked = validate(row["rationale"], index, set(row["seen_ids"]))  # the whole known history
    checked["step2_aspects"] = named_aspects(checked["steps"][1], vocabulary) if vocabulary else []
    checked["named_item_ids"] = checked.pop("item_ids")
    return checked


class TeacherActor:
    """Ray Data actor: calls the teacher for a batch of request rows, `concurrency` at a time."""

    def __init__(self, teacher: dict, cache_dir: str, item_ids: list[int], titles: list[str],
                 vocabulary: list[str], limiter=None):
        tc = TeacherConfig(**teacher)
        self.tc = tc
        self.caller = ChatCaller(tc.base_url, tc.model, resolve_api_key(tc.api_key_env, tc.base_url),
                                 timeout_s=tc.timeout_s, max_retries=tc.max_retries,
                                 backoff_base_s=tc.backoff_base_s, backoff_max_s=tc.backoff_max_s,
                                 cache=ResponseCache(Path(cache_dir)), limiter=limiter)
        self.pool = ThreadPoolExecutor(tc.concurrency)
        self.index, self.vocabulary = TitleIndex.from_items(item_ids, titles), vocabulary

    def _one(self, row: dict) -> dict:
        result = asdict(self.caller.call(json.loads(row["teacher_messages"]), row["cache_key"],
                                         max_tokens=self.tc.max_tokens, temperature=self.tc.temperature))
        row = {**row, **result, "rationale": result["text"]}
        return {**row, **annotate(row, self.index, self.vocabulary)}

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        rows = list(self.pool.map(self._one, batch.to_dict("records")))
        return pa.Table.from_pylist([{k: _plain(r.get(k)) for k in OUTPUT_SCHEMA.names} for r in rows],
                                    schema=OUTPUT_SCHEMA)


def _plain(value):
    return value.tolist() if isinstance(value, np.ndarray) else value


def summarize(results: pd.DataFrame, tc: TeacherConfig, wall_s: float) -> dict:
    """The ledger: requests, tokens, retries, failures by reason, cost, throughput, quality."""
    ok = results["rationale"].notna()
    fresh = ~results["from_cache"]
    retry_reasons = pd.Series([r for rs in results["retry_reasons"] for r in rs], dtype=object)
    prompt_tokens = int(results.loc[fresh, "prompt_tokens"].sum())
    completion_tokens = int(results.loc[fresh, "completion_tokens"].sum())
    return {
        "rows": int(len(results)), "rationales": int(ok.sum()), "failures": int((~ok).sum()),
        "failures_by_reason": results.loc[~ok, "error"].value_counts().to_dict(),
        "from_cache": int(results["from_cache"].sum()),
        "requests": int(results["attempts"].sum()), "retries": int(results["retries"].sum()),
        "retries_by_reason": retry_reasons.value_counts().to_dict(),
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "estimated_cost_usd": prompt_tokens / 1000 * tc.price_prompt_per_1k
        + completion_tokens / 1000 * tc.price_completion_per_1k,
        "parse_rate": float(results.loc[ok, "parsed"].mean()) if ok.any() else 0.0,
        "truncated": int((results["finish_reason"] == "length").sum()),
        "flagged_history_item": int(results["flags"].map(lambda f: "history_item" in f).sum()),
        "flagged_unknown_item": int(results["flags"].map(lambda f: "unknown_item" in f).sum()),
        "wall_s": wall_s,
        "rationales_per_min": float(ok[fresh].sum() / wall_s * 60) if wall_s > 0 else 0.0,
        "model": tc.model, "base_url": tc.base_url, "prompt_version": PROMPT_VERSION,
        "candidates": tc.candidates,
    }


def top_unseen(model, sequences: pd.DataFrame, max_len: int, k: int) -> dict[int, list[int]]:
    """Each user's k best-scored items after the training prefix, history excluded, best first."""
    arrays = split_arrays(sequences, "valid", max_len)  # input = training prefix; valid/test stay unseen
    with torch.no_grad():
        scores = model.full_sort_predict(arrays)
    top = mask_seen(scores, arrays["history"]).topk(k, dim=1).indices.tolist()
    return dict(zip(sequences["user_id"].tolist(), top))


def backbone_preferences(cfg: Config, sequences: pd.DataFrame) -> dict[int, list[int]]:
    """teacher.candidates=backbone: the trained base backbone's top unseen items per user."""
    from slim_ray.train import load_trained

    tc = cfg.teacher
    if tc.candidates == "popular":
        return {}
    model_dir = cfg.model_dir(cfg.train.backbone)  # the base model: fused ones need rationales first
    if not (model_dir / "model.pt").is_file():
        raise DataError(f"teacher.candidates=backbone needs a trained {cfg.train.backbone} at {model_dir}: "
                        "run `slim-ray train` first, or set teacher.candidates=popular")
    model, meta = load_trained(model_dir)
    return top_unseen(model, sequences, meta["max_len"], min(tc.backbone_candidates, tc.n_candidates))


@contextlib.contextmanager
def teacher_endpoint(cfg: Config):
    """The configured endpoint; for a silent loopback URL with launch_local, the offline teacher."""
    from slim_ray import teacher_server

    tc = cfg.teacher
    loopback = tc.base_url.startswith(("http://127.0.0.1", "http://localhost"))
    if not (tc.launch_local and loopback) or teacher_server.is_up(tc.base_url):
        yield tc
        return
    log = cfg.run.output_dir / "teacher_server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with teacher_server.local_teacher(tc.model, teacher_server.port_of(tc.base_url), tc.server_threads,
                                      tc.server_ctx, log_path=log) as base_url:
        yield tc.model_copy(update={"base_url": base_url})


def run_teach(cfg: Config, num_samples: int | None = None) -> dict:
    with teacher_endpoint(cfg) as tc:
        return _run_teach(cfg.model_copy(update={"teacher": tc}), num_samples)


def _run_teach(cfg: Config, num_samples: int | None) -> dict:
    import ray
    import ray.data

    from slim_ray.ray_session import ray_session

    tc = cfg.teacher
    items, sequences, stats = load_prepared(cfg.prepared_dir)
    requests = build_requests(items, sequences, tc, stats["domain"], cfg.run.seed, num_samples,
                              backbone_preferences(cfg, sequences))
    cache_dir = (tc.cache_dir or cfg.run.output_dir / "teacher_cache").resolve()
    start = time.perf_counter()
    with ray_session(cfg.ray):
        limiter = None
        if tc.requests_per_min or tc.tokens_per_min:
            limiter = ray.remote(num_cpus=0)(TokenBucketLimiter).remote(tc.requests_per_min, tc.tokens_per_min)
        ds = ray.data.from_pandas(requests).repartition(max(1, len(requests) // tc.batch_size))
        ds = ds.map_batches(
            TeacherActor, batch_format="pandas", batch_size=tc.batch_size, concurrency=tc.num_actors,
            num_cpus=tc.actor_cpus, fn_constructor_kwargs={
                "teacher": tc.model_dump(mode="json"), "cache_dir": str(cache_dir),
                "item_ids": items["item_id"].tolist(), "titles": items["title"].tolist(),
                "vocabulary": aspect_vocabulary(items), "limiter": limiter})
        ledger: dict = {}

        def write(tmp: Path) -> None:
            ds.write_parquet(str((tmp / "shards").resolve()))
            ledger.update(summarize(load_rationales(tmp), tc, time.perf_counter() - start))
            (tmp / "ledger.json").write_text(json.dumps(ledger, indent=2))

        write_atomic_dir(cfg.run.output_dir / "teacher", write)
    return ledger


def load_rationales(out_dir: Path) -> pd.DataFrame:
    shards = sorted(Path(out_dir, "shards").glob("*.parquet"))
    if not shards:
        raise DataError(f"no teacher rationales under {out_dir} (run `slim-ray teach` first)")
    return pd.concat([pd.read_parquet(p) for p in shards], ignore_index=True).sort_values("user_id")
