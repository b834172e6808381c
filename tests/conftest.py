"""Shared fixtures: tiny raw datasets in every supported format, written by the tests themselves."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# (user, item, rating, timestamp): u1 and u2 have equal timestamps to check the stable order.
INTERACTIONS = [
    ("u1", "i1", 5, 100), ("u1", "i2", 4, 200), ("u1", "i3", 3, 200), ("u1", "i4", 5, 400),
    ("u2", "i2", 2, 150), ("u2", "i1", 5, 150), ("u2", "i3", 4, 300), ("u2", "i5", 1, 350),
    ("u3", "i4", 5, 10), ("u3", "i1", 4, 20), ("u3", "i2", 5, 30),
    ("u4", "i9", 5, 10), ("u4", "i1", 4, 20),  # too short: dropped by min_seq_len=3
]
ITEMS = {
    "i1": ("Alpha", ["Action", "Drama"], "Acme"), "i2": ("Beta", ["Comedy"], "Bolt"),
    "i3": ("Gamma", ["Drama"], ""), "i4": ("Delta", ["Action"], "Acme"), "i5": ("Epsilon", [], ""),
    "i9": ("Omega", ["Horror"], ""),
}


def write_lines(path: Path, lines: list[str]) -> Path:
    data = "\n".join(lines) + "\n"
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


@pytest.fixture
def recbole_files(tmp_path: Path) -> tuple[Path, Path]:
    inter = write_lines(tmp_path / "toy.inter", ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
                        + [f"{u}\t{i}\t{r}\t{t}" for u, i, r, t in INTERACTIONS])
    item = write_lines(tmp_path / "toy.item", ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
                       + [f"{i}\t{t}\t1999\t{' '.join(c)}" for i, (t, c, _) in ITEMS.items()])
    return inter, item


@pytest.fixture
def amazon2014_files(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path := tmp_path / "amazon2014").mkdir()
    reviews = write_lines(tmp_path / "reviews_Toy_5.json.gz", [json.dumps(
        {"reviewerID": u, "asin": i, "overall": float(r), "unixReviewTime": t, "reviewText": "ok"})
        for u, i, r, t in INTERACTIONS])
    # 2014 metadata is one Python dict literal per line (single quotes), categories nested.
    meta = write_lines(tmp_path / "meta_Toy.json.gz", [repr(
        {"asin": i, "title": t, "categories": [["Toys"] + c], "brand": b, "price": 1.5})
        for i, (t, c, b) in ITEMS.items()])
    return reviews, meta


@pytest.fixture
def amazon2018_files(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path := tmp_path / "amazon2018").mkdir()
    reviews = write_lines(tmp_path / "Toy_5.json.gz", [json.dumps(
        {"reviewerID": u, "asin": i, "overall": float(r), "unixReviewTime": t, "verified": True})
        for u, i, r, t in INTERACTIONS])
    meta = write_lines(tmp_path / "meta_Toy.json.gz", [json.dumps(
        {"asin": i, "title": t, "category": ["Toys"] + c, "brand": b}) for i, (t, c, b) in ITEMS.items()])
    return reviews, meta


@pytest.fixture
def amazon2023_files(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path := tmp_path / "amazon2023").mkdir()
    reviews = write_lines(tmp_path / "Toy.jsonl", [json.dumps(
        {"user_id": u, "asin": f"{i}-variant", "parent_asin": i, "rating": float(r),
         "timestamp": t * 1000, "text": "ok"}) for u, i, r, t in INTERACTIONS])
    meta = write_lines(tmp_path / "meta_Toy.jsonl.gz", [json.dumps(
        {"parent_asin": i, "title": t, "main_category": "Toys", "categories": ["Toys"] + c,
         "store": b, "details": {}}) for i, (t, c, b) in ITEMS.items()])
    return reviews, meta


@pytest.fixture(scope="module")
def shared_ray():
    """One local Ray for a whole test module, as `slim-ray pipeline` gives one to all its stages: each
    stage's ray_session joins it instead of starting and stopping its own (seconds of both cores each)."""
    from slim_ray.config import RayConfig
    from slim_ray.ray_session import ray_session

    with ray_session(RayConfig(num_cpus=2, object_store_memory_mb=200)) as session:
        yield session


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from slim_ray.student import smollm2_gguf

    folder, gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("tiny_student")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path), tokenizer


def write_ring(root: Path, name: str, users: int, n_items: int, seed: int, length=6, title: str = "Film",
               genres: tuple[str, ...] = ("Comedy", "Drama")) -> Path:
    """Users walking the item ring (i -> i+1) from random starts: a pattern every model can learn.
    `length` is a fixed history length or a (low, high) range drawn per user."""
    rng = np.random.default_rng(seed)
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for user in range(users):
        start = rng.integers(1, n_items)
        steps = rng.integers(*length) if isinstance(length, tuple) else length
        lines += [f"u{user}\t{(start + t) % n_items + 1}\t5\t{t}" for t in range(steps)]
    (root / f"{name}.inter").write_text("\n".join(lines) + "\n")
    items = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    items += [f"{i}\t{title}{i}\t1990\t{genres[i % len(genres)]}" for i in range(1, n_items + 1)]
    (root / f"{name}.item").write_text("\n".join(items) + "\n")
    return root


@pytest.fixture(scope="session")
def ring_dataset(tmp_path_factory):
    return write_ring(tmp_path_factory.mktemp("teach"), "r", users=40, n_items=30, seed=1)


def slim_run_overrides(root: Path, student: str, name: str, epochs: int = 2) -> list[str]:
    """Config for a tiny SLIM-fused SASRec on the ring dataset, backfilled by `student` (HF engine)."""
    return [f"data.interactions={root / 'r.inter'}", f"data.items={root / 'r.item'}",
            f"run.output_dir={root / name}", "ray.object_store_memory_mb=100", "backfill.engine=hf",
            f"backfill.student={student}", "backfill.max_new_tokens=16",
            "backfill.cpus_per_actor=1", "train.fusion=slim", f"train.epochs={epochs}", "train.batch_size=32",
            "train.eval_negatives=10", "train.cpus_per_worker=1",
            "train.model={hidden_size: 16, inner_size: 32, n_layers: 1}"]
