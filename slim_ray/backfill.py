"""Backfill: a student rationale for every user checkpoint, plus text vectors, into Parquet and LanceDB.

  requests  (pure)  one row per (user, checkpoint) (slim_ray.prefixes: training checkpoints, valid,
                    test): the student's prompt over s[:cut] with that row's cross-fitted candidates
                    (slim_ray.candidates), and a content key (student version + prompt + settings)
  generate  (Ray)   prompts the response cache does not hold, shortest first, through Ray Data
                    map_batches over StudentActor pools (vLLM, or HF generate by config); each
                    batch's completions are cached as it ends, so a crash loses one batch at most
  encode    (Ray)   EncoderActor: sentence-transformers vectors of each rationale and of its steps,
                    and of every item text (title, genres/categories, brand)
  publish           RUN_DIR/backfill/{rationales,items}.parquet + manifest.json (one atomic folder
                    swap) and LanceDB tables `rationales` and `items` (each write a new table version)

Incremental: rows whose key is in the previous output are reused as they are (no generation, no
encoding); after a crash, rows whose completion is in the cache are not generated again.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from slim_ray.artifacts import student_paths
from slim_ray.candidates import checkpoint_candidates
from slim_ray.config import BackfillConfig, Config
from slim_ray.llm_api import ResponseCache
from slim_ray.prefixes import checkpoint_rows, fold_of
from slim_ray.progress import progress_channel, report
from slim_ray.prompts import parse_rationale, prompt_hash, student_messages
from slim_ray.storage import load_prepared, model_version, vectors_table, write_atomic_dir
from slim_ray.text_encoder import load_encoder

TEXT_COLUMNS = {"embedding": "rationale", "step1_embedding": "step1", "step2_embedding": "step2",
                "step3_embedding": "step3"}


# ---------------------------------------------------------------- pure core

def backfill_requests(items: pd.DataFrame, rows: pd.DataFrame, domain: str, bc: BackfillConfig,
                      history_len: int, model_version: str) -> pd.DataFrame:
    """One request per checkpoint row (slim_ray.prefixes; with its `candidate_ids`): the student's
    grounded prompt over the last history_len items of s[:cut], and its content key."""
    by_id = items.set_index("item_id")[["title", "categories", "brand", "year"]].to_dict("index")
    requests = rows.reset_index(drop=True)
    messages = [student_messages([by_id[i] for i in history[-history_len:]], [by_id[i] for i in cands], domain)
                for history, cands in zip(requests["history_ids"], requests["candidate_ids"])]
    requests["student_messages"] = [json.dumps(m) for m in messages]
    requests["key"] = [prompt_hash(m, model_version=model_version, max_new_tokens=bc.max_new_tokens)
                       for m in messages]
    requests["model_version"] = model_version
    return requests


def with_steps(rows: pd.DataFrame) -> pd.DataFrame:
    parsed = [parse_rationale(text) for text in rows["rationale"]]
    rows = rows.assign(parsed=[p.parsed for p in parsed])
    for n in range(3):
        rows[f"step{n + 1}"] = [p.steps[n] for p in parsed]
    return rows


# ---------------------------------------------------------------- Ray actors

class StudentActor:
    """Generates a batch of uncached prompts; each completion goes to the cache as its batch ends."""

    def __init__(self, engine: str, model_path: str, threads: int, max_new_tokens: int, cache_dir: str,
                 use_gpu: bool = False, vllm_options: dict | None = None, progress=None, label: str = ""):
        from slim_ray.student import make_generator

        # Built here, before the first batch, so that a batch's time is generation alone.
        self.generator = make_generator(engine, model_path, threads, use_gpu, **(vllm_options or {}))
        self.max_new_tokens, self.cache = max_new_tokens, ResponseCache(Path(cache_dir))
        self.progress, self.label = progress, label

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        """batch: unique keys and their prompts -> key, rationale, completion_tokens, generation_s."""
        start = time.perf_counter()
        texts, tokens = self.generator.generate([json.loads(m) for m in batch["student_messages"]], self.max_new_tokens)
        seconds = time.perf_counter() - start
        for key, text, n in zip(batch["key"], texts, tokens):
            self.cache.put(key, {"text": text, "completion_tokens": n})
        report(self.progress, f"backfill {self.label}: {len(batch)} rationales in {seconds:.0f} s "
                              f"({sum(tokens) / max(seconds, 1e-9):.0f} generated tok/s)")
        return pd.DataFrame({"key": batch["key"], "rationale": texts, "completion_tokens": tokens,
                             "generation_s": np.where(np.arange(len(batch)) == 0, seconds, 0.0)})  # once a batch


def vllm_options(bc: BackfillConfig) -> dict:
    """Engine settings from config (unset: vLLM's defaults)."""
    return {"kv_cache_gb": bc.vllm_kv_cache_gb, "max_num_seqs": bc.vllm_max_num_seqs,
            "max_num_batched_tokens": bc.vllm_max_num_batched_tokens}


def from_cache(part: pd.DataFrame, cache: ResponseCache) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows whose completion the cache holds, filled in; rows still to generate)."""
    hits = {key: cache.get(key) for key in part["key"].unique()}
    held = part["key"].map(lambda k: hits[k] is not None).to_numpy(bool)
    cached = part[held].assign(rationale=[hits[k]["text"] for k in part.loc[held, "key"]],
                               completion_tokens=[int(hits[k]["completion_tokens"]) for k in part.loc[held, "key"]],
                               generated=False, generation_s=0.0)
    return cached, part[~held]


class EncoderActor:
    """Adds normalised float32 vectors: `columns` maps output column -> text column."""

    def __init__(self, encoder: str, columns: dict[str, str], threads: int, batch_size: int):
        self.model, self.columns, self.batch_size = load_encoder(encoder, threads), columns, batch_size

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        out = batch.copy()
        for column, text_column in self.columns.items():
            texts = [t if t else " " for t in batch[text_column].fillna("")]
            out[column] = list(self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                                 convert_to_numpy=True).astype(np.float32))
        return out


# ---------------------------------------------------------------- the job

def _in(frame: pd.DataFrame, other: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """Which rows of `frame` have their `columns` values in some row of `other`."""
    return pd.MultiIndex.from_frame(frame[columns]).isin(pd.MultiIndex.from_frame(other[columns]))


def unchanged(old: pd.DataFrame | None, wanted: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Rows of the previous output whose identity and content key are still wanted as they are."""
    if old is None or not len(old):
        return wanted.iloc[:0]
    return old[_in(old, wanted, columns)].reset_index(drop=True)


