"""Step-3 candidates of the teacher's and the student's prompts, cross-fitted.

For a checkpoint row (user u, cut c): the items that u's fold model (train.backbone trained on the
users of every other fold, `slim-ray train-folds`) scores highest after the history s[:c], history
excluded, topped up with the items most popular among the other folds' training histories, in that
order (most likely first): prompts say the list is ranked, so a small teacher that copies the top of
a list copies the backbone's best guesses, and a strong one can weigh them against what it knows.
No list is made by a model (or a popularity count) that saw the user's own interactions.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from slim_ray.config import Config
from slim_ray.errors import DataError
from slim_ray.evaluation import mask_seen
from slim_ray.fusion import load_trained
from slim_ray.prefixes import fold_of


def fold_model_name(backbone: str, fold: int, folds: int) -> str:
    """Folder name of the backbone trained without fold `fold`'s users."""
    return f"{backbone}-fold{fold}of{folds}"


def popular_by_fold(sequences: pd.DataFrame, n_items: int, folds: int) -> dict[int, np.ndarray]:
    """{fold: item ids by training popularity among the *other* folds' users, most popular first}."""
    user_fold = fold_of(sequences["user_id"].to_numpy(), folds)
    counts = np.zeros((folds, n_items), dtype=np.int64)
    for fold, seq in zip(user_fold, sequences["train_item_ids"]):
        np.add.at(counts[fold], np.asarray(seq, dtype=np.int64), 1)
    out = {}
    for fold in range(folds):
        others = counts.sum(0) - counts[fold]
        others[0] = -1  # padding last
        out[fold] = np.argsort(-others, kind="stable")
    return out


def fill(preferred: list[int], seen: set[int], popular: np.ndarray, n: int) -> list[int]:
    """`preferred` first, then popular unseen items, n in all, in that order."""
    picked: list[int] = []
    for item in list(preferred) + popular[: n + len(seen) + len(preferred)].tolist():
        if len(picked) == n:
            break
        if item > 0 and item not in seen and item not in picked:
            picked.append(int(item))
    return picked


@torch.no_grad()
def top_unseen(model, histories: list[list[int]], max_len: int, k: int, batch_size: int = 512) -> list[list[int]]:
    """Each history's k best-scored items after it, history excluded, best first."""
    out: list[list[int]] = []
    for start in range(0, len(histories), batch_size):
        part = histories[start:start + batch_size]
        recent = [h[-max_len:] for h in part]
        item_seq = torch.zeros(len(part), max_len, dtype=torch.long)
        seen = torch.zeros(len(part), max(len(h) for h in part), dtype=torch.long)
        for row, (r, h) in enumerate(zip(recent, part)):
            item_seq[row, : len(r)] = torch.as_tensor(r)
            seen[row, : len(h)] = torch.as_tensor(h)
        scores = model.full_sort_predict({"item_seq": item_seq, "item_seq_len": torch.tensor([len(r) for r in recent])})
        out += mask_seen(scores, seen).topk(k, dim=1).indices.tolist()
    return out


def load_fold_model(cfg: Config, fold: int):
    """The backbone trained without `fold`'s users; refuses a model whose meta says otherwise."""
    folds = cfg.data.folds
    model_dir = cfg.model_dir(fold_model_name(cfg.train.backbone, fold, folds))
    if not (model_dir / "model.pt").is_file():
        raise DataError(f"teacher.candidates=backbone needs the cross-fitted {cfg.train.backbone} models "
                        f"({model_dir} is missing): run `slim-ray train-folds` first, or set "
                        "teacher.candidates=popular")
    model, meta = load_trained(model_dir)
    if meta.get("holdout_fold") != fold or meta.get("folds") != folds:
        raise DataError(f"{model_dir} was not trained without fold {fold} of {folds} (meta: holdout_fold="
                        f"{meta.get('holdout_fold')}, folds={meta.get('folds')})")
    return model, meta


def checkpoint_candidates(rows: pd.DataFrame, sequences: pd.DataFrame, n_items: int, cfg: Config
                          ) -> tuple[list[list[int]], np.ndarray]:
    """Candidate ids for each (user_id, cut, history_ids) row, cross-fitted as described above, and the
    fold whose users the models behind each list never saw (from the fold model's own meta.json)."""
    tc, folds = cfg.teacher, cfg.data.folds
    popular = popular_by_fold(sequences, n_items, folds)
    user_fold = fold_of(rows["user_id"].to_numpy(), folds)
    unseen_fold = user_fold.copy()  # popular_by_fold[f] counts no user of fold f
    histories = [list(map(int, h)) for h in rows["history_ids"]]
    preferred: list[list[int]] = [[] for _ in histories]
    if tc.candidates == "backbone":
        k = min(tc.backbone_candidates, tc.n_candidates)
        for fold in range(folds):
            where = np.flatnonzero(user_fold == fold)
            if len(where):
                model, meta = load_fold_model(cfg, fold)
                unseen_fold[where] = meta["holdout_fold"]
                for row, top in zip(where, top_unseen(model, [histories[r] for r in where], meta["max_len"], k)):
                    preferred[row] = top
    lists = [fill(pref, set(h), popular[f], tc.n_candidates) for pref, h, f in zip(preferred, histories, user_fold)]
    return lists, unseen_fold
