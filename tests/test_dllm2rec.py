"""DLLM2Rec distillation: named items -> targets, importance weights by hand, the loss, and that
distilling the LLM's items teaches a backbone what plain CE on noisy targets does not."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from slim_ray.config import DLLM2RecConfig
from slim_ray.dllm2rec import DLLM2Rec, distill_targets, importance_weights, named_item_targets
from slim_ray.fusion import build_model
from slim_ray.models import build_backbone
from slim_ray.prompts import TitleIndex

TITLES = ["Heat (1995)", "Casino (1995)", "Toy Story (1995)", "Fargo (1996)", "Babe (1995)"]
RATIONALE = ("Step 1: Likes crime dramas.\nStep 2: Crime, Drama, Thriller\nStep 3:\n"
             "1. Fargo (1996)\n2. Toy Storyy\n3. Heat\n4. Nonexistent Movie\n5. Casino\n6. Babe")


def test_named_items_resolve_fuzzily_skip_history_and_unknowns():
    index = TitleIndex.from_items(range(1, 6), TITLES)
    ids, confidence = named_item_targets(RATIONALE, index, seen={1}, top_k=3)
    assert ids == [4, 3, 2]  # Heat (1) is in the history, the unknown title is dropped, capped at 3
    assert confidence[0] == 1.0 and 0.85 <= confidence[1] < 1.0 and confidence[2] == 1.0
    assert named_item_targets("Step 1: x\nStep 2: y", index, set(), 3) == ([], [])


def test_targets_are_per_checkpoint_row_without_that_rows_history():
    items = pd.DataFrame({"item_id": range(1, 6), "title": TITLES})
    rows = pd.DataFrame({"user_id": [1, 2], "cut": [2, 3], "history_ids": [[1, 2], [3, 1, 4]],
                         "rationale": [RATIONALE, RATIONALE]})
    ids, conf = distill_targets(rows, items, top_k=4)
    assert ids[0].tolist() == [0, 0, 0, 0] and conf[0].tolist() == [0, 0, 0, 0]  # row 0: no rationale
    assert ids[1].tolist() == [4, 3, 5, 0]  # history [1, 2]: Heat and Casino already seen
    assert ids[2].tolist() == [2, 5, 0, 0]  # history [3, 1, 4]: Fargo, Toy Story and Heat are seen


def test_importance_weights_by_hand():
    cfg = DLLM2RecConfig(position_weight=1, confidence_weight=1, consistency_weight=1, position_beta=1,
                         confidence_beta=0.5, consistency_top_k=1)
    target_ids = torch.tensor([[3, 1, 0], [0, 0, 0]])
    confidence = torch.tensor([[1.0, 0.9, 0.0], [0.0, 0.0, 0.0]])
    logits = torch.tensor([[0.0, 0.0, 0.0, 5.0], [0.0, 1.0, 0.0, 0.0]])  # row 0's top-1 is item 3
    w = importance_weights(target_ids, confidence, logits, cfg)
    raw = [1 + 1 + 1, math.exp(-1) + math.exp(-0.1 / 0.5) + 0]
    assert torch.allclose(w[0], torch.tensor([raw[0] / sum(raw), raw[1] / sum(raw), 0.0]))
    assert w[1].tolist() == [0, 0, 0]


def test_loss_adds_weighted_soft_label_term_and_text_projection():
    torch.manual_seed(0)
    text = torch.randn(6, 8)
    cfg = DLLM2RecConfig(ranking_weight=0.7, embedding_weight=0.5)
    model = DLLM2Rec(build_backbone("GRU4Rec", 6, 4), text, cfg).eval()
    assert torch.allclose(model.item_vectors(), model.inner.item_vectors() + 0.5 * model.projector(text))
    batch = {"item_seq": torch.tensor([[1, 2, 0, 0], [3, 0, 0, 0]]), "item_seq_len": torch.tensor([2, 1]),
             "pos_item": torch.tensor([4, 5])}
    logits = model.full_sort_predict(batch)
    ce = F.cross_entropy(logits, batch["pos_item"])
    assert torch.allclose(model.calculate_loss(batch), ce)
    targets = {"teacher_items": torch.tensor([[5, 3], [0, 0]]), "teacher_conf": torch.tensor([[1.0, 1.0], [0.0, 0.0]])}
    w = importance_weights(targets["teacher_items"], targets["teacher_conf"], logits, cfg)
    term = -(w[0, 0] * logits.log_softmax(1)[0, 5] + w[0, 1] * logits.log_softmax(1)[0, 3]) / 2
    assert torch.allclose(model.calculate_loss({**batch, **targets}), ce + 0.7 * term)
    # a named item already in the row's own history (seen after the checkpoint) is never a positive
    seen = {"teacher_items": torch.tensor([[5, 2], [0, 0]]), "teacher_conf": torch.tensor([[1.0, 1.0], [0.0, 0.0]])}
    w = importance_weights(torch.tensor([[5, 0], [0, 0]]), seen["teacher_conf"], logits, cfg)
    assert torch.allclose(model.calculate_loss({**batch, **seen}), ce + 0.7 * -(w[0, 0] * logits.log_softmax(1)[0, 5]) / 2)
    slim = build_model("slim+dllm2rec", "SASRec", 6, 4, {}, text, {"top_k": 2})
    assert isinstance(slim, DLLM2Rec) and slim.inner.use_rationale and slim.cfg.top_k == 2


def test_distilling_the_llm_items_teaches_what_noisy_targets_do_not():
    """Next item = last item + 1 (mod 20) only 30% of the time; the LLM always names last + 1.
    With distillation the backbone ranks last + 1 first for held-out histories far more often."""
    rng = np.random.default_rng(0)
    n_items, n = 21, 1024

    def rows(count):
        seq = torch.as_tensor(rng.integers(1, n_items, (count, 3)))
        follow = seq[:, -1] % (n_items - 1) + 1
        noisy = torch.where(torch.rand(count) < 0.3, follow, torch.as_tensor(rng.integers(1, n_items, count)))
        return {"item_seq": seq, "item_seq_len": torch.full((count,), 3), "pos_item": noisy}, follow

    train, train_follow = rows(n)
    test, test_follow = rows(400)
    teacher = {"teacher_items": train_follow[:, None], "teacher_conf": torch.ones(n, 1)}
    hit = {}
    for name, batch in (("ce", train), ("distilled", {**train, **teacher})):
        torch.manual_seed(0)
        model = DLLM2Rec(build_backbone("GRU4Rec", n_items, 3, embedding_size=16, hidden_size=16),
                         torch.zeros(n_items, 4), DLLM2RecConfig(ranking_weight=2.0))
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
        for _ in range(120):
            opt.zero_grad()
            model.calculate_loss(batch).backward()
            opt.step()
        with torch.no_grad():
            top1 = model.eval().full_sort_predict(test)[:, 1:].argmax(1) + 1
        hit[name] = float((top1 == test_follow).float().mean())
    assert hit["distilled"] >= hit["ce"] + 0.15, hit


def test_all_positions_distillation_is_the_prefix_distillation_over_the_same_targets():
    """Under train.objective=all_positions each target of a window takes its own checkpoint's named
    items, minus those already in the window up to its position: the loss equals the prefix rows'."""
    torch.manual_seed(0)
    text = torch.randn(10, 8)
    model = build_model("slim+dllm2rec", "SASRec", 10, 5, {}, text, {"top_k": 2, "ranking_weight": 0.7}).eval()
    seq, targets, user_text = [3, 1, 4, 2, 5], [1, 4, 2, 5, 9], torch.randn(5, 8)
    named = torch.tensor([[4, 6], [1, 7], [3, 8], [9, 2], [0, 0]])  # [1, 7]: 1 is in its history; [3, 8]: 3 too
    conf = torch.tensor([[1.0, 0.9], [1.0, 1.0], [0.8, 1.0], [1.0, 1.0], [0.0, 0.0]])
    window = {"item_seq": torch.tensor([seq]), "item_seq_len": torch.tensor([5]), "pos_item": torch.tensor([targets]),
              "user_text": user_text[None], "teacher_items": named[None], "teacher_conf": conf[None]}
    prefixes = {"item_seq": torch.tensor([seq[:t] + [0] * (5 - t) for t in range(1, 6)]),
                "item_seq_len": torch.arange(1, 6), "pos_item": torch.tensor(targets), "user_text": user_text,
                "teacher_items": named, "teacher_conf": conf}
    assert torch.allclose(model.calculate_loss(window), model.calculate_loss(prefixes), atol=1e-5)
    without = {k: v for k, v in prefixes.items() if not k.startswith("teacher")}
    assert not torch.allclose(model.calculate_loss(prefixes), model.calculate_loss(without), atol=1e-3)
    window["pos_item"] = torch.tensor([[1, 4, 2, 0, 0]])  # 0 = no target: the loss covers the first 3
    assert torch.allclose(model.calculate_loss(window), model.calculate_loss({k: v[:3] for k, v in prefixes.items()}),
                          atol=1e-5)
