"""Prefixes and checkpoints: one definition, and the leak guard every fused training run passes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from slim_ray.prefixes import (
    CheckpointIndex, check_leak_free, checkpoint_rows, checkpoints, fold_of, latest_checkpoint, split_prefix,
    train_positions,
)
from slim_ray.train import column_array, leaky_rows, target_rows, training_table, training_windows

SEQUENCES = pd.DataFrame({"user_id": [1, 2, 3], "raw_user_id": ["a", "b", "c"],
                          "item_ids": [list(range(1, 13)), [20, 21, 22, 23], [30, 31, 32]]})


def test_splits_and_checkpoints_are_defined_once():
    seq = list(range(100, 112))  # n = 12
    assert split_prefix(seq, "valid") == (seq[:10], seq[10]) and split_prefix(seq, "test") == (seq[:11], seq[11])
    assert list(train_positions(12)) == list(range(1, 10))
    assert checkpoints(12, per_user=2, stride=3) == [6, 9, 10, 11]
    assert checkpoints(12, per_user=10, stride=4) == [1, 5, 9, 10, 11]
    assert checkpoints(3, per_user=4, stride=5) == [1, 2]  # no training checkpoint before the only train target
    assert latest_checkpoint([6, 9, 10, 11], 8) == 6 and latest_checkpoint([6, 9], 5) is None
    assert fold_of(5, 2) == 1 and fold_of(np.array([1, 2, 3]), 2).tolist() == [1, 0, 1]


def test_checkpoint_rows_hold_only_what_precedes_the_cut():
    rows = checkpoint_rows(SEQUENCES, per_user=2, stride=3)
    for row in rows.itertuples():
        seq = SEQUENCES.set_index("user_id").loc[row.user_id, "item_ids"]
        assert row.history_ids == seq[: row.cut] and row.next_item_id == seq[row.cut]
    user1 = rows[rows["user_id"] == 1]
    assert user1["cut"].tolist() == [6, 9, 10, 11] and user1["split"].tolist() == ["train", "train", "valid", "test"]


def _table_and_rows(per_user=2, stride=3):
    rows = checkpoint_rows(SEQUENCES, per_user, stride)
    index = CheckpointIndex(rows["user_id"], rows["cut"])
    table = training_table(SEQUENCES, max_len=5, index=index)
    return rows, index, table


def test_every_training_row_uses_its_latest_checkpoint_before_its_target():
    rows, index, table = _table_and_rows()
    cut_of = index.cut_of_rows()
    for user, t, r in zip(*(table.column(c).to_numpy() for c in ("user_id", "target_pos", "text_row"))):
        usable = [c for c in rows.loc[rows["user_id"] == user, "cut"] if c <= t]
        assert cut_of[r] == (max(usable) if usable else -1)
    assert index.split_rows(SEQUENCES, "test")[1] == index.row[(1, 11)]
    assert index.split_rows(SEQUENCES, "valid")[2] == index.row[(2, 2)]


def test_max_staleness_keeps_only_rationales_written_close_enough_to_the_target():
    rows = checkpoint_rows(SEQUENCES, 2, 3)
    index = CheckpointIndex(rows["user_id"], rows["cut"])
    cut_of = index.cut_of_rows()
    fresh = training_table(SEQUENCES, max_len=5, index=index, max_staleness=0)
    used = fresh.column("text_row").to_numpy() > 0
    # user 1 (cuts 6, 9): only t = 6 and t = 9; user 2 (cut 1): t = 1; user 3 has no training checkpoint
    assert sorted(zip(fresh.column("user_id").to_numpy()[used], fresh.column("target_pos").to_numpy()[used])) == [
        (1, 6), (1, 9), (2, 1)]
    assert (cut_of[fresh.column("text_row").to_numpy()[used]] == fresh.column("target_pos").to_numpy()[used]).all()
    one = training_table(SEQUENCES, max_len=5, index=index, max_staleness=1)
    assert (one.column("text_row").to_numpy() > 0).sum() == 4  # adds t = 7 of user 1 (t = 10 is a valid row)


def test_windows_hold_every_training_target_once_with_the_prefix_rows_rationale():
    """all_positions sees the same (user, target, rationale) events as the prefix objective, each once,
    and every input position holds the item right before its target (causal, nothing later)."""
    rows, index, prefix = _table_and_rows()
    for max_len in (3, 5, 50):  # user 1 has 9 training targets: 3 windows, 2 windows, 1 window
        windows = training_windows(SEQUENCES, max_len=max_len, index=index, shuffle_seed=0)
        events = lambda table: sorted(zip(*target_rows(table)))  # noqa: E731
        assert events(windows) == events(prefix)
        seqs = SEQUENCES.set_index("user_id")["item_ids"]
        item_seq, pos_item, target_pos = (column_array(windows, c) for c in ("item_seq", "pos_item", "target_pos"))
        for user, inputs, targets, positions, length in zip(windows.column("user_id").to_numpy(), item_seq, pos_item,
                                                             target_pos, windows.column("item_seq_len").to_numpy()):
            seq = seqs[user]
            assert (positions[:length] >= 1).all() and (positions[length:] == -1).all()
            assert [seq[t - 1] for t in positions[:length]] == inputs[:length].tolist()
            assert [seq[t] for t in positions[:length]] == targets[:length].tolist()
            assert (targets[length:] == 0).all() and (inputs[length:] == 0).all()
    assert training_windows(SEQUENCES, max_len=3).num_rows == 3 + 1 + 0  # user 3 (n = 3) has no training target


def _audit(rows, table, text_rows=None, folds=2):
    return check_leak_free(SEQUENCES, rows, table.column("user_id").to_numpy(), table.column("target_pos").to_numpy(),
                           table.column("text_row").to_numpy() if text_rows is None else text_rows, folds)


def test_leak_guard_passes_the_checkpoint_design():
    rows, _, table = _table_and_rows()
    report = _audit(rows, table)
    assert report["violations"] == 0 and report["rows_with_rationale"] == 5  # user 1: t = 6..9; user 2: t = 1
    assert report["max_staleness"] == 2 and not report["student_cross_fitted"]  # no student fold recorded


def test_leak_guard_flags_the_old_one_rationale_per_user_design():
    """Before checkpoints, every training row of a user got the valid-prefix rationale (history s[:n-2]),
    which holds the targets of all its training rows: the audit must flag every such row."""
    rows, index, table = _table_and_rows()
    valid_row = index.split_rows(SEQUENCES, "valid")
    old = valid_row[table.column("user_id").to_numpy()]
    report = _audit(rows, table, old)
    assert report["violations"] == len(old) == 10 and report["first"]["rationale_cut"] > report["first"]["target_pos"]


def test_leak_guard_flags_foreign_histories_and_candidates_from_a_model_that_saw_the_user():
    rows, _, table = _table_and_rows()
    tampered = rows.copy()
    tampered.at[0, "history_ids"] = tampered.at[0, "history_ids"] + [12]  # "written" with a later item
    assert _audit(tampered, table)["violations"] > 0
    wrong_fold = rows.assign(candidate_holdout_fold=1 - fold_of(rows["user_id"].to_numpy(), 2),
                             student_holdout_fold=fold_of(rows["user_id"].to_numpy(), 2))
    assert _audit(wrong_fold, table)["violations"] == 5
    right = wrong_fold.assign(candidate_holdout_fold=fold_of(rows["user_id"].to_numpy(), 2))
    report = _audit(right, table)
    assert report["violations"] == 0 and report["student_cross_fitted"]


@pytest.mark.parametrize("per_user,stride", [(1, 5), (4, 1), (3, 2)])
def test_no_configuration_lets_a_row_see_its_target(per_user, stride):
    rows, _, table = _table_and_rows(per_user, stride)
    assert _audit(rows, table)["violations"] == 0


def test_leaky_baseline_is_the_measured_old_design_and_the_guard_sees_it():
    """train.leaky_baseline: every training row gets the user's s[:n-3] rationale (the old "train" prefix)."""
    rows, index, table = _table_and_rows()
    old = leaky_rows(index, SEQUENCES, table.column("user_id").to_numpy())
    assert set(index.cut_of_rows()[old]) == {9, 1}  # user 1: n - 3 = 9; user 2: n - 3 = 1
    assert _audit(rows, table, old)["violations"] == 8  # user 1's rows t = 1..8 precede cut 9
