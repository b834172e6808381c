"""Stage `prepare`: raw files -> a prepared dataset directory every later stage reads.

Output (all or nothing: slim_ray.storage publishes it as one folder version):
  items.parquet      item_id (1..N; 0 is padding), raw_id, title, categories, brand, year, text
  sequences.parquet  user_id (1..U), raw_user_id, item_ids, timestamps (full chronological history),
                     train_item_ids (all but the last two), valid_history/valid_target,
                     test_history/test_target (leave-one-out; histories keep the last max_len items)
  stats.json         counts before and after filtering, density, sequence lengths, options used
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from slim_ray.config import DataConfig
from slim_ray.datasets import RawDataset, load_raw
from slim_ray.errors import DataError
from slim_ray.prefixes import split_prefix
from slim_ray.storage import write_prepared


def filter_interactions(inter: pd.DataFrame, rating_threshold: float | None, kcore: int,
                        min_seq_len: int) -> pd.DataFrame:
    """Rating threshold, then iterative k-core (users also need >= min_seq_len) until stable."""
    if rating_threshold is not None:
        if inter["rating"].isna().all():
            raise DataError("data.rating_threshold is set but the interactions have no rating field")
        inter = inter[inter["rating"] >= rating_threshold]
    user_min, item_min = max(kcore, min_seq_len), kcore
    while True:
        user_counts = inter.groupby("user")["item"].transform("size")
        item_counts = inter.groupby("item")["user"].transform("size")
        keep = (user_counts >= user_min) & (item_counts >= item_min)
        if keep.all():
            return inter
        inter = inter[keep]


def _id_order(raw_ids: pd.Series) -> list[str]:
    """Numeric raw ids sort numerically (ML-100k: item 2 before 10), others lexicographically."""
    unique = raw_ids.unique().tolist()
    if all(str(v).isdigit() for v in unique):
        return sorted(unique, key=int)
    return sorted(unique)


def item_text(title: str, categories: list[str], brand: str, year: str, domain: str) -> str:
    """The string the text encoder sees for an item."""
    text = title.strip() or "Unknown item"
    if year and year not in text:
        text += f" ({year})"
    if categories:
        text += (". Genres: " if domain == "movies" else ". Categories: ") + ", ".join(categories)
    if brand:
        text += f". Brand: {brand}"
    return text + "."


def build_items(raw_items: pd.DataFrame, order: list[str], domain: str) -> pd.DataFrame:
    meta = raw_items.drop_duplicates("raw_id").set_index("raw_id")
    items = pd.DataFrame({"raw_id": order}).join(meta, on="raw_id")
    missing = items["title"].isna()
    items["title"] = items["title"].where(~missing, items["raw_id"])  # no metadata: show the id
    items["categories"] = [c if isinstance(c, list) else [] for c in items["categories"]]
    items["brand"] = items["brand"].fillna("")
    items["year"] = items["year"].fillna("").astype(str)
    items.insert(0, "item_id", np.arange(1, len(items) + 1, dtype=np.int32))
    items["text"] = [item_text(t, c, b, y, domain) for t, c, b, y in
                     zip(items["title"], items["categories"], items["brand"], items["year"])]
    items.attrs["without_metadata"] = int(missing.sum())
    return items


def build_sequences(inter: pd.DataFrame, item_index: dict[str, int], max_len: int) -> pd.DataFrame:
    # A stable sort keeps file order for equal timestamps (ML-100k has many), as RecBole does.
    inter = inter.sort_values("timestamp", kind="stable")
    users = _id_order(inter["user"])
    inter = inter.assign(item_id=inter["item"].map(item_index).astype(np.int32))
    grouped = inter.groupby("user", sort=False)
    items_by_user = grouped["item_id"].apply(list)
    times_by_user = grouped["timestamp"].apply(list)
    rows = []
    for user_id, raw_user in enumerate(users, start=1):
        seq, times = items_by_user[raw_user], times_by_user[raw_user]
        (valid_history, valid_target), (test_history, test_target) = (split_prefix(seq, s) for s in ("valid", "test"))
        rows.append({
            "user_id": user_id, "raw_user_id": raw_user, "item_ids": seq, "timestamps": times,
            "train_item_ids": valid_history,  # every training row's target precedes the valid target
            "valid_history": valid_history[-max_len:], "valid_target": valid_target,
            "test_history": test_history[-max_len:], "test_target": test_target,
        })
    return pd.DataFrame(rows)


def _counts(inter: pd.DataFrame) -> dict:
    users, items, n = inter["user"].nunique(), inter["item"].nunique(), len(inter)
    return {"users": int(users), "items": int(items), "interactions": int(n),
            "density": float(n / (users * items)) if users and items else 0.0}


def prepare_dataset(raw: RawDataset, cfg: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Pure core: raw tables -> (items, sequences, stats)."""
    before = _counts(raw.interactions)
    inter = filter_interactions(raw.interactions, cfg.rating_threshold, cfg.kcore, cfg.min_seq_len)
    if inter.empty:
        raise DataError(f"no interactions left after filtering (data.rating_threshold="
                        f"{cfg.rating_threshold}, data.kcore={cfg.kcore}, "
                        f"data.min_seq_len={cfg.min_seq_len})")
    items = build_items(raw.items, _id_order(inter["item"]), raw.domain)
    item_index = dict(zip(items["raw_id"], items["item_id"]))
    sequences = build_sequences(inter, item_index, cfg.max_len)
    lengths = sequences["item_ids"].map(len)
    stats = {
        "domain": raw.domain,
        "before_filtering": before,
        "after_filtering": {**_counts(inter), "avg_seq_len": float(lengths.mean()),
                            "min_seq_len": int(lengths.min()), "max_seq_len": int(lengths.max())},
        "items_without_metadata": items.attrs["without_metadata"],
        "options": cfg.model_dump(mode="json"),
    }
    return items, sequences, stats


def run_prepare(cfg: DataConfig, out_dir: Path) -> dict:
    items, sequences, stats = prepare_dataset(load_raw(cfg), cfg)
    write_prepared(out_dir, items, sequences, stats)
    return stats
