"""Leave-one-out evaluation: full ranking and sampled-100 protocols, accuracy + popularity-bias metrics.

Pure functions on tensors/arrays; `evaluate` drives a model over a prepared split.

Definitions (rank r is 0-based: the number of candidates scored strictly above the target):
  HR@K = 1[r < K];  NDCG@K = 1[r < K] / log2(r + 2);  MRR@K = 1[r < K] / (r + 1)
  EPC@K = 1[r < K] * disc(r) * (1 - p(t)) / sum_{k<K} disc(k)        disc(k) = 1 / log2(k + 2)
  EFD@K = 1[r < K] * disc(r) * -log2 p(t) / sum_{k<K} disc(k)
with p(i) = share of users whose training history contains i (at least one user, so EFD is finite),
averaged over users. With one relevant item per user these are Vargas & Castells' rank- and
relevance-aware novelty metrics, as used in the SLIM paper's popularity-bias table.
Full ranking masks the padding id and every history item except the target itself (mask_history=
False keeps history items rankable: RecBole's protocol for sequential models, used to compare with it).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from slim_ray.prefixes import split_prefix

KS = (5, 10, 20)
COLD_MAX_TRAIN_INTERACTIONS = 5


def full_ranks(scores: torch.Tensor, targets: torch.Tensor, history: torch.Tensor,
               mask_history: bool = True) -> torch.Tensor:
    """scores [B, N], targets [B], history [B, H] (0-padded) -> 0-based ranks [B].

    mask_history=False is RecBole's protocol for sequential models (seen items stay rankable).
    """
    scores = mask_seen(scores.clone(), history if mask_history else None, keep=targets)
    target_scores = scores.gather(1, targets.long()[:, None])
    return (scores > target_scores).sum(1)


def mask_seen(scores: torch.Tensor, history: torch.Tensor | None, keep: torch.Tensor | None = None) -> torch.Tensor:
    """In place: padding id 0 and every history item (0-padded [B, H]) get -inf, except `keep` [B]."""
    scores[:, 0] = -torch.inf
    if history is not None:
        rows = torch.arange(scores.size(0))[:, None].expand_as(history)
        hide = history != keep[:, None] if keep is not None else torch.ones_like(history, dtype=torch.bool)
        scores[rows[hide], history[hide].long()] = -torch.inf
    return scores


def sampled_ranks(candidate_scores: torch.Tensor) -> torch.Tensor:
    """candidate_scores [B, 1 + negatives], target in column 0 -> 0-based ranks [B]."""
    return (candidate_scores[:, 1:] > candidate_scores[:, :1]).sum(1)


def sample_negatives(n_items: int, seen: list[set[int]], count: int, seed: int) -> np.ndarray:
    """For each user, `count` distinct items from 1..n_items-1 that the user never interacted with."""
    rng = np.random.default_rng(seed)
    out = np.empty((len(seen), count), dtype=np.int64)
    for row, items in enumerate(seen):
        if n_items - 1 - len(items) < count:
            raise ValueError(f"user row {row}: fewer than {count} unseen items to sample")
        picked: list[int] = []
        while len(picked) < count:
            for item in rng.integers(1, n_items, size=2 * count):
                if item not in items and item not in picked:
                    picked.append(int(item))
                    if len(picked) == count:
                        break
        out[row] = picked
    return out


def rank_metrics(ranks: np.ndarray, ks=KS) -> dict[str, float]:
    ranks = np.asarray(ranks)
    out = {}
    for k in ks:
        hit = ranks < k
        out[f"hr@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float((hit / np.log2(ranks + 2)).mean())
    out["mrr@10"] = float(((ranks < 10) / (ranks + 1)).mean())
    return out


def popularity_metrics(ranks: np.ndarray, target_pop: np.ndarray, k: int = 10) -> dict[str, float]:
    """EFD@k and EPC@k; target_pop = p(t) of each user's target."""
    ranks, p = np.asarray(ranks), np.asarray(target_pop, dtype=np.float64)
    norm = sum(1.0 / math.log2(j + 2) for j in range(k))
    gain = (ranks < k) / np.log2(ranks + 2) / norm
    return {f"efd@{k}": float((gain * -np.log2(p)).mean()), f"epc@{k}": float((gain * (1 - p)).mean())}


