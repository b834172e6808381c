"""Run-folder storage every stage shares: atomic folder publishing and the prepared dataset's format.

`write_atomic_dir(target, write)` publishes a folder all at once: the content is written into a new
version folder next to it and `target` is a symlink flipped to it with one rename (os.replace), so a
reader sees the old folder or the new one, never a missing or half-written one. The previous version
is kept until the next publish (a reader still inside it can finish), older ones are deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

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
    try:
        write(version)
        previous = target.resolve() if target.is_symlink() else None
        if target.is_dir() and not target.is_symlink():  # a folder from before symlinks: the previous version
            previous = target.with_name(f".{target.name}.v-legacy")
            shutil.rmtree(previous, ignore_errors=True)
            target.rename(previous)
            previous = previous.resolve()
        link = target.with_name(f".{target.name}.link-{os.getpid()}")
        link.unlink(missing_ok=True)
        link.symlink_to(version.name)
        os.replace(link, target)
    except BaseException:
        shutil.rmtree(version, ignore_errors=True)
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
