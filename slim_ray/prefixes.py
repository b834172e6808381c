"""Leave-one-out prefixes, rationale checkpoints and user folds: the one definition every stage uses.

A user's chronological sequence s[0..n-1] gives one row per target position t >= 1, history s[:t]
-> target s[t] (models read the last max_len items of the history):
    train  t = 1 .. n-3        valid  t = n-2        test  t = n-1

A *checkpoint* is a history cut c: whatever is written at checkpoint c (a rationale, its candidate
list, its text vector) is produced from s[:c] alone. A row with target position t may use checkpoint
c only when c <= t, so nothing a row sees was written from a history that holds its target. Each
user has the checkpoints c = n-1 (test) and n-2 (valid), plus `per_user` training checkpoints
c = n-3, n-3-stride, n-3-2*stride, ... (c >= 1). Every row uses its latest usable checkpoint: a
training row's rationale is at most stride-1 items older than its target, as fresh as the test row's
is at test time; training rows older than the oldest checkpoint use none (a zero text vector).

Folds (cross-fitting): user u belongs to fold u % folds. A model that writes features of a user
(the backbone that picks its candidates, the student that writes its rationales) is trained only
on the other folds' users, so no feature comes from a model trained on that user's targets. One
second-order path remains: fold k's student learns from teacher rationales of other folds' users,
whose candidate lists came from backbones trained on fold k. It sees fold k only through other
users' candidate lists; nested cross-fitting (3+ folds, candidates for the teacher set from models
without both folds) would close it too.
"""

from __future__ import annotations

from bisect import bisect_right

import numpy as np
import pandas as pd

SPLITS = ("train", "valid", "test")


def split_position(n: int, split: str) -> int:
    """Target position of the valid or test row of a length-n sequence."""
    return {"valid": n - 2, "test": n - 1}[split]


def split_of(cut: int, n: int) -> str:
    """The split whose target a checkpoint at `cut` precedes directly (test / valid / train)."""
    return "test" if cut == n - 1 else "valid" if cut == n - 2 else "train"


def train_positions(n: int) -> range:
    """Target positions of the training rows."""
    return range(1, max(n - 2, 1))


def split_prefix(seq, split: str) -> tuple[list[int], int]:
    """(history, target) of the valid or test row."""
    t = split_position(len(seq), split)
    return [int(i) for i in seq[:t]], int(seq[t])


def checkpoints(n: int, per_user: int, stride: int) -> list[int]:
    """Ascending checkpoint cuts of a length-n sequence (see the module docstring)."""
    train = [c for c in range(n - 3, 0, -stride)][:per_user]
    return sorted(train + [c for c in (n - 2, n - 1) if c >= 1])


def latest_checkpoint(cuts: list[int], t: int) -> int | None:
    """The latest cut c <= t of ascending `cuts`, or None."""
    i = bisect_right(cuts, t)
    return cuts[i - 1] if i else None


def fold_of(user_id, folds: int):
    """Cross-fitting fold of a user id (an int or an array of them)."""
    return np.asarray(user_id) % folds if not isinstance(user_id, (int, np.integer)) else int(user_id) % folds


def checkpoint_rows(sequences: pd.DataFrame, per_user: int, stride: int) -> pd.DataFrame:
    """One row per (user, checkpoint): cut, split label, history s[:cut] and the next item s[cut]."""
    rows = []
    for user in sequences[["user_id", "raw_user_id", "item_ids"]].itertuples(index=False):
        seq = [int(i) for i in user.item_ids]
        for cut in checkpoints(len(seq), per_user, stride):
            rows.append({"user_id": int(user.user_id), "raw_user_id": str(user.raw_user_id), "cut": cut,
                         "split": split_of(cut, len(seq)), "history_ids": seq[:cut], "next_item_id": seq[cut]})
    return pd.DataFrame(rows, columns=["user_id", "raw_user_id", "cut", "split", "history_ids", "next_item_id"])