def item_popularity(train_sequences: pd.Series, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """(interaction counts, share of users with the item) over training histories, indexed by item id."""
    counts = np.zeros(n_items, dtype=np.int64)
    user_counts = np.zeros(n_items, dtype=np.int64)
    for seq in train_sequences:
        seq = np.asarray(seq, dtype=np.int64)
        np.add.at(counts, seq, 1)
        user_counts[np.unique(seq)] += 1
    share = np.maximum(user_counts, 1) / max(len(train_sequences), 1)
    return counts, share


def split_arrays(sequences: pd.DataFrame, split: str, max_len: int,
                 user_text: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """Model inputs, targets and full histories (for masking) of the valid or test split;
    user_text [n_users + 1, T] (rationale vectors by user id) adds each row's `user_text`."""
    if split not in ("valid", "test"):
        raise ValueError(f"split must be valid or test, got {split!r}")
    full_history = [split_prefix(s, split)[0] for s in sequences["item_ids"]]
    inputs = [h[-max_len:] for h in full_history]
    item_seq = torch.zeros(len(inputs), max_len, dtype=torch.long)
    for row, h in enumerate(inputs):
        item_seq[row, : len(h)] = torch.as_tensor(h)
    width = max(len(h) for h in full_history)
    history = torch.zeros(len(full_history), width, dtype=torch.long)
    for row, h in enumerate(full_history):
        history[row, : len(h)] = torch.as_tensor(h)
    arrays = {"item_seq": item_seq, "item_seq_len": torch.tensor([len(h) for h in inputs]),
              "target": torch.tensor(sequences[f"{split}_target"].to_numpy(), dtype=torch.long),
              "history": history}
    if user_text is not None:
        arrays["user_text"] = torch.from_numpy(np.asarray(user_text)[sequences["user_id"].to_numpy()])
    return arrays


@torch.no_grad()
def score_full(model, arrays: dict, batch_size: int = 512, mask_history: bool = True) -> np.ndarray:
    ranks = []
    for start in range(0, len(arrays["target"]), batch_size):
        part = {k: v[start:start + batch_size] for k, v in arrays.items()}
        ranks.append(full_ranks(model.full_sort_predict(part), part["target"], part["history"], mask_history))
    return torch.cat(ranks).numpy()


@torch.no_grad()
def score_sampled(model, arrays: dict, negatives: np.ndarray, batch_size: int = 512) -> np.ndarray:
    candidates = torch.cat([arrays["target"][:, None], torch.as_tensor(negatives)], dim=1)
    ranks = []
    for start in range(0, len(candidates), batch_size):
        part = {k: v[start:start + batch_size] for k, v in arrays.items()}
        part["candidates"] = candidates[start:start + batch_size]
        ranks.append(sampled_ranks(model.predict(part)))
    return torch.cat(ranks).numpy()


def evaluate(model, sequences: pd.DataFrame, n_items: int, max_len: int, split: str = "test",
             negatives: int = 100, seed: int = 42, mask_history: bool = True,
             user_text: np.ndarray | None = None) -> dict:
    """All metrics for one split. `model` follows the SequentialRecommender interface."""
    was_training = model.training
    model.eval()
    arrays = split_arrays(sequences, split, max_len, user_text)
    full = score_full(model, arrays, mask_history=mask_history)
    seen = [set(int(i) for i in s) for s in sequences["item_ids"]]
    sampled = score_sampled(model, arrays, sample_negatives(n_items, seen, negatives, seed))
    counts, share = item_popularity(sequences["train_item_ids"], n_items)
    targets = arrays["target"].numpy()
    cold = counts[targets] <= COLD_MAX_TRAIN_INTERACTIONS
    model.train(was_training)
    return {
        "split": split, "users": int(len(targets)),
        "full": {**rank_metrics(full), **popularity_metrics(full, share[targets])},
        f"sampled{negatives}": rank_metrics(sampled),
        "cold": {"users": int(cold.sum()), **(rank_metrics(full[cold]) if cold.any() else {})},
        "protocol": {"full_ranking_masks_history": mask_history, "negatives": negatives, "seed": seed,
                     "cold_item_max_train_interactions": COLD_MAX_TRAIN_INTERACTIONS},
    }
