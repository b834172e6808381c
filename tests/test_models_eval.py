from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from slim_ray.evaluation import (
    evaluate, full_ranks, item_popularity, popularity_metrics, rank_metrics, sample_negatives,
    sampled_ranks, split_arrays,
)
from slim_ray.models import BACKBONES, FastDropout, build_backbone, session_graph


def _batch(n_items=30, batch=4, max_len=6):
    torch.manual_seed(0)
    seq = torch.randint(1, n_items, (batch, max_len))
    lens = torch.tensor([max_len, 3, 1, 4])
    seq[torch.arange(max_len)[None] >= lens[:, None]] = 0
    return {"item_seq": seq, "item_seq_len": lens, "pos_item": torch.randint(1, n_items, (batch,)),
            "candidates": torch.randint(1, n_items, (batch, 5))}


@pytest.mark.parametrize("name", list(BACKBONES))
def test_backbone_interface_and_learning(name):
    torch.manual_seed(0)
    model = build_backbone(name, 30, 6)
    batch = _batch()
    scores = model.full_sort_predict(batch)
    assert scores.shape == (4, 30)
    model.eval()
    # predict() agrees with full_sort_predict() on the candidates
    full = model.full_sort_predict(batch)
    assert torch.allclose(model.predict(batch), full.gather(1, batch["candidates"]), atol=1e-5)
    # padding beyond item_seq_len never changes the representation
    padded = dict(batch, item_seq=batch["item_seq"].clone())
    padded["item_seq"][1, 3:] = 0
    assert torch.allclose(model.seq_vectors(padded["item_seq"], batch["item_seq_len"]),
                          model.seq_vectors(batch["item_seq"], batch["item_seq_len"]), atol=1e-5)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = model(batch).item()
    for _ in range(30):
        optimizer.zero_grad()
        model(batch).backward()
        optimizer.step()
    assert model(batch).item() < first - 0.5  # it can fit four examples


def test_session_graph_matches_recbole_construction():
    seq = torch.tensor([[5, 3, 5, 7, 0, 0]])
    nodes, alias, adjacency = session_graph(seq)
    assert nodes[0].tolist() == [0, 3, 5, 7, 0, 0]
    assert alias[0].tolist() == [2, 1, 2, 3, 0, 0]
    n = 6
    incoming, outgoing = adjacency[0, :, :n], adjacency[0, :, n:]
    # edges 5->3, 3->5, 5->7 (node ids 2->1, 1->2, 2->3); node 5 has two outgoing edges.
    assert outgoing[2, 1] == 0.5 and outgoing[2, 3] == 0.5 and outgoing[1, 2] == 1.0
    assert incoming[1, 2] == 1.0 and incoming[2, 1] == 1.0 and incoming[3, 2] == 1.0
    assert adjacency[0].sum() == 5.0  # 3 normalised incoming rows + 2 outgoing rows


def test_fast_dropout_rate_and_scale():
    torch.manual_seed(0)
    layer = FastDropout(0.3).train()
    out = layer(torch.ones(200_000))
    kept = (out > 0).float().mean()
    assert abs(float(kept) - (1 - 77 / 256)) < 0.005
    assert abs(float(out.mean()) - 1.0) < 0.01
    assert torch.equal(layer.eval()(torch.ones(5)), torch.ones(5))


def test_full_ranks_mask_history_but_not_target():
    scores = torch.tensor([[9.0, 1.0, 5.0, 4.0, 3.0, 2.0]])
    history = torch.tensor([[2, 4, 0]])
    # item 4 is the target and also in history: it stays; item 2 is masked; item 0 is padding.
    assert full_ranks(scores, torch.tensor([4]), history).tolist() == [1]  # only item 3 above
    assert full_ranks(scores, torch.tensor([5]), history).tolist() == [1]  # 4 is masked now
    # RecBole's sequential protocol: history items stay rankable (items 2, 3 and 4 beat item 5)
    assert full_ranks(scores, torch.tensor([5]), history, mask_history=False).tolist() == [3]
    assert sampled_ranks(torch.tensor([[0.5, 0.9, 0.1, 0.7]])).tolist() == [2]


def test_rank_metrics_hand_computed():
    m = rank_metrics(np.array([0, 3, 12]))
    assert m["hr@5"] == pytest.approx(2 / 3) and m["hr@20"] == pytest.approx(1.0)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(5)) / 3)
    assert m["ndcg@20"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(14)) / 3)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 4) / 3)


def test_popularity_metrics_hand_computed():
    norm = sum(1 / math.log2(j + 2) for j in range(10))
    m = popularity_metrics(np.array([0, 2, 15]), np.array([0.5, 0.25, 0.1]))
    assert m["epc@10"] == pytest.approx((1 * 0.5 + 0.5 * 0.75) / norm / 3)
    assert m["efd@10"] == pytest.approx((1 * 1.0 + 0.5 * 2.0) / norm / 3)


def test_negative_sampling_is_seeded_and_unseen():
    seen = [{1, 2, 3}, {4, 5}]
    a = sample_negatives(60, seen, 20, seed=7)
    assert np.array_equal(a, sample_negatives(60, seen, 20, seed=7))
    assert not np.array_equal(a, sample_negatives(60, seen, 20, seed=8))
    for row, items in zip(a, seen):
        assert len(set(row)) == 20 and not set(row) & items and row.min() >= 1 and row.max() < 60


def test_item_popularity_counts_users_once():
    counts, share = item_popularity(pd.Series([[1, 1, 2], [2, 3]]), 5)
    assert counts.tolist() == [0, 2, 2, 1, 0]
    assert share.tolist() == [0.5, 0.5, 1.0, 0.5, 0.5]  # unseen items count as one user


class _Oracle(torch.nn.Module):
    """Scores items by a fixed table, to check `evaluate` end to end."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.as_tensor(table, dtype=torch.float32)

    def full_sort_predict(self, batch):
        return self.table[: len(batch["item_seq"])]

    def predict(self, batch):
        return self.full_sort_predict(batch).gather(1, batch["candidates"])


def test_evaluate_end_to_end_on_a_tiny_split():
    sequences = pd.DataFrame({
        "item_ids": [[1, 2, 3, 4], [2, 3, 5]],
        "train_item_ids": [[1, 2], [2]],
        "valid_target": [3, 3], "test_target": [4, 5],
    })
    arrays = split_arrays(sequences, "test", max_len=2)
    assert arrays["item_seq"].tolist() == [[2, 3], [2, 3]]
    assert arrays["history"].tolist() == [[1, 2, 3], [2, 3, 0]]
    # user 0: target 4 outranked only by masked history items -> rank 0; user 1: target 5 below 1, 4.
    table = [[0, 9, 8, 7, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0],
             [0, 9, 8, 7, 6, 5, 0, 0, 0, 0, 0, 0, 0, 0]]
    report = evaluate(_Oracle(table), sequences, n_items=14, max_len=2, negatives=3, seed=1)
    assert report["full"]["hr@5"] == 1.0
    assert report["full"]["ndcg@5"] == pytest.approx((1 + 1 / math.log2(4)) / 2)
    assert report["cold"]["users"] == 2  # both targets have <= 5 training interactions
    assert report["protocol"]["full_ranking_masks_history"] is True
    assert set(report["sampled3"]) >= {"hr@10", "ndcg@10", "mrr@10"}