def previous_output(out_dir: Path, name: str) -> pd.DataFrame | None:
    path = out_dir / f"{name}.parquet"
    return pd.read_parquet(path) if path.is_file() else None


def run_backfill(cfg: Config) -> dict:
    import ray.data

    from slim_ray.ray_session import ray_session

    bc = cfg.backfill
    out_dir = cfg.run.output_dir / "backfill"
    items, sequences, stats = load_prepared(cfg.prepared_dir)
    paths = student_paths(cfg)  # {fold: student trained without that fold} or {None: one student}
    versions = {fold: model_version(path) for fold, path in paths.items()}
    dc = cfg.data
    users = sequences.head(bc.max_users) if bc.max_users else sequences
    rows = checkpoint_rows(users, dc.checkpoints_per_user, dc.checkpoint_stride)
    rows["candidate_ids"], rows["candidate_holdout_fold"] = checkpoint_candidates(rows, sequences, len(items) + 1, cfg)
    user_fold = fold_of(rows["user_id"].to_numpy(), dc.folds)
    rows["student_holdout_fold"] = user_fold if None not in paths else -1  # -1: one student saw everyone
    label = {fold: -1 if fold is None else fold for fold in paths}  # student_holdout_fold of each student's rows
    requests = pd.concat([backfill_requests(items, rows[rows["student_holdout_fold"] == label[fold]],
                                            stats["domain"], bc, cfg.teacher.history_len, versions[fold])
                          for fold in paths], ignore_index=True)
    items = items.assign(key=[hashlib.sha256(f"{bc.encoder}\n{t}".encode()).hexdigest()[:16] for t in items["text"]])

    old_rows, old_items = previous_output(out_dir, "rationales"), previous_output(out_dir, "items")
    reused = unchanged(old_rows, requests, ["user_id", "cut", "key"])
    todo = requests[~_in(requests, reused, ["user_id", "cut"])]
    reused_items = unchanged(old_items, items, ["item_id", "key"])
    todo_items = items[~items["item_id"].isin(reused_items["item_id"])]

    start = time.perf_counter()
    threads = bc.cpus_per_actor

    def encode(frame: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
        return ray.data.from_pandas(frame).map_batches(
            EncoderActor, batch_format="pandas", batch_size=bc.encoder_batch_size * 4,
            compute=ray.data.ActorPoolStrategy(size=1), num_cpus=threads,
            fn_constructor_kwargs={"encoder": bc.encoder, "threads": threads, "batch_size": bc.encoder_batch_size,
                                   "columns": columns},
        ).to_pandas()

    new_rows, new_items = todo.iloc[:0], todo_items.iloc[:0]
    cache = ResponseCache((bc.cache_dir or cfg.run.output_dir / "backfill_cache").resolve())
    with ray_session(cfg.ray, env={"OMP_NUM_THREADS": str(threads)}), progress_channel() as progress:
        generated = []
        for fold, path in paths.items():  # one student at a time: each pool holds all the CPUs
            cached, part = from_cache(todo[todo["student_holdout_fold"] == label[fold]], cache)
            generated.append(cached)
            if not len(part):
                continue
            # Similar lengths in a batch (less padding for HF; vLLM is indifferent). One block per
            # batch, made here: a repartition task would need a CPU that the student actors may hold
            # all of (2-CPU machine), and wait forever.
            unique = part.drop_duplicates("key")[["key", "student_messages"]]  # equal prompts run once
            unique = unique.iloc[np.argsort(unique["student_messages"].str.len().to_numpy(), kind="stable")]
            blocks = [unique.iloc[i:i + bc.batch_size] for i in range(0, len(unique), bc.batch_size)]
            done = ray.data.from_pandas(blocks).map_batches(
                StudentActor, batch_format="pandas", batch_size=bc.batch_size,
                compute=ray.data.ActorPoolStrategy(size=bc.num_actors), num_cpus=threads,
                num_gpus=bc.gpus_per_actor or None, **({"runtime_env": {"env_vars": bc.student_env}} if bc.student_env else {}),
                fn_constructor_kwargs={
                    "engine": bc.engine, "model_path": path, "threads": threads,
                    "max_new_tokens": bc.max_new_tokens, "cache_dir": str(cache.root),
                    "use_gpu": bc.gpus_per_actor > 0, "vllm_options": vllm_options(bc), "progress": progress,
                    "label": f"student {'all' if fold is None else f'without fold {fold}'} ({len(unique)} prompts)"},
            ).to_pandas().set_index("key")  # generation finishes (and frees its CPUs) before the next student
            first = ~part["key"].duplicated()
            generated.append(part.assign(
                rationale=part["key"].map(done["rationale"]), completion_tokens=part["key"].map(done["completion_tokens"]),
                generated=first, generation_s=part["key"].map(done["generation_s"]).where(first, 0.0)))
        if len(todo):
            new_rows = encode(with_steps(pd.concat(generated, ignore_index=True)), TEXT_COLUMNS)
        if len(todo_items):
            new_items = encode(todo_items, {"embedding": "text"})
    wall_s = time.perf_counter() - start

    rows = combine(reused, new_rows, list(TEXT_COLUMNS), ["user_id", "cut"])
    item_rows = combine(reused_items, new_items, ["embedding"], ["item_id"])
    check_exactly_once(rows, requests)
    generated_rows = int(new_rows["generated"].sum()) if len(new_rows) else 0
    tokens = int(new_rows.loc[new_rows["generated"], "completion_tokens"].sum()) if len(new_rows) else 0
    generation_s = float(new_rows["generation_s"].sum()) if len(new_rows) else 0.0
    manifest = {
        "rows": len(rows), "users": int(rows["user_id"].nunique()),
        "checkpoints": {"per_user": dc.checkpoints_per_user, "stride": dc.checkpoint_stride, "folds": dc.folds,
                        "by_split": rows["split"].value_counts().to_dict()},
        "candidates": cfg.teacher.candidates,
        "generated": generated_rows, "from_cache": len(new_rows) - generated_rows, "reused": len(reused),
        "items_encoded": len(new_items), "items_reused": len(reused_items), "completion_tokens": tokens,
        # wall: Ray start, engine loads, generation and encoding; generation: inside the engine calls only,
        # summed over batches (with several actors in parallel, tokens/s is then a per-actor rate)
        "wall_s": wall_s, "generation_s": generation_s,
        "generation_tokens_per_s": tokens / generation_s if generation_s else None,
        "parse_rate": float(rows["parsed"].mean()) if len(rows) else 0.0,
        "engine": bc.engine, "students": {str(k): v for k, v in paths.items()}, "cross_fitted": None not in paths,
        "model_versions": {str(k): v for k, v in versions.items()}, "encoder": bc.encoder,
        "dim": int(len(rows["embedding"].iloc[0])) if len(rows) else None,
    }

    def write(tmp: Path) -> None:
        for frame, name in ((rows, "rationales"), (item_rows, "items")):
            # without pandas metadata: Ray's extension dtypes would not round-trip through it
            table = pa.Table.from_pandas(frame, preserve_index=False)
            pq.write_table(table.replace_schema_metadata(None), tmp / f"{name}.parquet")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))

    write_atomic_dir(out_dir, write)
    manifest["lancedb"] = publish_lancedb(bc.lancedb_uri or cfg.run.output_dir / "lancedb", rows, item_rows)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def combine(reused: pd.DataFrame, new: pd.DataFrame, vector_columns: list[str], order: list[str]) -> pd.DataFrame:
    """Reused + new rows; vectors as plain float32 arrays (Ray hands back tensor-extension columns)."""
    new = new.assign(**{c: list(np.asarray(new[c].tolist(), dtype=np.float32)) for c in vector_columns
                        if c in new and len(new)})
    parts = [part for part in (reused, new) if len(part)]
    return (pd.concat(parts, ignore_index=True) if parts else new).sort_values(order, ignore_index=True)


