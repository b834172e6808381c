"""Readers for the supported raw formats, each returning the same two plain tables.

interactions: user (str), item (str), rating (float, NaN when the format has none), timestamp (int64)
items:        raw_id (str), title (str), categories (list[str]), brand (str), year (str)

Formats: RecBole atomic files (.inter/.item, ML-100k ships in the recbole package), Amazon 2014
(reviews JSON + Python-literal metadata), Amazon 2018 (JSON lines) and Amazon 2023 (JSONL, parent_asin).
Every parse error names the file, and the line or field, that caused it.
"""

from __future__ import annotations

import ast
import csv
import gzip
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd

from slim_ray.config import DataConfig
from slim_ray.errors import DataError

INTERACTION_COLUMNS = ["user", "item", "rating", "timestamp"]
ITEM_COLUMNS = ["raw_id", "title", "categories", "brand", "year"]


@dataclass
class RawDataset:
    interactions: pd.DataFrame
    items: pd.DataFrame
    domain: str  # "movies" (categories are genres) or "products" (categories + brand)


def packaged_ml100k_dir() -> Path:
    """ML-100k atomic files shipped in the `recbole` wheel; found without importing recbole."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the default dataset needs the `recbole` package (pip install --no-deps "
                        "recbole==1.2.1) or set data.interactions / data.items to your own files")
    folder = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k"
    if not (folder / "ml-100k.inter").is_file():
        raise DataError(f"ML-100k files not found in the recbole package: {folder}")
    return folder


def load_raw(cfg: DataConfig) -> RawDataset:
    if cfg.format == "recbole":
        inter, item = cfg.interactions, cfg.items
        if inter is None and item is None:
            folder = packaged_ml100k_dir()
            inter, item = folder / "ml-100k.inter", folder / "ml-100k.item"
        return load_recbole(_need(inter, "data.interactions"), _need(item, "data.items"))
    inter, meta = _need(cfg.interactions, "data.interactions"), _need(cfg.items, "data.items")
    if cfg.format in ("amazon2014", "amazon2018"):
        return load_amazon_classic(inter, meta)
    return load_amazon2023(inter, meta)


def _need(path: Path | None, field: str) -> Path:
    if path is None:
        raise DataError(f"{field} is required for this data.format")
    if not Path(path).is_file():
        raise DataError(f"{field}: file not found: {path}")
    return Path(path)


# ---------------------------------------------------------------- RecBole atomic files

_TITLE_FIELDS = ("movie_title", "title", "item_name", "name")
_CATEGORY_FIELDS = ("class", "genre", "genres", "categories", "category")
_YEAR_FIELDS = ("release_year", "year")


def _read_atomic(path: Path) -> pd.DataFrame:
    """Tab-separated with a `name:type` header; all values kept as strings."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: empty file (expected a name:type header)") from None
        names = [h.split(":", 1)[0] for h in header]
        rows = []
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(names):
                raise DataError(f"{path}:{lineno}: expected {len(names)} tab-separated fields "
                                f"({', '.join(names)}), got {len(row)}")
            rows.append(row)
    return pd.DataFrame(rows, columns=names, dtype=str)


def _numeric(df: pd.DataFrame, column: str, path: Path, dtype: str) -> pd.Series:
    values = pd.to_numeric(df[column], errors="coerce")
    bad = values.isna() & df[column].notna() & (df[column].astype(str).str.strip() != "")
    if bad.any():
        row = int(bad.to_numpy().nonzero()[0][0])
        raise DataError(f"{path}: field {column!r} is not numeric on data row {row + 1}: "
                        f"{df[column].iloc[row]!r}")
    return values.astype(dtype)


def load_recbole(inter_path: Path, item_path: Path) -> RawDataset:
    inter = _read_atomic(inter_path)
    for column in ("user_id", "item_id", "timestamp"):
        if column not in inter.columns:
            raise DataError(f"{inter_path}: missing field {column!r} (header has "
                            f"{', '.join(inter.columns)})")
    interactions = pd.DataFrame({
        "user": inter["user_id"],
        "item": inter["item_id"],
        "rating": _numeric(inter, "rating", inter_path, "float64") if "rating" in inter else float("nan"),
        "timestamp": _numeric(inter, "timestamp", inter_path, "float64").astype("int64"),
    })
    meta = _read_atomic(item_path)
    if "item_id" not in meta.columns:
        raise DataError(f"{item_path}: missing field 'item_id'")
    title = next((c for c in _TITLE_FIELDS if c in meta.columns), None)
    if title is None:
        raise DataError(f"{item_path}: missing a title field (one of {', '.join(_TITLE_FIELDS)})")
    cats = next((c for c in _CATEGORY_FIELDS if c in meta.columns), None)
    year = next((c for c in _YEAR_FIELDS if c in meta.columns), None)
    items = pd.DataFrame({
        "raw_id": meta["item_id"],
        "title": meta[title].fillna(""),
        # token_seq fields are space-separated; genre names in RecBole files contain no spaces.
        "categories": meta[cats].fillna("").str.split() if cats else [[] for _ in range(len(meta))],
        "brand": meta["brand"].fillna("") if "brand" in meta else "",
        "year": meta[year].fillna("") if year else "",
    })
    domain = "movies" if title == "movie_title" or cats in ("class", "genre", "genres") else "products"
    return RawDataset(interactions, items[ITEM_COLUMNS], domain)


