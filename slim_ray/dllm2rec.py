"""DLLM2Rec-style distillation (Cui et al., RecSys 2024) on any backbone, alone or on top of SLIM.

Two parts, as in the paper:
  importance-aware ranking distillation: the items an LLM recommends for a user (here the step-3
    titles of the rationale for that prefix, resolved to catalogue ids) become soft targets, each
    weighted by position (w_p = exp(-rank / beta)), confidence (w_c = exp(-d / beta), d = 1 - how
    closely the generated name matches the catalogue title) and consistency (w_o = 1 when the
    backbone's own current top-K also holds the item);
  collaborative embedding distillation: the LLM-side item vector (the item text vector) goes
    through an MLP into the backbone's item space and is added to its item vectors.
Our backbones train with cross-entropy over all items, so the ranking term is a weighted soft-label
cross-entropy (log-softmax over all items) rather than the paper's log-sigmoid for BCE backbones:
same targets and weights, on the scale of the loss it is added to. Under train.objective=all_positions
every target of a window takes its own checkpoint's items, as its prefix row would.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from slim_ray.config import DLLM2RecConfig
from slim_ray.models import SequentialRecommender
from slim_ray.prompts import TitleIndex, parse_rationale, split_names


# ---------------------------------------------------------------- rationales -> targets (pure)

def named_item_targets(text: str, index: TitleIndex, seen: set[int], top_k: int) -> tuple[list[int], list[float]]:
    """Step-3 names of one rationale -> (catalogue ids, name-match confidence in [0, 1]), in the
    order named, without items already in the prefix's history and without repeats."""
    ids, confidence = [], []
    for name in split_names(parse_rationale(text).steps[2]):
        found = index.match(name)
        if found is None or found[0] in seen or found[0] in ids:
            continue
        ids.append(found[0])
        confidence.append(found[1])
        if len(ids) == top_k:
            break
    return ids, confidence


def target_matrices(rows: pd.DataFrame, histories: list[set[int]], index: TitleIndex, top_k: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """[len(rows), top_k] target ids (0 = none) and confidences, one line per rationale row."""
    ids = np.zeros((len(rows), top_k), dtype=np.int64)
    confidence = np.zeros((len(rows), top_k), dtype=np.float32)
    for r, (text, seen) in enumerate(zip(rows["rationale"], histories)):
        found, conf = named_item_targets(text, index, seen, top_k)
        ids[r, : len(found)], confidence[r, : len(conf)] = found, conf
    return ids, confidence


def distill_targets(rows: pd.DataFrame, items: pd.DataFrame, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """[rows + 1, top_k] target ids (0 = none) and confidences of the backfill's checkpoint rows, each
    without the items of its own history; row 0 is empty. Aligned with `fusion.rationale_table`, so a
    training row takes the targets of the same checkpoint as its rationale vector."""
    histories = [set(int(i) for i in h) for h in rows["history_ids"]]
    ids, confidence = target_matrices(rows, histories, TitleIndex.from_items(items["item_id"], items["title"]), top_k)
    return np.concatenate([np.zeros((1, top_k), ids.dtype), ids]), np.concatenate([np.zeros((1, top_k), confidence.dtype), confidence])


def importance_weights(target_ids: torch.Tensor, confidence: torch.Tensor, logits: torch.Tensor,
                       cfg: DLLM2RecConfig) -> torch.Tensor:
    """[B, K] weights of the LLM's items, zero where there is no target; rows sum to 1 (or 0)."""
    present = (target_ids > 0).float()
    rank = torch.arange(target_ids.size(1), device=logits.device, dtype=torch.float32)
    position = torch.exp(-rank / cfg.position_beta).expand_as(present)
    conf = torch.exp(-(1.0 - confidence.float()) / cfg.confidence_beta)
    top = logits.detach().topk(min(cfg.consistency_top_k, logits.size(1)), dim=1).indices  # [B, K']
    consistent = (target_ids[:, :, None] == top[:, None, :]).any(-1).float()
    weights = (cfg.position_weight * position + cfg.confidence_weight * conf
               + cfg.consistency_weight * consistent) * present
    return weights / weights.sum(1, keepdim=True).clamp(min=1e-12)


# ---------------------------------------------------------------- model

class DLLM2Rec(SequentialRecommender):
    """Wraps a backbone (or a SLIM-fused one): item vectors gain MLP(item text) and the loss gains
    the weighted ranking-distillation term when a batch carries `teacher_items` / `teacher_conf`."""

    def __init__(self, inner: SequentialRecommender, item_text: torch.Tensor, cfg: DLLM2RecConfig):
        super().__init__(inner.n_items, inner.max_len)
        self.inner, self.cfg = inner, cfg
        dim = inner.item_embedding.embedding_dim
        self.register_buffer("item_text", item_text.float())
        self.projector = nn.Sequential(nn.Linear(item_text.size(1), dim), nn.ReLU(), nn.Linear(dim, dim))

    @property
    def item_embedding(self) -> nn.Embedding:
        return self.inner.item_embedding

    def item_vectors(self) -> torch.Tensor:
        return self.inner.item_vectors() + self.cfg.embedding_weight * self.projector(self.item_text)

    def seq_vectors(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        return self.inner.seq_vectors(item_seq, item_seq_len)

    def user_vectors(self, batch: dict) -> torch.Tensor:
        return self.inner.user_vectors(batch)

    def seq_outputs(self, item_seq: torch.Tensor) -> torch.Tensor:
        return self.inner.seq_outputs(item_seq)

    def position_vectors(self, batch: dict) -> torch.Tensor:
        return self.inner.position_vectors(batch)

    def calculate_loss(self, batch: dict) -> torch.Tensor:
        pos_item, item_seq = batch["pos_item"].long(), batch["item_seq"].long()
        windowed = pos_item.dim() == 2  # all positions: every target of a window is a row of its own
        if windowed:
            present = pos_item > 0
            logits = self.position_vectors(batch)[present] @ self.item_vectors().t()
            pos_item = pos_item[present]
        else:
            logits = self.full_sort_predict(batch)
        loss = F.cross_entropy(logits, pos_item)
        if "teacher_items" not in batch:
            return loss
        targets, confidence = batch["teacher_items"].long(), batch["teacher_conf"]
        # a checkpoint's named items may be in the target's own history (items seen between the cut and
        # the target): never distil a seen item as a positive. In a window that history ends at the
        # target's position.
        if windowed:
            upto = torch.arange(item_seq.size(1), device=item_seq.device)
            upto = upto[None, :] <= upto[:, None]  # [p, j]: j <= p
            seen = ((targets[..., None] == item_seq[:, None, None, :]) & upto[None, :, None, :]).any(-1)
            targets, confidence = (targets * ~seen)[present], confidence[present]
        else:
            targets = targets * ~(targets[:, :, None] == item_seq[:, None, :]).any(-1)
        weights = importance_weights(targets, confidence, logits, self.cfg)
        distill = -(weights * logits.log_softmax(1).gather(1, targets)).sum(1)  # 0 for rows without targets
        return loss + self.cfg.ranking_weight * distill.mean()
