"""SLIM fusion: the paper's formulas, rationale lookup per checkpoint, and cold-start text matching.
(A fused model trained on Ray Train from a real backfill is exercised by tests/test_serve.py.)"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from slim_ray.evaluation import full_ranks
from slim_ray.fusion import FusedRecommender, TextMatcher, build_model, rationale_table, split_text
from slim_ray.models import build_backbone


def test_fused_vectors_follow_the_paper():
    torch.manual_seed(0)
    text = torch.randn(6, 8)
    model = FusedRecommender(build_backbone("GRU4Rec", 6, 4), text, use_rationale=True)
    z_id = model.backbone.item_vectors()
    expected_items = model.g_f(torch.cat([model.g_l(text), z_id], 1))
    assert torch.allclose(model.item_vectors(), expected_items)
    batch = {"item_seq": torch.tensor([[1, 2, 0, 0]]), "item_seq_len": torch.tensor([2]),
             "user_text": torch.randn(1, 8)}
    model.eval()
    s_seq = model.backbone.seq_vectors(batch["item_seq"], batch["item_seq_len"])
    assert torch.allclose(model.user_vectors(batch), model.g_f(torch.cat([model.g_l(batch["user_text"]), s_seq], 1)))
    text_only = FusedRecommender(build_backbone("GRU4Rec", 6, 4), text, use_rationale=False).eval()
    assert torch.allclose(text_only.user_vectors(batch), text_only.backbone.seq_vectors(batch["item_seq"], batch["item_seq_len"]))
    with pytest.raises(ValueError, match="backfill"):
        build_model("slim", "SASRec", 6, 4, {}, None)


def test_rationale_table_serves_rows_by_checkpoint():
    sequences = pd.DataFrame({"user_id": [1, 2], "item_ids": [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10]]})
    rows = pd.DataFrame({"user_id": [1, 1, 1, 2], "cut": [3, 4, 5, 2],
                         "embedding": [np.full(2, 1.0), np.full(2, 2.0), np.full(2, 3.0), np.full(2, 4.0)]})
    vectors, index = rationale_table(rows)
    assert vectors[0].tolist() == [0, 0] and vectors[1:].tolist() == [[1, 1], [2, 2], [3, 3], [4, 4]]
    assert split_text(vectors, index, sequences, "test")[1].tolist() == [3, 3]  # its own cut n-1 = 5
    assert split_text(vectors, index, sequences, "valid")[1].tolist() == [2, 2]
    # user 2 has only a valid checkpoint (cut 2): its test row (t = 3) uses it, never a later one
    assert split_text(vectors, index, sequences, "test")[2].tolist() == [4, 4]
    assert index.row_for(1, 2) == 0 and index.row_for(1, 3) == 1  # before the first checkpoint: none


def _genre_world(seed: int = 0):
    """5 genres x 8 items; text = genre one-hot + noise; users want one genre. The last 2 items of
    each genre never appear in training (cold), and every test target is a cold item."""
    rng = np.random.default_rng(seed)
    genres, per = 5, 8
    n_items = genres * per + 1
    genre = np.zeros(n_items, dtype=int)
    genre[1:] = np.repeat(np.arange(genres), per)
    text = np.zeros((n_items, 16), dtype=np.float32)
    text[1:, :genres] = np.eye(genres)[genre[1:]]
    text[1:] += 0.1 * rng.standard_normal((n_items - 1, 16)).astype(np.float32)
    warm = [i for i in range(1, n_items) if (i - 1) % per < per - 2]
    cold = [i for i in range(1, n_items) if (i - 1) % per >= per - 2]

    def users(n, targets):
        g = rng.integers(0, genres, n)
        seq = np.array([rng.choice([i for i in warm if genre[i] == x], 3) for x in g])
        rationale = np.eye(genres, 16, dtype=np.float32)[g] + 0.1 * rng.standard_normal((n, 16)).astype(np.float32)
        target = np.array([rng.choice([i for i in targets if genre[i] == x]) for x in g])
        return {"item_seq": torch.as_tensor(seq), "item_seq_len": torch.full((n,), 3),
                "user_text": torch.as_tensor(rationale), "pos_item": torch.as_tensor(target)}
    return torch.as_tensor(text), users(512, warm), users(100, cold)


def _fit(model, batch, steps=150):
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(steps):
        opt.zero_grad()
        model.calculate_loss(batch).backward()
        opt.step()
    return model.eval()


def test_text_matching_ranks_items_never_seen_in_training():
    torch.manual_seed(0)
    text, train, test = _genre_world()
    matcher = _fit(TextMatcher(len(text), 3, text, hidden_size=16), train)
    id_based = _fit(build_backbone("GRU4Rec", len(text), 3, embedding_size=16, hidden_size=16), train)
    hits = {}
    with torch.no_grad():
        for name, model in (("text", matcher), ("id", id_based)):
            ranks = full_ranks(model.full_sort_predict(test), test["pos_item"], test["item_seq"])
            hits[name] = float((ranks < 8).float().mean())
    assert hits["text"] >= 0.9, hits  # a cold target ranks among its genre's items
    assert hits["id"] < 0.5, hits     # untrained ids carry no signal


@pytest.mark.parametrize("backbone", ["SASRec", "GRU4Rec"])
def test_all_positions_loss_is_the_prefix_loss_over_the_same_targets(backbone):
    """One window with a target (and its own rationale vector) after every position scores exactly what
    the prefix rows of the same targets score: the per-position outputs see nothing after their position."""
    torch.manual_seed(0)
    text = torch.randn(10, 8)
    model = FusedRecommender(build_backbone(backbone, 10, 5), text, use_rationale=True).eval()
    seq, targets, user_text = [3, 1, 4, 1, 5], [1, 4, 1, 5, 9], torch.randn(5, 8)
    window = {"item_seq": torch.tensor([seq]), "item_seq_len": torch.tensor([5]), "pos_item": torch.tensor([targets]),
              "user_text": user_text[None]}
    prefixes = {"item_seq": torch.tensor([seq[:t] + [0] * (5 - t) for t in range(1, 6)]),
                "item_seq_len": torch.arange(1, 6), "pos_item": torch.tensor(targets), "user_text": user_text}
    assert torch.allclose(model.calculate_loss(window), model.calculate_loss(prefixes), atol=1e-5)
    later = dict(window, item_seq=torch.tensor([seq[:3] + [7, 8]]))  # other items after position 2
    assert torch.allclose(model.position_vectors(later)[0, :3], model.position_vectors(window)[0, :3], atol=1e-5)
    window["pos_item"] = torch.tensor([[1, 4, 1, 0, 0]])  # 0 = no target: the loss covers the first 3
    prefixes = {k: v[:3] for k, v in prefixes.items()}
    assert torch.allclose(model.calculate_loss(window), model.calculate_loss(prefixes), atol=1e-5)
