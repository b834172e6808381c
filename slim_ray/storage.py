"""Run-folder storage every stage shares: atomic folder publishing, the prepared dataset's format, the
teacher output's reader, model-folder content versions and LanceDB vector tables.

`write_atomic_dir(target, write)` publishes a folder all at once: the content is written into a new
version folder next to it and `target` is a symlink flipped to it with one rename (os.replace), so a
reader sees the old folder or the new one, never a missing or half-written one. The previous version
is kept until the next publish (a reader still inside it can finish), older ones are deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from slim_ray.config import Config
from slim_ray.errors import DataError

PREPARED_FILES = ("items.parquet", "sequences.parquet", "stats.json")

_SCHEMAS = {
    "items": pa.schema([("item_id", pa.int32()), ("raw_id", pa.string()), ("title", pa.string()),
                        ("categories", pa.list_(pa.string())), ("brand", pa.string()),
                        ("year", pa.string()), ("text", pa.string())]),
    "sequences": pa.schema([("user_id", pa.int32()), ("raw_user_id", pa.string()),
                            ("item_ids", pa.list_(pa.int32())), ("timestamps", pa.list_(pa.int64())),
                            ("train_item_ids", pa.list_(pa.int32())),
                            ("valid_history", pa.list_(pa.int32())), ("valid_target", pa.int32()),
                            ("test_history", pa.list_(pa.int32())), ("test_target", pa.int32())]),
}


def write_atomic_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Call write(folder) on a fresh version folder, then flip `target` (a symlink) to it; a failure
    leaves `target` untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    version = Path(tempfile.mkdtemp(prefix=f".{target.name}.v-", dir=target.parent))
    legacy = None
    try:
        write(version)
        previous = target.resolve() if target.is_symlink() else None
        if target.is_dir() and not target.is_symlink():
            # A folder from before symlinks becomes the previous version: the one publish with a short gap.
            legacy = target.with_name(f".{target.name}.v-legacy")
            shutil.rmtree(legacy, ignore_errors=True)
            target.rename(legacy)
            previous = legacy.resolve()
        link = target.with_name(f".{target.name}.link-{os.getpid()}")
        link.unlink(missing_ok=True)
        link.symlink_to(version.name)
        os.replace(link, target)
    except BaseException:
        shutil.rmtree(version, ignore_errors=True)
        if legacy is not None and not target.exists():
            legacy.rename(target)
        raise
    for old in target.parent.glob(f".{target.name}.v-*"):  # keep the current and the previous version
        if old.resolve() not in (version.resolve(), previous):
            shutil.rmtree(old, ignore_errors=True)


def write_prepared(out_dir: Path, items: pd.DataFrame, sequences: pd.DataFrame, stats: dict) -> None:
    def write(tmp: Path) -> None:
        pq.write_table(pa.Table.from_pandas(items, schema=_SCHEMAS["items"], preserve_index=False),
                       tmp / "items.parquet")
        pq.write_table(pa.Table.from_pandas(sequences, schema=_SCHEMAS["sequences"],
                                            preserve_index=False), tmp / "sequences.parquet")
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
    write_atomic_dir(out_dir, write)


def load_prepared(out_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    out_dir = Path(out_dir)
    for name in PREPARED_FILES:
        if not (out_dir / name).is_file():
            raise DataError(f"prepared dataset incomplete: {out_dir / name} is missing "
                            "(run `slim-ray prepare` first)")
    return (pd.read_parquet(out_dir / "items.parquet"), pd.read_parquet(out_dir / "sequences.parquet"),
            json.loads((out_dir / "stats.json").read_text()))


def load_rationales(out_dir: Path) -> pd.DataFrame:
    """The teach stage's output: RUN_DIR/teacher/shards/*.parquet, one row per (user, checkpoint)."""
    shards = sorted(Path(out_dir, "shards").glob("*.parquet"))
    if not shards:
        raise DataError(f"no teacher rationales under {out_dir} (run `slim-ray teach` first)")
    return pd.concat([pd.read_parquet(p) for p in shards], ignore_index=True).sort_values("user_id")


def load_teacher_rows(cfg: Config) -> pd.DataFrame:
    """What distillation learns from: distill.rationales (a Parquet file or a teach output folder) or
    this run's own teacher output."""
    source = cfg.distill.rationales or cfg.run.output_dir / "teacher"
    source = Path(source)
    if source.is_file():
        rows = pd.read_parquet(source)
    elif source.is_dir():
        rows = load_rationales(source)
    else:
        raise DataError(f"distill.rationales: {source} not found (run `slim-ray teach` first)")
    for column in ("user_id", "student_messages", "rationale", "parsed"):
        if column not in rows.columns:
            raise DataError(f"distill.rationales: {source} lacks column {column!r}")
    return rows


DECLARED_VERSION = "slim_ray_version.txt"


def model_version(path: str) -> str:
    """Version of a model folder: the one it declares in DECLARED_VERSION, else a content hash of its
    weights + config; a hub id stands for itself. A folder built from versioned inputs (export_student:
    adapter + base) declares their versions, because its merged fp32 weights can differ in the last bits
    from one CPU to another, and the cache keys built on the version must not."""
    folder = Path(path)
    if not folder.is_dir():
        return path
    if (folder / DECLARED_VERSION).is_file():
        return (folder / DECLARED_VERSION).read_text().strip()
    digest = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        if file.suffix in {".safetensors", ".bin", ".json"} and file.is_file():
            digest.update(file.name.encode())
            with open(file, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    digest.update(chunk)
    return digest.hexdigest()[:16]


def vectors_table(frame: pd.DataFrame, keep: list[str], vector_columns: list[str]) -> pa.Table:
    """`keep` columns plus each vector column as fixed-size float32 lists (LanceDB's vector type);
    `embedding` is stored as `vector`, the column LanceDB searches by default."""
    table = pa.Table.from_pandas(frame[keep], preserve_index=False)
    for column in vector_columns:
        matrix = np.stack(frame[column].to_numpy()).astype(np.float32)
        values = pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), matrix.shape[1])
        table = table.append_column("vector" if column == "embedding" else column, values)
    return table
