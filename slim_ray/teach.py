"""Stage `teach`: a large teacher LLM writes 3-step rationales for a seeded sample of users.

Pure core: `teach_checkpoints` (a seeded sample of users, each at one of its checkpoints,
slim_ray.prefixes), `build_requests` (teacher and student prompts grounded by the same cross-fitted
candidates, slim_ray.candidates; content hashes), `annotate` (parse + grounding flags), `summarize` (the ledger). Ray wrapper: Ray Data
streams the requests through `TeacherActor`s (map_batches on an actor pool), each calling the API
through `ChatCaller` (retries, backoff, Retry-After, a rate limiter shared as a Ray actor, cache).
Every input row comes out as a rationale or as a recorded failure; rows are never dropped.
Output: RUN_DIR/teacher/{shards/*.parquet, ledger.json}, replaced atomically at the end.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pyarrow as pa

from slim_ray.candidates import checkpoint_candidates
from slim_ray.config import Config, TeacherConfig
from slim_ray.errors import ConfigError
from slim_ray.llm_api import ChatCaller, ResponseCache, TokenBucketLimiter, resolve_api_key
from slim_ray.prefixes import checkpoint_rows
from slim_ray.progress import progress_channel, report
from slim_ray.prompts import (
    PROMPT_VERSION, TitleIndex, aspect_vocabulary, named_aspects, prompt_hash, student_messages, teacher_messages,
    validate,
)
from slim_ray.storage import load_prepared, load_rationales, write_atomic_dir

_LIST_INT, _LIST_STR = pa.list_(pa.int32()), pa.list_(pa.string())
OUTPUT_SCHEMA = pa.schema([
    ("user_id", pa.int32()), ("raw_user_id", pa.string()), ("cut", pa.int32()), ("split", pa.string()),
    ("history_ids", _LIST_INT), ("seen_ids", _LIST_INT), ("candidate_ids", _LIST_INT),
    ("next_item_id", pa.int32()),
    ("teacher_messages", pa.string()), ("student_messages", pa.string()), ("cache_key", pa.string()),
    ("model", pa.string()), ("prompt_version", pa.string()),
    ("rationale", pa.string()), ("finish_reason", pa.string()), ("steps", _LIST_STR), ("parsed", pa.bool_()),
    ("flags", _LIST_STR), ("named", pa.int32()), ("in_catalogue", pa.int32()), ("in_history", pa.int32()),
    ("unknown", pa.int32()), ("off_list", pa.int32()), ("named_item_ids", _LIST_INT), ("step2_aspects", _LIST_STR),
    ("prompt_tokens", pa.int32()), ("completion_tokens", pa.int32()), ("attempts", pa.int32()),
    ("retries", pa.int32()), ("retry_reasons", _LIST_STR), ("error", pa.string()),
    ("error_detail", pa.string()), ("from_cache", pa.bool_()), ("latency_s", pa.float64()),
])


def teach_checkpoints(sequences: pd.DataFrame, num_samples: int, seed: int, per_user: int, stride: int) -> pd.DataFrame:
    """A seeded sample of users, each at one of its checkpoints (drawn seeded per user, so a user's row
    is the same whatever else is sampled): the student later writes for every checkpoint, so it
    learns from all kinds (training, valid, test)."""
    eligible = sequences[sequences["item_ids"].map(len) >= 4]
    # Sample order (not sorted): a larger sample's first rows are the smaller one's, so a run cut short
    # has taught a prefix of the sample, and `num_samples` = what is cached re-exports exactly that.
    sample = eligible.sample(n=min(num_samples, len(eligible)), random_state=seed)
    rows = checkpoint_rows(sample, per_user, stride)
    pick = {int(u): np.random.default_rng([seed, int(u)]).choice(cuts.to_numpy())
            for u, cuts in rows.groupby("user_id")["cut"]}
    return rows[[pick[int(u)] == c for u, c in zip(rows["user_id"], rows["cut"])]].reset_index(drop=True)


def build_requests(items: pd.DataFrame, rows: pd.DataFrame, candidates: list[list[int]], tc: TeacherConfig,
                   domain: str) -> pd.DataFrame:
    """One request per checkpoint row: the teacher's and the student's prompts over the same history
    (the last history_len items of s[:cut]) and the same candidates; content hashes."""
    by_id = items.set_index("item_id")[["title", "categories", "brand", "year"]].to_dict("index")
    vocabulary = aspect_vocabulary(items)
    params = {"model": tc.model, "max_tokens": tc.max_tokens, "temperature": tc.temperature}
    out = []
    for row, cands in zip(rows.itertuples(index=False), candidates):
        seen = [int(i) for i in row.history_ids]
        history = [by_id[i] for i in seen[-tc.history_len:]]
        offered = [by_id[i] for i in cands]
        teacher = teacher_messages(history, offered, domain, tc.n_recommend, vocabulary)
        out.append({
            "user_id": row.user_id, "raw_user_id": row.raw_user_id, "cut": row.cut, "split": row.split,
            "history_ids": seen[-tc.history_len:], "seen_ids": seen, "candidate_ids": list(cands),
            "next_item_id": int(row.next_item_id), "teacher_messages": json.dumps(teacher),
            "student_messages": json.dumps(student_messages(history, offered, domain)),
            "cache_key": prompt_hash(teacher, **params), "model": tc.model, "prompt_version": PROMPT_VERSION,
        })
    return pd.DataFrame(out)


def annotate(row: dict, index: TitleIndex, vocabulary: list[str]) -> dict:
    """Parse the rationale into steps and flag items that are seen or not in the catalogue."""
    if row.get("rationale") is None:
        return {"steps": ["", "", ""], "parsed": False, "flags": ["failed"], "named": 0, "in_catalogue": 0,
                "in_history": 0, "unknown": 0, "off_list": 0, "named_item_ids": [], "step2_aspects": []}
    checked = validate(row["rationale"], index, set(row["seen_ids"]), set(row["candidate_ids"]))
    checked["step2_aspects"] = named_aspects(checked["steps"][1], vocabulary) if vocabulary else []
    checked["named_item_ids"] = checked.pop("item_ids")
    return checked


class TeacherActor:
    """Ray Data actor: calls the teacher for a batch of request rows, `concurrency` at a time."""

    def __init__(self, teacher: dict, cache_dir: str, item_ids: list[int], titles: list[str],
                 vocabulary: list[str], limiter=None, progress=None):
        tc = TeacherConfig(**teacher)
        self.tc = tc
        self.caller = ChatCaller(tc.base_url, tc.model, resolve_api_key(tc.api_key_env, tc.base_url),
                                 timeout_s=tc.timeout_s, max_retries=tc.max_retries,
                                 backoff_base_s=tc.backoff_base_s, backoff_max_s=tc.backoff_max_s,
                                 cache=ResponseCache(Path(cache_dir)), limiter=limiter)
        self.pool = ThreadPoolExecutor(tc.concurrency)
        self.index, self.vocabulary = TitleIndex.from_items(item_ids, titles), vocabulary
        self.progress = progress

    def _one(self, row: dict) -> dict:
        result = asdict(self.caller.call(json.loads(row["teacher_messages"]), row["cache_key"],
                                         max_tokens=self.tc.max_tokens, temperature=self.tc.temperature))
        row = {**row, **result, "rationale": result["text"]}
        return {**row, **annotate(row, self.index, self.vocabulary)}

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        rows = list(self.pool.map(self._one, batch.to_dict("records")))
        report(self.progress, f"teach: {len(rows)} rationales ({sum(bool(r.get('from_cache')) for r in rows)} from cache, "
                              f"{sum(bool(r.get('parsed')) for r in rows)} in the 3-step format)")
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
        "flagged_off_list": int(results["flags"].map(lambda f: "off_list" in f).sum()),
        "wall_s": wall_s,
        "rationales_per_min": float(ok[fresh].sum() / wall_s * 60) if wall_s > 0 else 0.0,
        "model": tc.model, "base_url": tc.base_url, "prompt_version": PROMPT_VERSION,
        "candidates": tc.candidates,
    }


@contextlib.contextmanager
def teacher_endpoint(cfg: Config):
    """The configured endpoint (inside a Ray session); with launch_local and a silent loopback base_url,
    the offline teacher: a process beside the driver on a one-node Ray, else a cluster service (a
    TeacherService actor, preferably on the driver's node, bound to its node's address) that teacher
    actors on every node reach."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from slim_ray import teacher_server

    tc = cfg.teacher
    here = ray.get_runtime_context().get_node_id()
    alive = [n for n in ray.nodes() if n["Alive"]]
    local_cpus = next((n["Resources"].get("CPU", 0.0) for n in alive if n["NodeID"] == here), 1.0)
    if not (tc.launch_local and is_loopback(tc.base_url)) or teacher_server.is_up(tc.base_url):
        check_reachable(tc.base_url, {n["NodeManagerAddress"] for n in alive}, local_cpus)
        yield tc
        return
    port = teacher_server.port_of(tc.base_url)
    if len(alive) == 1 and local_cpus > 0:  # every actor runs here: a plain child process will do
        log = cfg.run.output_dir / "teacher_server.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with teacher_server.local_teacher(tc.model, port, tc.server_threads, tc.server_ctx, log_path=log,
                                          command=tc.server_command) as base_url:
            yield tc.model_copy(update={"base_url": base_url})
        return
    service = ray.remote(teacher_server.TeacherService).options(
        num_cpus=tc.server_threads, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True),
    ).remote(tc.model, port, tc.server_threads, tc.server_ctx, tc.server_command)
    try:
        # our own server: no API key, whichever node's address it has
        yield tc.model_copy(update={"base_url": ray.get(service.base_url.remote()), "api_key_env": ""})
    finally:
        with contextlib.suppress(Exception):
            ray.get(service.stop.remote(), timeout=60)
        ray.kill(service)


