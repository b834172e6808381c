"""Stage `serve`: recommend-and-explain on Ray Serve, from one versioned bundle backed by LanceDB.

  publish_bundle  one version of everything a replica serves, published together: the model weights,
                  its item vectors (LanceDB table `items`, ANN-indexed above serve.exact_max_items), every
                  known user's vector, seen items and newest backfilled rationale (table `users`, read
                  from the backfill's LanceDB `rationales` table at a pinned version). RUN_DIR/serving/MODEL
                  flips to it atomically.
  Bundle          one loaded version: resolve a request, user vectors (precomputed for known users),
                  search (exact in memory with a seen-item mask; LanceDB ANN with over-fetch and a
                  post-filter above serve.exact_max_items)
  BundleWatcher   the bundle a replica serves now: a newly published one loads off the request path and
                  is swapped in as one reference, so no request mixes two versions
  StudentCore     the distilled student + text encoder for fresh rationales (batched)
  recommend       the request flow; recommend_stream the same with the rationale streamed as it is written
The classes are plain Python (tested without Ray); slim_ray/serve_app.py wraps them in Serve deployments
behind a FastAPI ingress (OpenAPI at /docs). Deploy with `serve run serve_configs/recommend.yaml`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import AsyncIterator, Iterator

import numpy as np
import pyarrow as pa
import torch

from slim_ray.config import Config
from slim_ray.errors import DataError, RequestError
from slim_ray.storage import load_prepared, vectors_table, write_atomic_dir

log = logging.getLogger(__name__)
REFINE_FACTOR = 5  # ANN: re-rank 5 x k scalar-quantized candidates with the full vectors
RATIONALE_COLUMNS = ["user_id", "cut", "rationale", "step1", "step2", "step3", "model_version", "candidate_ids"]


# ---------------------------------------------------------------- publishing

def publish_bundle(cfg: Config) -> dict:
    """Publish the trained model with its item vectors, known users' vectors and the backfill's rationale
    table version as one new bundle version (RUN_DIR/serving/MODEL)."""
    import lancedb

    from slim_ray.artifacts import fusion_vectors
    from slim_ray.fusion import load_trained

    if not (cfg.model_dir() / "model.pt").is_file():
        raise DataError(f"no trained model at {cfg.model_dir()} (run `slim-ray train` first)")
    items, sequences, _ = load_prepared(cfg.prepared_dir)
    model, meta = load_trained(cfg.model_dir())
    _, user_text, _ = fusion_vectors(cfg, meta["n_items"], sequences)
    # A known user is served from the whole stored history and the rationale of its newest checkpoint,
    # as the test split is evaluated.
    text = None if user_text is None else user_text["test"][sequences["user_id"].to_numpy()]
    histories = [[int(i) for i in s] for s in sequences["item_ids"]]
    users = sequences[["user_id", "raw_user_id"]].assign(
        raw_user_id=sequences["raw_user_id"].astype(str), seen=histories,
        embedding=list(user_vectors(model, meta["max_len"], histories, text)))
    with torch.no_grad():
        item_frame = items[["item_id", "raw_id", "title", "categories", "brand", "year"]].assign(
            raw_id=items["raw_id"].astype(str), categories=items["categories"].map(list),
            embedding=list(model.item_vectors()[1:].numpy().astype(np.float32)))
    backfill = cfg.run.output_dir / "backfill" / "manifest.json"
    lance = json.loads(backfill.read_text()).get("lancedb") if backfill.is_file() else None
    pin = None if lance is None else {"uri": str(Path(lance["uri"]).resolve()), "version": lance["versions"]["rationales"]}
    # Each user's newest backfilled rationale, read from the backfill's LanceDB table at this version and
    # copied in: the bundle needs nothing outside itself.
    cached = pinned_rationales(pin)
    explained = [cached.get(int(u)) for u in users["user_id"]]
    target = cfg.serving_dir
    previous = json.loads((target / "bundle.json").read_text())["version"] if (target / "bundle.json").is_file() else 0
    exact = len(items) <= cfg.serve.exact_max_items
    manifest = {"version": previous + 1, "model": meta.get("name", meta["backbone"]), "fusion": meta.get("fusion", "none"),
                "items": len(items), "users": len(users), "dim": int(item_frame["embedding"].iloc[0].shape[0]),
                "text_dim": None if text is None else int(text.shape[1]),
                "search": "exact" if exact else "ann", "index_type": None if exact else "IVF_HNSW_SQ",
                "rationales": pin, "explained_users": sum(e is not None for e in explained),
                "published_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def write(folder: Path) -> None:
        for name in ("model.pt", "meta.json"):
            shutil.copy2(cfg.model_dir() / name, folder / name)
        db = lancedb.connect(str(folder / "lancedb"))
        table = db.create_table("items", data=vectors_table(item_frame, [c for c in item_frame if c != "embedding"],
                                                            ["embedding"]))
        if not exact:
            index_vectors(table, len(items))
        table = vectors_table(users, ["user_id", "raw_user_id", "seen"], ["embedding"])
        for name, key, kind in (("rationale", "rationale", pa.string()), ("steps", "steps", pa.list_(pa.string())),
                                ("student_version", "model_version", pa.string()),
                                ("candidates", "candidates", pa.list_(pa.int64()))):  # typed: all may be null
            table = table.append_column(name, pa.array([e and e[key] for e in explained], type=kind))
        db.create_table("users", data=table)
        (folder / "bundle.json").write_text(json.dumps(manifest, indent=2))

    write_atomic_dir(target, write)
    return manifest


def index_vectors(table, rows: int) -> None:
    """ANN index over a LanceDB table's `vector` column: IVF_HNSW_SQ, dot product, ~4096 rows a partition."""
    from lancedb.index import IvfHnswSq

    table.create_index("vector", config=IvfHnswSq(distance_type="dot", num_partitions=max(1, rows // 4096)))


def user_vectors(model, max_len: int, histories: list[list[int]], text: np.ndarray | None,
                 batch_size: int = 1024) -> np.ndarray:
    """s_u of each history (its newest max_len items) with its rationale vector (fused models), [N, d]."""
    out = []
    for start in range(0, len(histories), batch_size):
        chunk = [h[-max_len:] for h in histories[start:start + batch_size]]
        batch = {"item_seq": torch.zeros(len(chunk), max_len, dtype=torch.long),
                 "item_seq_len": torch.tensor([len(h) for h in chunk])}
        for row, h in enumerate(chunk):
            batch["item_seq"][row, : len(h)] = torch.as_tensor(h)
        if text is not None:
            batch["user_text"] = torch.as_tensor(np.asarray(text[start:start + batch_size], dtype=np.float32))
        with torch.no_grad():
            out.append(model.user_vectors(batch).numpy().astype(np.float32))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


# ---------------------------------------------------------------- one bundle version

class Bundle:
    """One published version, loaded: everything a request reads comes from here."""

    def __init__(self, folder: Path, n_candidates: int, history_len: int, nprobes: int = 32):
        import lancedb

        from slim_ray.fusion import load_trained, uses_rationale

        self.folder = folder
        self.manifest = json.loads((folder / "bundle.json").read_text())
        self.version, self.exact = self.manifest["version"], self.manifest["search"] == "exact"
        self.n_candidates, self.history_len, self.nprobes = n_candidates, history_len, nprobes
        self.model, self.meta = load_trained(folder)
        self.needs_rationale = uses_rationale(self.meta.get("fusion", "none"))
        db = lancedb.connect(str(folder / "lancedb"))
        self.table = db.open_table("items")
        items = self.table.to_arrow()
        ids = items.column("item_id").to_numpy()
        if self.exact:  # row = item id; row 0 is padding and never recommended
            self.item_matrix = np.zeros((int(ids.max()) + 1, self.manifest["dim"]), np.float32)
            self.item_matrix[ids] = np.stack(items.column("vector").to_numpy(zero_copy_only=False))
        self.items = items.drop_columns(["vector"]).to_pandas().set_index("item_id")
        self.item_by_raw = dict(zip(self.items["raw_id"], self.items.index))
        users = db.open_table("users").to_arrow()
        self.user_row = {raw: row for row, raw in enumerate(users.column("raw_user_id").to_pylist())}
        self.user_ids = users.column("user_id").to_numpy()
        self.seen = users.column("seen").to_pylist()
        self.user_matrix = np.stack(users.column("vector").to_numpy(zero_copy_only=False))
        self.rationales = {int(u["user_id"]): {"rationale": u["rationale"], "steps": u["steps"],
                                               "model_version": u["student_version"], "candidates": u["candidates"]}
                           for u in users.select(["user_id", "rationale", "steps", "student_version", "candidates"]
                                                 ).to_pylist() if u["rationale"] is not None}

    def item(self, item_id: int) -> dict:
        if item_id not in self.items.index:
            raise RequestError(404, f"unknown item id {item_id}")
        row = self.items.loc[item_id]
        return {"item_id": int(item_id), "raw_id": str(row["raw_id"]), "title": row["title"],
                "categories": list(row["categories"]), "brand": row["brand"], "year": row["year"]}

    def resolve(self, user_id: str | None, history: list[str] | None) -> tuple[list[int], int | None]:
        """(item ids of the history, bundle row of a known user). Raw ids in, 4xx reasons out."""
        if user_id is not None:
            if str(user_id) not in self.user_row:
                raise RequestError(404, f"unknown user_id {user_id!r}")
            row = self.user_row[str(user_id)]
            return list(self.seen[row]), row
        if not history:
            raise RequestError(422, "the history is empty")
        unknown = [h for h in history if str(h) not in self.item_by_raw]
        if unknown:
            raise RequestError(422, f"unknown item ids in history: {unknown[:10]}")
        return [int(self.item_by_raw[str(h)]) for h in history], None

    def cached_rationale(self, row: int | None) -> dict | None:
        return None if row is None else self.rationales.get(int(self.user_ids[row]))

    def history_items(self, item_ids: list[int]) -> list[dict]:
        return [self.item(i) for i in item_ids[-self.history_len:]]

    def user_vectors(self, histories: list[list[int]], text: list[np.ndarray | None]) -> np.ndarray:
        """Vectors of raw histories; a fused model without a rationale gets a zero text vector, as
        training rows before their user's first checkpoint."""
        dim = self.manifest["text_dim"]
        stacked = np.stack([np.zeros(dim, np.float32) if t is None else np.asarray(t, np.float32) for t in text]
                           ) if self.needs_rationale else None
        return user_vectors(self.model, self.meta["max_len"], histories, stacked)

    def candidates(self, item_ids: list[int]) -> list[dict]:
        """Step-3 candidates of a fresh rationale, grounded as at backfill time: the served model's top
        unseen items for this history, scored with no rationale."""
        vector = self.user_vectors([item_ids], [None])[0]
        return [self.item(hit["item_id"]) for hit in self.search(vector, self.n_candidates, item_ids)]

    async def find(self, vector: np.ndarray, k: int, exclude: list[int]) -> list[dict]:
        """`search` from a request: exact scoring is one small matmul, an ANN query waits on LanceDB
        (off the event loop)."""
        return self.search(vector, k, exclude) if self.exact else await asyncio.to_thread(self.search, vector, k, exclude)

    def search(self, vector: np.ndarray, k: int, exclude: list[int]) -> list[dict]:
        """Top-k items by dot product, never one of `exclude`."""
        exclude = sorted(set(int(i) for i in exclude))
        if self.exact:
            scores = self.item_matrix @ np.asarray(vector, np.float32)
            scores[[0, *exclude]] = -np.inf
            k = min(k, int(np.isfinite(scores).sum()))
            top = np.argpartition(-scores, k - 1)[:k] if k else np.zeros(0, int)
            top = top[np.argsort(-scores[top], kind="stable")]
            hits = [(int(i), float(scores[i])) for i in top]
        else:
            hits = ann_search(self.table, vector, k, exclude, self.nprobes)
        return [{"item_id": i, "raw_id": str(self.items.at[i, "raw_id"]), "title": self.items.at[i, "title"],
                 "score": s} for i, s in hits]


def ann_search(table, vector: np.ndarray, k: int, exclude: list[int], nprobes: int) -> list[tuple[int, float]]:
    """(item id, dot product) of the top k by LanceDB ANN. Over-fetching by the excluded count means the
    post-filter always leaves k (a SQL prefilter costs a scan per query); the scalar-quantized candidates
    are re-ranked with the full vectors (refine)."""
    rows = (table.search(np.asarray(vector, np.float32)).distance_type("dot").nprobes(nprobes)
            .limit(k + len(exclude)).refine_factor(REFINE_FACTOR).select(["item_id", "_distance"]).to_list())
    skip = set(exclude)  # LanceDB's "dot" distance is 1 - dot product: report the score itself
    return [(int(r["item_id"]), 1.0 - float(r["_distance"])) for r in rows if int(r["item_id"]) not in skip][:k]


def pinned_rationales(pin: dict | None) -> dict[int, dict]:
    """user id -> the rationale of the user's newest checkpoint, from the backfill's LanceDB table at
    the version the bundle pinned (empty without a backfill)."""
    if pin is None:
        return {}
    import lancedb

    table = lancedb.connect(pin["uri"]).open_table("rationales")
    table.checkout(pin["version"])
    newest: dict[int, dict] = {}
    for r in sorted(table.to_arrow().select(RATIONALE_COLUMNS).to_pylist(), key=lambda r: r["cut"]):
        newest[int(r["user_id"])] = {"rationale": r["rationale"], "steps": [r["step1"], r["step2"], r["step3"]],
                                     "model_version": r["model_version"], "candidates": [int(c) for c in r["candidate_ids"]]}
    return newest


class BundleWatcher:
    """The bundle a replica serves. Every refresh_s it reads where the bundle link points; a new version
    is loaded on a background thread and swapped in as one reference (atomic under the GIL)."""

    def __init__(self, cfg: Config):
        self.link, self.refresh_s = cfg.serving_dir, cfg.serve.refresh_s
        self.args = (cfg.teacher.n_candidates, cfg.teacher.history_len, cfg.serve.ann_nprobes)
        if not (self.link / "bundle.json").is_file():
            raise DataError(f"no published bundle at {self.link} (run `slim-ray index` first)")
        self.bundle = Bundle(self.link.resolve(), *self.args)
        self.checked_at, self.loading, self.failed = time.monotonic(), False, None

    def current(self) -> Bundle:
        now = time.monotonic()
        if now - self.checked_at >= self.refresh_s and not self.loading:
            self.checked_at, target = now, self.link.resolve()
            if target not in (self.bundle.folder, self.failed):  # a broken version is not retried
                self.loading = True
                threading.Thread(target=self._swap, args=(target,), daemon=True).start()
        return self.bundle

    def _swap(self, folder: Path) -> None:
        try:
            self.bundle = Bundle(folder, *self.args)
        except Exception:  # e.g. removed by two quick publishes: the next publish is tried
            self.failed = folder
            log.exception("loading bundle %s failed; still serving version %s", folder, self.bundle.version)
        finally:
            self.loading = False


# ---------------------------------------------------------------- student

class StudentCore:
    def __init__(self, cfg: Config, engine: str = "hf"):
        from slim_ray.artifacts import student_paths
        from slim_ray.storage import model_version
        from slim_ray.student import make_generator
        from slim_ray.text_encoder import load_encoder

        path = next(iter(student_paths(cfg).values()))  # a new history is in no fold: any student serves it
        self.version, self.domain = model_version(path), load_prepared(cfg.prepared_dir)[2]["domain"]
        self.generator = make_generator(engine, path, threads=1)
        self.encoder = load_encoder(cfg.backfill.encoder, threads=1)
        self.max_new_tokens = cfg.backfill.max_new_tokens
        self.engine_lock = threading.Lock()  # batched and streamed calls come from several threads; engines are not thread-safe

    def explain_batch(self, requests: list[tuple[list[dict], list[dict]]]) -> list[dict]:
        """Fresh rationales of (history items, candidate items) pairs, generated together."""
        from slim_ray.prompts import parse_rationale, student_messages

        with self.engine_lock:
            texts, _ = self.generator.generate([student_messages(h, c, self.domain) for h, c in requests],
                                               self.max_new_tokens)
        vectors = self.encoder.encode(texts, normalize_embeddings=True).astype(np.float32)
        return [{"rationale": text, "steps": parse_rationale(text).steps, "vector": vector.tolist(),
                 "model_version": self.version, "candidates": [int(c["item_id"]) for c in candidates]}
                for text, vector, (_, candidates) in zip(texts, vectors, requests)]

    def explain(self, history: list[dict], candidates: list[dict]) -> dict:
        return self.explain_batch([(history, candidates)])[0]

    def stream(self, history: list[dict], candidates: list[dict]) -> Iterator[dict]:
        """{"token": text} pieces as the student writes, then {"explanation": ...} as `explain` returns it."""
        from slim_ray.prompts import parse_rationale, student_messages

        pieces = []
        with self.engine_lock:
            for piece in self.generator.stream(student_messages(history, candidates, self.domain), self.max_new_tokens):
                pieces.append(piece)
                yield {"token": piece}
        text = "".join(pieces).strip()
        vector = self.encoder.encode([text], normalize_embeddings=True)[0].astype(np.float32)
        yield {"explanation": {"rationale": text, "steps": parse_rationale(text).steps, "vector": vector.tolist(),
                               "model_version": self.version, "candidates": [int(c["item_id"]) for c in candidates]}}


# ---------------------------------------------------------------- request flow

async def recommend(bundle: Bundle, explain_fn, vector_fn, user_id: str | None, history: list[str] | None,
                    k: int, exclude_seen: bool, explain: bool) -> dict:
    """One request, answered from one bundle version. `explain_fn(history_items, candidates)` and
    `vector_fn(bundle, item_ids, text_vector)` are async (batched Serve calls in the app, plain calls in tests)."""
    timings, start = {}, time.perf_counter()
    clock = start

    def lap(name: str) -> None:  # per-step milliseconds, returned with the response
        nonlocal clock
        now = time.perf_counter()
        timings[name], clock = (now - clock) * 1000, now

    item_ids, row = bundle.resolve(user_id, history)
    cached = bundle.cached_rationale(row)
    rationale, source = (dict(cached), "cached") if cached is not None else (None, None)
    lap("resolve")
    text = None
    if cached is None and (explain or (row is None and bundle.needs_rationale)):
        candidates = await asyncio.to_thread(bundle.candidates, item_ids)  # a forward pass: off the event loop
        fresh = await explain_fn(bundle.history_items(item_ids), candidates)
        text = np.asarray(fresh.pop("vector"), dtype=np.float32)
        rationale, source = fresh, "fresh"
        lap("student")
    # known users: precomputed at publish time (their stored history and newest backfilled rationale)
    vector = bundle.user_matrix[row] if row is not None else await vector_fn(bundle, item_ids, text)
    lap("user_vector")
    exclude = item_ids if exclude_seen else []
    items = await bundle.find(vector, k, exclude)
    lap("search")
    return {"items": items, "explanation": rationale if explain else None,
            "rationale_source": source if explain else None,
            "versions": {"bundle": bundle.version, "model": bundle.manifest["model"],
                         "student": rationale["model_version"] if rationale else None},
            "latency_ms": (time.perf_counter() - start) * 1000, "timings_ms": timings}


async def recommend_stream(bundle: Bundle, stream_fn, vector_fn, user_id: str | None, history: list[str] | None,
                           k: int, exclude_seen: bool, explain: bool = True) -> AsyncIterator[tuple[str, dict]]:
    """The streamed flow: ("items", ...) at once, then for a fresh rationale ("token", ...) pieces as the
    student writes, then ("explanation", ...) in the shape `recommend` returns. Items come before the
    rationale exists, so a SLIM-fused model scores a raw history here without one (as it picks the
    rationale's candidates); `recommend` waits for the rationale and scores with it. Bad requests (and a
    needed student that is not deployed: stream_fn None) raise RequestError before the first event."""
    item_ids, row = bundle.resolve(user_id, history)
    cached = bundle.cached_rationale(row)
    if explain and cached is None and stream_fn is None:
        raise RequestError(503, "no student deployment: explanations for new histories are off")
    vector = bundle.user_matrix[row] if row is not None else await vector_fn(bundle, item_ids, None)
    exclude = item_ids if exclude_seen else []
    items = await bundle.find(vector, k, exclude)

    async def events() -> AsyncIterator[tuple[str, dict]]:
        yield "items", {"items": items, "rationale_source": None if not explain else "cached" if cached is not None else "fresh",
                        "versions": {"bundle": bundle.version, "model": bundle.manifest["model"]}}
        if not explain:
            return
        if cached is not None:
            yield "explanation", dict(cached)
            return
        candidates = await asyncio.to_thread(bundle.candidates, item_ids)
        async for part in stream_fn(bundle.history_items(item_ids), candidates):
            if "token" in part:
                yield "token", part
            else:
                part["explanation"].pop("vector")
                yield "explanation", part["explanation"]

    return events()