def check_exactly_once(rows: pd.DataFrame, requests: pd.DataFrame) -> None:
    duplicated = rows.duplicated(["user_id", "cut"])
    if duplicated.any() or len(rows) != len(requests):
        raise RuntimeError(f"backfill produced {len(rows)} rows for {len(requests)} requests "
                           f"({int(duplicated.sum())} duplicated): refusing to publish")


def publish_lancedb(uri: Path, rows: pd.DataFrame, items: pd.DataFrame) -> dict:
    """Overwrite = a new table version, committed atomically; readers switch on their next checkout."""
    import lancedb

    db = lancedb.connect(str(uri))
    rationale_table = vectors_table(
        rows.assign(history_ids=rows["history_ids"].map(list), candidate_ids=rows["candidate_ids"].map(list)),
        ["user_id", "raw_user_id", "cut", "split", "history_ids", "candidate_ids", "next_item_id", "rationale",
         "step1", "step2", "step3", "parsed", "model_version", "key"], list(TEXT_COLUMNS))
    item_table = vectors_table(items.assign(categories=items["categories"].map(list)),
                               ["item_id", "raw_id", "title", "categories", "brand", "year", "text", "key"],
                               ["embedding"])
    versions, existing = {}, set(db.list_tables().tables)
    for name, table in (("rationales", rationale_table), ("items", item_table)):
        mode = "overwrite" if name in existing else "create"  # lance logs a WARN when overwriting nothing
        versions[name] = int(db.create_table(name, data=table, mode=mode).version)
    return {"uri": str(uri), "versions": versions}
