"""Stage `serve`: recommend-and-explain on Ray Serve, with the item vectors in LanceDB.

  build_index      the trained model's item vectors -> LanceDB table `item_index` with an ANN index
                   (IVF_HNSW_SQ, dot product); each run writes a new table version
  RecommenderCore  user vector of a known user (stored history + backfilled rationale) or of a raw
                   history (+ a fresh rationale from the student when the model or `explain` needs it)
  IndexCore        ANN search with a prefilter on seen items; checks out the newest table version
                   before each search, so a re-index swaps in atomically and requests never fail
  StudentCore      the distilled student + text encoder for fresh rationales
The *Core classes are plain Python (tested without Ray); slim_ray/serve_app.py wraps each in a Serve deployment
with autoscaling and puts a FastAPI ingress in front (OpenAPI at /docs). Deploy with
`serve run serve_configs/recommend.yaml` (or `serve deploy`, or the RayService in cluster/kuberay).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import torch

from slim_ray.config import Config
from slim_ray.errors import DataError
from slim_ray.storage import load_prepared

INDEX_TABLE = "item_index"


class RequestError(Exception):
    """A bad request: becomes a 4xx JSON error; the service keeps serving."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


# ---------------------------------------------------------------- index

def build_index(cfg: Config) -> dict:
    """Write the trained model's item vectors to LanceDB (a new table version) and index them."""
    import lancedb
    from lancedb.index import IvfHnswSq

    from slim_ray.storage import vectors_table
    from slim_ray.fusion import load_trained

    if not (cfg.model_dir() / "model.pt").is_file():
        raise DataError(f"no trained model at {cfg.model_dir()} (run `slim-ray train` first)")
    items, _, _ = load_prepared(cfg.prepared_dir)
    model, meta = load_trained(cfg.model_dir())
    with torch.no_grad():
        vectors = model.item_vectors()[1:].numpy().astype(np.float32)
    frame = items[["item_id", "raw_id", "title"]].assign(embedding=list(vectors))
    db = lancedb.connect(str(cfg.backfill.lancedb_uri or cfg.run.output_dir / "lancedb"))
    table = db.create_table(INDEX_TABLE, data=vectors_table(frame, ["item_id", "raw_id", "title"], ["embedding"]),
                            mode="overwrite")
    table.create_index("vector", config=IvfHnswSq(distance_type="dot", num_partitions=max(1, len(items) // 4096)))
    manifest = {"model": meta.get("name", meta["backbone"]), "rows": len(items), "dim": int(vectors.shape[1]),
                "table_version": int(table.version), "index_type": "IVF_HNSW_SQ", "metric": "dot"}
    (cfg.model_dir() / "index.json").write_text(json.dumps(manifest, indent=2))
    return manifest


REFINE_FACTOR = 5
HIT_COLUMNS = ["item_id", "raw_id", "title", "_distance"]  # naming _distance silences a per-query warning


class IndexCore:
    def __init__(self, uri: str, refresh_s: float = 1.0):
        import lancedb

        self.table = lancedb.connect(uri).open_table(INDEX_TABLE)
        self.refresh_s, self.checked_at = refresh_s, time.perf_counter()

    def search(self, vector: list[float], k: int, exclude: list[int], exact: bool = False) -> dict:
        start = time.perf_counter()
        if start - self.checked_at >= self.refresh_s:
            # A re-index is picked up here, atomically, within refresh_s (reading the table's
            # manifest on every request would cost each search a file-system round trip).
            self.table.checkout_latest()
            self.checked_at = start
        query = self.table.search(np.asarray(vector, dtype=np.float32)).distance_type("dot").limit(k)
        if exclude:
            query = query.where(f"item_id NOT IN ({', '.join(str(int(i)) for i in exclude)})", prefilter=True)
        # The index scores scalar-quantized vectors (recall@10 0.905 alone here): re-rank its top
        # REFINE_FACTOR x k candidates with the full vectors.
        query = query.bypass_vector_index() if exact else query.refine_factor(REFINE_FACTOR)
        hits = query.select(HIT_COLUMNS).to_list()
        # LanceDB's "dot" distance is 1 - dot product: report the model's score itself
        return {"items": [{"item_id": int(h["item_id"]), "raw_id": str(h["raw_id"]), "title": h["title"],
                           "score": float(1.0 - h["_distance"])} for h in hits],
                "index_version": int(self.table.version), "search_ms": (time.perf_counter() - start) * 1000}


# ---------------------------------------------------------------- recommender

class RecommenderCore:
    def __init__(self, cfg: Config):
        from slim_ray.fusion import uses_rationale
        from slim_ray.artifacts import fusion_vectors
        from slim_ray.fusion import load_trained

        self.cfg = cfg
        items, sequences, _ = load_prepared(cfg.prepared_dir)
        self.items = items.set_index("item_id")
        self.item_by_raw = dict(zip(items["raw_id"].astype(str), items["item_id"]))
        self.user_row = {str(u): i for i, u in enumerate(sequences["raw_user_id"])}
        self.sequences = sequences
        self.model, self.meta = load_trained(cfg.model_dir())
        self.needs_rationale = uses_rationale(self.meta.get("fusion", "none"))
        self.rationales = cached_rationales(cfg)
        _, user_text, _ = fusion_vectors(cfg, self.meta["n_items"], sequences)
        self.user_text = None if user_text is None else user_text["test"]  # the newest prefix's rationale

    def item(self, item_id: int) -> dict:
        if item_id not in self.items.index:
            raise RequestError(404, f"unknown item id {item_id}")
        row = self.items.loc[item_id]
        return {"item_id": int(item_id), "raw_id": str(row["raw_id"]), "title": row["title"],
                "categories": list(row["categories"]), "brand": row["brand"], "year": row["year"]}

    def resolve(self, user_id: str | None, history: list[str] | None) -> tuple[list[int], int | None]:
        """(item ids of the history, user id if known). Raw ids in, 4xx reasons out."""
        if user_id is not None:
            if str(user_id) not in self.user_row:
                raise RequestError(404, f"unknown user_id {user_id!r}")
            row = self.user_row[str(user_id)]
            return [int(i) for i in self.sequences["item_ids"].iloc[row]], int(self.sequences["user_id"].iloc[row])
        unknown = [h for h in history if str(h) not in self.item_by_raw]
        if unknown:
            raise RequestError(422, f"unknown item ids in history: {unknown[:10]}")
        return [int(self.item_by_raw[str(h)]) for h in history], None

    def history_items(self, item_ids: list[int]) -> list[dict]:
        return [self.item(i) for i in item_ids[-self.cfg.teacher.history_len:]]

    def candidates(self, item_ids: list[int]) -> list[dict]:
        """Step-3 candidates of a fresh rationale, grounded as at backfill time: the served model's top
        unseen items for this history, scored with no rationale (a zero text vector, as training rows
        before their user's first checkpoint)."""
        n = self.cfg.teacher.n_candidates
        dim = self.user_text.shape[1] if self.user_text is not None else 0
        vector = torch.as_tensor(self.user_vector(item_ids, np.zeros(dim, np.float32)))
        with torch.no_grad():
            scores = self.model.item_vectors() @ vector
        scores[0] = -torch.inf
        scores[torch.as_tensor(sorted(set(item_ids)))] = -torch.inf
        return [self.item(int(i)) for i in scores.topk(n).indices.tolist()]

    def user_vector(self, item_ids: list[int], user_text: np.ndarray | None) -> list[float]:
        max_len = self.meta["max_len"]
        recent = item_ids[-max_len:]
        batch = {"item_seq": torch.zeros(1, max_len, dtype=torch.long), "item_seq_len": torch.tensor([len(recent)])}
        batch["item_seq"][0, : len(recent)] = torch.as_tensor(recent)
        if self.needs_rationale:
            batch["user_text"] = torch.as_tensor(np.asarray(user_text, dtype=np.float32))[None]
        with torch.no_grad():
            return self.model.user_vectors(batch)[0].tolist()


def cached_rationales(cfg: Config) -> dict[int, dict]:
    """user id -> the backfilled rationale of the user's newest checkpoint (empty without a backfill)."""
    path = cfg.run.output_dir / "backfill" / "rationales.parquet"
    if not path.is_file():
        return {}
    rows = pd.read_parquet(path, columns=["user_id", "cut", "rationale", "step1", "step2", "step3", "model_version",
                                          "candidate_ids"])
    newest = rows.sort_values("cut").groupby("user_id").tail(1)
    return {int(r.user_id): {"rationale": r.rationale, "steps": [r.step1, r.step2, r.step3], "model_version": r.model_version,
                             "candidates": [int(c) for c in r.candidate_ids]} for r in newest.itertuples()}


class StudentCore:
    def __init__(self, cfg: Config, engine: str = "hf"):
        from slim_ray.artifacts import student_paths
        from slim_ray.storage import model_version
        from slim_ray.text_encoder import load_encoder
        from slim_ray.student import make_generator

        path = next(iter(student_paths(cfg).values()))  # a new history is in no fold: any student serves it
        self.version, self.domain = model_version(path), load_prepared(cfg.prepared_dir)[2]["domain"]
        self.generator = make_generator(engine, path, threads=1)
        self.encoder = load_encoder(cfg.backfill.encoder, threads=1)
        self.max_new_tokens = cfg.backfill.max_new_tokens

    def explain(self, history: list[dict], candidates: list[dict]) -> dict:
        from slim_ray.prompts import parse_rationale, student_messages

        texts, _ = self.generator.generate([student_messages(history, candidates, self.domain)], self.max_new_tokens)
        vector = self.encoder.encode(texts, normalize_embeddings=True)[0].astype(np.float32)
        return {"rationale": texts[0], "steps": parse_rationale(texts[0]).steps, "vector": vector.tolist(),
                "model_version": self.version, "candidates": [int(c["item_id"]) for c in candidates]}


async def recommend(core: RecommenderCore, explain_fn, search_fn, user_id: str | None, history: list[str] | None,
                    k: int, exclude_seen: bool, explain: bool) -> dict:
    """The request flow. `explain_fn(history_items, candidates)` and `search_fn(vector, k, exclude)` are async:
    Serve handle calls in the app, wrapped plain calls in tests."""
    timings, start = {}, time.perf_counter()
    clock = start

    def lap(name: str) -> None:  # per-hop milliseconds, returned with the response
        nonlocal clock
        now = time.perf_counter()
        timings[name], clock = (now - clock) * 1000, now

    item_ids, known_user = core.resolve(user_id, history)
    if not item_ids:
        raise RequestError(422, "the history is empty")
    cached = core.rationales.get(known_user) if known_user is not None else None
    rationale, source, vector_text = None, None, None
    if cached is not None:
        rationale, source = dict(cached), "cached"  # the same shape as a fresh explanation, without its vector
        vector_text = core.user_text[known_user] if core.user_text is not None else None
    lap("resolve")
    if cached is None and (explain or core.needs_rationale):
        fresh = await explain_fn(core.history_items(item_ids), core.candidates(item_ids))
        vector_text = np.asarray(fresh.pop("vector"), dtype=np.float32)
        rationale, source = fresh, "fresh"
        lap("student")
    exclude = sorted(set(item_ids)) if exclude_seen else []
    vector = core.user_vector(item_ids, vector_text)
    lap("user_vector")
    found = await search_fn(vector, k, exclude)
    lap("search")  # the call to the index (a Serve handle hop in the app) ...
    timings["index"] = found["search_ms"]  # ... of which LanceDB inside the index replica
    return {"items": found["items"], "explanation": rationale if explain else None,
            "rationale_source": source if explain else None,
            "versions": {"model": core.meta.get("name", core.meta["backbone"]),
                         "student": rationale["model_version"] if rationale else None,
                         "index": found["index_version"]},
            "latency_ms": (time.perf_counter() - start) * 1000, "timings_ms": timings}