# ---------------------------------------------------------------- Amazon review dumps

def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _records(path: Path, literal_ok: bool) -> Iterator[tuple[int, dict]]:
    """JSON lines; with literal_ok, also Python-literal dict lines (Amazon 2014 metadata)."""
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    if not literal_ok:
                        raise DataError(f"{path}:{lineno}: not valid JSON") from None
                    try:
                        record = ast.literal_eval(line)
                    except (ValueError, SyntaxError):
                        raise DataError(f"{path}:{lineno}: neither JSON nor a Python dict literal") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{lineno}: expected an object, got {type(record).__name__}")
                yield lineno, record
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None


def _field(record: dict, names: tuple[str, ...], path: Path, lineno: int):
    for name in names:
        if name in record and record[name] is not None:
            return record[name]
    raise DataError(f"{path}:{lineno}: missing field {' or '.join(repr(n) for n in names)}")


def _read_reviews(path: Path, user: tuple, item: tuple, rating: tuple, time: tuple,
                  time_scale: float = 1.0) -> pd.DataFrame:
    rows = []
    for lineno, r in _records(path, literal_ok=False):
        try:
            rows.append((str(_field(r, user, path, lineno)), str(_field(r, item, path, lineno)),
                         float(_field(r, rating, path, lineno)),
                         int(float(_field(r, time, path, lineno)) * time_scale)))
        except (TypeError, ValueError):
            raise DataError(f"{path}:{lineno}: rating/timestamp field is not numeric") from None
    if not rows:
        raise DataError(f"{path}: no reviews found")
    return pd.DataFrame(rows, columns=INTERACTION_COLUMNS)


def _read_meta(path: Path, key: tuple, parse: Callable[[dict], dict], literal_ok: bool) -> pd.DataFrame:
    rows = []
    for lineno, r in _records(path, literal_ok=literal_ok):
        rows.append({"raw_id": str(_field(r, key, path, lineno)), **parse(r)})
    if not rows:
        raise DataError(f"{path}: no item metadata found")
    return pd.DataFrame(rows, columns=ITEM_COLUMNS).drop_duplicates("raw_id", keep="first")


def _flat_categories(value) -> list[str]:
    """2014: list of category paths (list of lists); 2018/2023: flat list of strings."""
    out: list[str] = []
    for entry in value or []:
        for name in entry if isinstance(entry, list) else [entry]:
            name = str(name).strip()
            if name and name not in out:
                out.append(name)
    return out


def _classic_meta(r: dict) -> dict:
    return {"title": str(r.get("title") or ""),
            "categories": _flat_categories(r.get("categories") or r.get("category")),
            "brand": str(r.get("brand") or ""), "year": ""}


def _meta_2023(r: dict) -> dict:
    details = r.get("details") if isinstance(r.get("details"), dict) else {}
    cats = _flat_categories(r.get("categories"))
    if not cats and r.get("main_category"):
        cats = [str(r["main_category"])]
    return {"title": str(r.get("title") or ""), "categories": cats,
            "brand": str(r.get("store") or details.get("Brand") or ""), "year": ""}


def load_amazon_classic(reviews: Path, meta: Path) -> RawDataset:
    """Amazon 2014 (`reviews_X_5.json.gz`, literal meta) and 2018 (`X_5.json.gz`, JSON meta)."""
    interactions = _read_reviews(reviews, ("reviewerID",), ("asin",), ("overall",), ("unixReviewTime",))
    items = _read_meta(meta, ("asin",), _classic_meta, literal_ok=True)
    return RawDataset(interactions, items, "products")


def load_amazon2023(reviews: Path, meta: Path) -> RawDataset:
    """Amazon Reviews 2023: items keyed by parent_asin, timestamps in milliseconds."""
    interactions = _read_reviews(reviews, ("user_id",), ("parent_asin", "asin"), ("rating",),
                                 ("timestamp",), time_scale=1e-3)
    items = _read_meta(meta, ("parent_asin",), _meta_2023, literal_ok=False)
    return RawDataset(interactions, items, "products")