class CheckpointIndex:
    """(user, cut) -> row of a checkpoint table (rationales, vectors); row 0 means "none".

    `row_for(user, t)` is the rule above: the latest checkpoint c <= t that the table holds, if it is
    at most `max_staleness` items older than t.
    """

    def __init__(self, user_ids, cuts):
        self.row: dict[tuple[int, int], int] = {}
        self.cuts: dict[int, list[int]] = {}
        for r, (user, cut) in enumerate(zip(user_ids, cuts), start=1):
            self.row[(int(user), int(cut))] = r
            self.cuts.setdefault(int(user), []).append(int(cut))
        for user_cuts in self.cuts.values():
            user_cuts.sort()

    def row_for(self, user: int, t: int, max_staleness: int | None = None) -> int:
        cut = latest_checkpoint(self.cuts.get(int(user), []), t)
        if cut is None or (max_staleness is not None and t - cut > max_staleness):
            return 0
        return self.row[(int(user), cut)]

    def cut_of_rows(self) -> np.ndarray:
        """[rows + 1] the cut of every row (-1 for row 0)."""
        out = np.full(len(self.row) + 1, -1, dtype=np.int64)
        for (_, cut), r in self.row.items():
            out[r] = cut
        return out

    def split_rows(self, sequences: pd.DataFrame, split: str) -> np.ndarray:
        """[n_users + 1] row used by each user's valid or test row (0: none), indexed by user id."""
        out = np.zeros(int(sequences["user_id"].max()) + 1, dtype=np.int64)
        for user, seq in zip(sequences["user_id"], sequences["item_ids"]):
            out[int(user)] = self.row_for(int(user), split_position(len(seq), split))
        return out


def check_leak_free(sequences: pd.DataFrame, rows: pd.DataFrame, users, positions, text_rows, folds: int) -> dict:
    """Audit of the rationale each training row uses (text_rows: 1-based rows of `rows`, 0 = none).

    A row violates when its rationale's checkpoint is after its target (cut > t), belongs to another
    user, or records a history other than s[:cut]; or when its candidates came from a model that saw
    the user (candidate_holdout_fold != the user's fold). `student_cross_fitted` says whether every
    used rationale was written by a student trained without the user's fold.
    """
    seq_of = dict(zip(sequences["user_id"].astype(int), sequences["item_ids"]))
    users, positions, text_rows = (np.asarray(a, dtype=np.int64) for a in (users, positions, text_rows))
    used = text_rows > 0
    row_users = np.concatenate([[-1], rows["user_id"].to_numpy(np.int64)])
    row_cuts = np.concatenate([[-1], rows["cut"].to_numpy(np.int64)])
    bad = used & ((row_cuts[text_rows] > positions) | (row_users[text_rows] != users))
    for r in np.unique(text_rows[used]):  # each used rationale was written from s[:cut] and nothing else
        history = [int(i) for i in rows["history_ids"].iloc[r - 1]]
        if history != [int(i) for i in seq_of[int(row_users[r])][: row_cuts[r]]]:
            bad |= text_rows == r
    user_fold = fold_of(row_users[1:], folds)
    for column in ("candidate_holdout_fold",):
        if column in rows:
            wrong = np.concatenate([[False], rows[column].to_numpy(np.int64) != user_fold])
            bad |= used & wrong[text_rows]
    student = (rows["student_holdout_fold"].to_numpy(np.int64) == user_fold) if "student_holdout_fold" in rows \
        else np.zeros(len(rows), dtype=bool)
    first = None
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        first = {"user_id": int(users[i]), "target_pos": int(positions[i]), "rationale_cut": int(row_cuts[text_rows[i]])}
    staleness = positions[used] - row_cuts[text_rows[used]]
    return {"training_rows": int(len(users)), "rows_with_rationale": int(used.sum()),
            "max_staleness": int(staleness.max()) if used.any() else None,
            "violations": int(bad.sum()), "first": first,
            "student_cross_fitted": bool(student[text_rows[used] - 1].all()) if used.any() else True}
