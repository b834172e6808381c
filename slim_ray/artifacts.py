"""Readers of run-folder artifacts that several stages share (one place, so stages never import each other)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from slim_ray.config import Config
from slim_ray.errors import DataError, SlimRayError
from slim_ray.fusion import item_text_matrix, rationale_table, split_text, uses_rationale
from slim_ray.prefixes import CheckpointIndex


def student_dir(cfg: Config, fold: int | None = None) -> Path:
    """Where the distill stage writes a student: RUN_DIR/student, or RUN_DIR/student/fold{k} for the one
    trained without fold k's users (distill.cross_fit)."""
    root = cfg.run.output_dir / "student"
    return root if fold is None else root / f"fold{fold}"


def student_paths(cfg: Config) -> dict[int | None, str]:
    """The students the backfill uses: {fold: merged folder} when cross-fitted (each writes its fold's
    users), {None: folder} for one student for everyone (backfill.student, or RUN_DIR/student)."""
    if cfg.backfill.student:
        return {None: str(cfg.backfill.student)}
    if cfg.distill.cross_fit:  # never fall back to a student that saw every user
        folds = {fold: student_dir(cfg, fold) / "merged" for fold in range(cfg.data.folds)}
        missing = [str(path) for path in folds.values() if not path.is_dir()]
        if missing:
            raise SlimRayError(f"distill.cross_fit: no distilled student at {', '.join(missing)} (run `slim-ray "
                               "distill` first, or set backfill.student to an HF folder)")
        return {fold: str(path) for fold, path in folds.items()}
    single = student_dir(cfg) / "merged"
    if not single.is_dir():
        raise SlimRayError(f"no distilled student at {single} (run `slim-ray distill` first, or set "
                           "backfill.student to an HF folder)")
    return {None: str(single)}


def load_backfill(cfg: Config) -> tuple[pd.DataFrame, pd.DataFrame]:
    out_dir = cfg.run.output_dir / "backfill"
    if not (out_dir / "manifest.json").is_file():
        raise DataError(f"no backfill under {out_dir} (run `slim-ray backfill` first)")
    return pd.read_parquet(out_dir / "rationales.parquet"), pd.read_parquet(out_dir / "items.parquet")


def fusion_vectors(cfg: Config, n_items: int, sequences: pd.DataFrame,
                   backfill: tuple[pd.DataFrame, pd.DataFrame] | None = None
                   ) -> tuple[np.ndarray | None, dict | None, CheckpointIndex | None]:
    """Item text matrix, rationale vectors ({"rows": [R + 1, T], "valid"/"test": [n_users + 1, T]})
    and the checkpoint index of the backfill (`load_backfill`, read here unless given), as the variant
    needs them (Nones without fusion)."""
    if cfg.train.fusion == "none":
        return None, None, None
    rows, items = backfill or load_backfill(cfg)
    item_text = item_text_matrix(items, n_items).numpy()
    if not uses_rationale(cfg.train.fusion) and "dllm2rec" not in cfg.train.fusion:
        return item_text, None, None
    vectors, index = rationale_table(rows, cfg.train.rationale)
    if not uses_rationale(cfg.train.fusion):
        return item_text, None, index
    return item_text, {"rows": vectors, **{split: split_text(vectors, index, sequences, split)
                                           for split in ("valid", "test")}}, index