def is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_reachable(base_url: str, node_ips: set[str], local_cpus: float = 1.0) -> None:
    """A loopback teacher URL works only when every teacher actor runs on this machine: refuse it before any
    request when the cluster spans several machines, or when this node has no CPUs (a head with num-cpus 0:
    the actors go to workers, which an autoscaler may not have started yet)."""
    if is_loopback(base_url) and (len(node_ips) > 1 or local_cpus <= 0):
        where = (f"spans {len(node_ips)} machines ({', '.join(sorted(node_ips))})" if len(node_ips) > 1
                 else "runs its actors on other machines (this node has no CPUs)")
        raise ConfigError(
            f"teacher.base_url {base_url} is a loopback address, but this Ray cluster {where}: teacher actors "
            "elsewhere would call their own machine. Give an address "
            "every node reaches (e.g. run `slim-ray teacher-server` on one node and set teacher.base_url="
            "http://THAT_NODE_IP:PORT/v1).")


def run_teach(cfg: Config, num_samples: int | None = None) -> dict:
    from slim_ray.ray_session import ray_session

    with ray_session(cfg.ray), teacher_endpoint(cfg) as tc:
        return _run_teach(cfg.model_copy(update={"teacher": tc}), num_samples)


def _run_teach(cfg: Config, num_samples: int | None) -> dict:
    import ray
    import ray.data

    tc = cfg.teacher
    items, sequences, stats = load_prepared(cfg.prepared_dir)
    dc = cfg.data
    rows = teach_checkpoints(sequences, num_samples or tc.num_samples, cfg.run.seed, dc.checkpoints_per_user,
                             dc.checkpoint_stride)
    requests = build_requests(items, rows, checkpoint_candidates(rows, sequences, len(items) + 1, cfg)[0], tc,
                              stats["domain"])
    cache_dir = (tc.cache_dir or cfg.run.output_dir / "teacher_cache").resolve()
    start = time.perf_counter()
    with progress_channel() as progress:  # inside run_teach's Ray session
        limiter = None
        if tc.requests_per_min or tc.tokens_per_min:
            limiter = ray.remote(num_cpus=0)(TokenBucketLimiter).remote(tc.requests_per_min, tc.tokens_per_min,
                                                                          tc.rate_burst_s)
        actor_kwargs = {"teacher": tc.model_dump(mode="json"), "cache_dir": str(cache_dir),
                        "item_ids": items["item_id"].tolist(), "titles": items["title"].tolist(),
                        "vocabulary": aspect_vocabulary(items), "limiter": limiter, "progress": progress}

        def answered(part: pd.DataFrame):
            ds = ray.data.from_pandas(part).repartition(max(1, len(part) // tc.batch_size))
            return ds.map_batches(TeacherActor, batch_format="pandas", batch_size=tc.batch_size,
                                  compute=ray.data.ActorPoolStrategy(size=tc.num_actors), num_cpus=tc.actor_cpus,
                                  fn_constructor_kwargs=actor_kwargs)

        # Users with the same history and candidates share a prompt: it is paid once, and the repeats
        # are answered from the cache after the first pass, never in flight beside it.
        first = ~requests["cache_key"].duplicated()
        ds = answered(requests[first])
        if not first.all():
            ds = ds.materialize().union(answered(requests[~first]))
        ledger: dict = {}

        def write(tmp: Path) -> None:
            ds.write_parquet(str((tmp / "shards").resolve()))
            ledger.update(summarize(load_rationales(tmp), tc, time.perf_counter() - start))
            (tmp / "ledger.json").write_text(json.dumps(ledger, indent=2))

        write_atomic_dir(cfg.run.output_dir / "teacher", write)
    return ledger
