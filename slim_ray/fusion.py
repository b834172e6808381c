"""SLIM fusion: rationale and item-text vectors inside any backbone, and ID-agnostic text matching.

ID-based (the paper's formulas, g_l and g_f linear, shared by items and users):
    z_i = g_f([g_l(z_i^text); z_i^id])        s_u = g_f([g_l(s_u^text); s_u^seq])
  variant `text`: only the item side is fused (item texts, no rationale);
  variant `slim`: both sides, s_u^text = the student's rationale vector for that prefix.
ID-agnostic (`text_match`): z_i = g_t(z_i^text), s_u = g_t(s_u^text [+ mean text of the history]);
  items are scored from their text alone, so items never seen in training are ranked too.

Text vectors are frozen (from the backfill); every batch of a fused model carries `user_text`
[B, T] (or [B, L, T], one per target position, under train.objective=all_positions): the vector of
the rationale written at the row's latest checkpoint before its target (`slim_ray.prefixes`; zeros
when the row has none), never one whose history holds the target.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from slim_ray.models import SequentialRecommender, build_backbone
from slim_ray.prefixes import CheckpointIndex

VARIANTS = ("none", "text", "slim", "text_match")
RATIONALE_VECTORS = {"all": "embedding", "step1": "step1_embedding", "step2": "step2_embedding",
                     "step3": "step3_embedding"}


class FusedRecommender(SequentialRecommender):
    def __init__(self, backbone: SequentialRecommender, item_text: torch.Tensor, use_rationale: bool):
        super().__init__(backbone.n_items, backbone.max_len)
        self.backbone, self.use_rationale = backbone, use_rationale
        dim = backbone.item_embedding.embedding_dim
        self.register_buffer("item_text", item_text.float())
        self.g_l = nn.Linear(item_text.size(1), dim)
        self.g_f = nn.Linear(2 * dim, dim)

    @property
    def item_embedding(self) -> nn.Embedding:
        return self.backbone.item_embedding

    def item_vectors(self) -> torch.Tensor:
        return self.g_f(torch.cat([self.g_l(self.item_text), self.backbone.item_vectors()], dim=1))

    def seq_vectors(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        return self.backbone.seq_vectors(item_seq, item_seq_len)

    def seq_outputs(self, item_seq: torch.Tensor) -> torch.Tensor:
        return self.backbone.seq_outputs(item_seq)

    def user_vectors(self, batch: dict) -> torch.Tensor:
        return self._fuse(batch, self.seq_vectors(batch["item_seq"], batch["item_seq_len"]))

    def position_vectors(self, batch: dict) -> torch.Tensor:
        return self._fuse(batch, self.seq_outputs(batch["item_seq"]))  # user_text [B, L, T]: per position

    def _fuse(self, batch: dict, seq: torch.Tensor) -> torch.Tensor:
        if not self.use_rationale:
            return seq
        return self.g_f(torch.cat([self.g_l(batch["user_text"].float()), seq], dim=-1))


class TextMatcher(SequentialRecommender):
    """ID-agnostic: no item-id parameters at all, so any item with a text vector can be ranked."""

    def __init__(self, n_items: int, max_len: int, item_text: torch.Tensor, hidden_size: int = 64,
                 with_history: bool = True):
        super().__init__(n_items, max_len)
        self.with_history = with_history
        self.register_buffer("item_text", item_text.float())
        self.g_t = nn.Linear(item_text.size(1), hidden_size)

    def item_vectors(self) -> torch.Tensor:
        return self.g_t(self.item_text)

    def seq_vectors(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        present = (item_seq > 0).float()[:, :, None]
        return (self.item_text[item_seq.long()] * present).sum(1) / present.sum(1).clamp(min=1)

    def user_vectors(self, batch: dict) -> torch.Tensor:
        text = batch["user_text"].float()
        if self.with_history:
            text = text + self.seq_vectors(batch["item_seq"], batch["item_seq_len"])
        return self.g_t(text)


def build_model(fusion: str, backbone: str, n_items: int, max_len: int, model_kwargs: dict,
                item_text: torch.Tensor | None, dllm2rec: dict | None = None) -> SequentialRecommender:
    if fusion == "none":
        return build_backbone(backbone, n_items, max_len, **model_kwargs)
    if item_text is None:
        raise ValueError(f"fusion={fusion!r} needs item text vectors (run `slim-ray backfill` first)")
    if fusion == "text_match":
        return TextMatcher(n_items, max_len, item_text)
    if fusion in ("dllm2rec", "slim+dllm2rec"):
        from slim_ray.config import DLLM2RecConfig
        from slim_ray.dllm2rec import DLLM2Rec

        inner = build_model("slim" if fusion == "slim+dllm2rec" else "none", backbone, n_items, max_len,
                            model_kwargs, item_text)
        return DLLM2Rec(inner, item_text, DLLM2RecConfig(**(dllm2rec or {})))
    return FusedRecommender(build_backbone(backbone, n_items, max_len, **model_kwargs), item_text,
                            use_rationale=fusion == "slim")


def load_trained(model_dir: Path):
    """(model in eval mode, meta) of an exported model folder (model.pt + meta.json)."""
    meta = json.loads(Path(model_dir, "meta.json").read_text())
    state = torch.load(Path(model_dir, "model.pt"))
    model = build_model(meta.get("fusion", "none"), meta["backbone"], meta["n_items"], meta["max_len"],
                        meta["model"], state.get("item_text"), meta.get("dllm2rec"))
    model.load_state_dict(state)
    return model.eval(), meta


def uses_rationale(fusion: str) -> bool:
    return fusion in ("slim", "text_match", "slim+dllm2rec")


# ---------------------------------------------------------------- backfill output -> tensors

def item_text_matrix(items: pd.DataFrame, n_items: int) -> torch.Tensor:
    """[n_items, T] with row 0 (padding) zero, from the backfill's items table."""
    vectors = np.stack(items["embedding"].to_numpy()).astype(np.float32)
    matrix = np.zeros((n_items, vectors.shape[1]), dtype=np.float32)
    matrix[items["item_id"].to_numpy()] = vectors
    return torch.from_numpy(matrix)


def rationale_table(rows: pd.DataFrame, which: str = "all") -> tuple[np.ndarray, CheckpointIndex]:
    """[rows + 1, T] rationale vectors of the backfill's checkpoint rows (row 0: no rationale, zeros)
    and their (user, cut) index; rows use them as `slim_ray.prefixes` says."""
    vectors = np.stack(rows[RATIONALE_VECTORS[which]].to_numpy()).astype(np.float32)
    return np.concatenate([np.zeros((1, vectors.shape[1]), np.float32), vectors]), CheckpointIndex(rows["user_id"], rows["cut"])


def split_text(vectors: np.ndarray, index: CheckpointIndex, sequences: pd.DataFrame, split: str) -> np.ndarray:
    """[n_users + 1, T] the rationale vector each user's valid or test row uses, by user id."""
    return vectors[index.split_rows(sequences, split)]
