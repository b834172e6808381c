"""Stage `train`: a sequential backbone trained with Ray Train (DDP or DeepSpeed ZeRO 1/2/3).

Pure core: `training_table` (every prefix of every training history -> next item, as RecBole does)
or `training_windows` (train.objective=all_positions: windows of each training sequence with the
target after every position, as the original SASRec trains). `BackboneTask` is what slim_ray.trainer's
one loop trains: Ray Data shards, the model selected on validation NDCG@10 with early stopping, a
checkpoint each epoch; `--resume` re-attaches to the same Ray Train run folder and continues.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from slim_ray.artifacts import fusion_vectors, load_backfill
from slim_ray.candidates import fold_model_name
from slim_ray.config import Config, TrainConfig
from slim_ray.trainer import Task, fit
from slim_ray.errors import DataError
from slim_ray.evaluation import evaluate
from slim_ray.fusion import build_model, load_trained
from slim_ray.prefixes import CheckpointIndex, check_leak_free, fold_of, train_positions
from slim_ray.storage import load_prepared, write_atomic_dir

SELECT_METRIC = "valid_ndcg@10"


def row_order(n: int, shuffle_seed: int | None) -> np.ndarray:
    """A seeded permutation of n rows, so Ray Data's local shuffle buffer (a window, not a global
    shuffle) still mixes users from the whole dataset in every batch; identity without a seed."""
    return np.random.default_rng(shuffle_seed).permutation(n) if shuffle_seed is not None else np.arange(n)


def training_table(sequences: pd.DataFrame, max_len: int, shuffle_seed: int | None = None,
                   index: CheckpointIndex | None = None, max_staleness: int | None = None) -> pa.Table:
    """One row per (history prefix -> next item) of each training sequence, right-padded, with the
    target's position and the checkpoint row (`index`, 0 = none) whose rationale the row may use;
    in `row_order`."""
    from ray.data.extensions import ArrowTensorArray

    seqs, lens, targets, users, positions, text_rows = [], [], [], [], [], []
    for user, seq in zip(sequences["user_id"], sequences["item_ids"]):
        seq = np.asarray(seq, dtype=np.int32)
        for t in train_positions(len(seq)):
            history = seq[max(0, t - max_len):t]
            row = np.zeros(max_len, dtype=np.int32)
            row[: len(history)] = history
            seqs.append(row)
            lens.append(len(history))
            targets.append(seq[t])
            users.append(user)
            positions.append(t)
            text_rows.append(index.row_for(user, t, max_staleness) if index is not None else 0)
    order = row_order(len(seqs), shuffle_seed)
    return pa.table({"item_seq": ArrowTensorArray.from_numpy(np.stack(seqs)[order]),
                     "item_seq_len": np.asarray(lens, dtype=np.int32)[order],
                     "pos_item": np.asarray(targets, dtype=np.int32)[order],
                     "user_id": np.asarray(users, dtype=np.int32)[order],
                     "target_pos": np.asarray(positions, dtype=np.int32)[order],
                     "text_row": np.asarray(text_rows, dtype=np.int64)[order]})


def training_windows(sequences: pd.DataFrame, max_len: int, shuffle_seed: int | None = None,
                     index: CheckpointIndex | None = None, max_staleness: int | None = None) -> pa.Table:
    """Objective all_positions: each user's training targets t = 1..n-3 tiled into windows of at most
    max_len targets, newest first. A window of targets a..b reads s[a-1:b] and predicts s[t] after
    position t-a (causal), so every training target appears once, as in `training_table`, for one
    forward pass per window. A target early in a later window sees only the window's items before it
    (as the original SASRec trains), where its prefix row would see up to max_len. Per position: target
    (0 = none), its position t (-1) and the checkpoint row (`index`) whose rationale it may use, the
    same rule as a prefix row's."""
    from ray.data.extensions import ArrowTensorArray

    columns = {name: [] for name in ("item_seq", "pos_item", "target_pos", "text_row")}
    lens, users = [], []
    for user, seq in zip(sequences["user_id"], sequences["item_ids"]):
        seq = np.asarray(seq, dtype=np.int32)
        b = len(train_positions(len(seq)))  # the last training target position (n-3), 0 if none
        while b >= 1:
            a = max(1, b - max_len + 1)
            t = np.arange(a, b + 1)
            rows = [index.row_for(user, int(p), max_staleness) for p in t] if index is not None else [0] * len(t)
            for name, values, dtype in (("item_seq", seq[a - 1:b], np.int32), ("pos_item", seq[a:b + 1], np.int32),
                                        ("target_pos", t, np.int32), ("text_row", rows, np.int64)):
                padded = np.full(max_len, -1 if name == "target_pos" else 0, dtype=dtype)
                padded[: len(t)] = values
                columns[name].append(padded)
            lens.append(len(t))
            users.append(user)
            b = a - 1
    order = row_order(len(lens), shuffle_seed)
    table = {name: ArrowTensorArray.from_numpy(np.stack(values)[order]) for name, values in columns.items()}
    return pa.table({**table, "item_seq_len": np.asarray(lens, dtype=np.int32)[order],
                     "user_id": np.asarray(users, dtype=np.int32)[order]})


def column_array(table: pa.Table, name: str) -> np.ndarray:
    """A column of a training table as numpy ([rows] or [rows, max_len] for tensor columns)."""
    column = table.column(name)
    if isinstance(column.type, pa.ExtensionType):
        return np.asarray(column.combine_chunks().to_numpy_ndarray())
    return column.to_numpy()


def target_rows(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user, target position, checkpoint row) of every training target of a prefix or window table."""
    users, positions, rows = (column_array(table, name) for name in ("user_id", "target_pos", "text_row"))
    if positions.ndim == 1:
        return users, positions, rows
    present = positions >= 0
    return np.broadcast_to(users[:, None], positions.shape)[present], positions[present], rows[present]


@dataclasses.dataclass(kw_only=True)
class BackboneTask(Task):
    """A sequential backbone (optionally fused with rationales) for slim_ray.trainer's loop.
    side: sequences, item_text, user_text ({rows, valid} vectors per checkpoint row, None without
    fusion), distill_targets ((item ids, confidences) per checkpoint row for DLLM2Rec, else None)."""

    tc: TrainConfig
    n_items: int
    max_len: int
    metric: str = SELECT_METRIC
    higher_is_better: bool = True

    def build(self):
        item_text = self.side["item_text"]
        build = lambda: build_model(self.tc.fusion, self.tc.backbone, self.n_items, self.max_len,  # noqa: E731
                                    self.tc.model, None if item_text is None else torch.from_numpy(item_text),
                                    self.tc.dllm2rec.model_dump())
        model, self.scorer = build(), build()
        return model, torch.optim.Adam(model.parameters(), lr=self.tc.lr, weight_decay=self.tc.weight_decay)

    def prepare(self, engine) -> None:
        if engine.stage3 and hasattr(engine.module, "item_embedding"):  # read outside Embedding.forward
            import deepspeed

            deepspeed.zero.register_external_parameter(engine.module, engine.module.item_embedding.weight)

    def load(self, engine, folder: Path) -> None:
        engine.module.load_state_dict(torch.load(folder / "model.pt"))

    def collate(self, batch: dict) -> dict:
        tensors = {k: torch.as_tensor(v) for k, v in batch.items()}
        rows = batch["text_row"]  # each row's latest checkpoint before its target
        user_text, targets = self.side["user_text"], self.side["distill_targets"]
        if user_text is not None:
            tensors["user_text"] = torch.from_numpy(user_text["rows"][rows])
        if targets is not None:  # the items that checkpoint's rationale names, with match confidences
            tensors["teacher_items"] = torch.from_numpy(targets[0][rows])
            tensors["teacher_conf"] = torch.from_numpy(targets[1][rows])
        return tensors

    def evaluate(self, engine) -> dict:
        with engine.full_parameters():
            self.weights = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
        # Every rank scores the whole (small) valid split on a plain copy: ZeRO-3's hooks would
        # re-partition parameters between the sub-module calls of the scoring code.
        self.scorer.load_state_dict(self.weights)
        user_text = self.side["user_text"]
        valid = evaluate(self.scorer, self.side["sequences"], self.n_items, self.max_len, split="valid",
                         negatives=self.tc.eval_negatives, seed=self.seed, mask_history=self.tc.select_masks_history,
                         user_text=None if user_text is None else user_text["valid"])
        return {SELECT_METRIC: valid["full"]["ndcg@10"], "valid_hr@10": valid["full"]["hr@10"]}

    def files(self, engine):
        weights = self.weights
        return lambda folder: torch.save(weights, folder / "model.pt")


def run_train(cfg: Config, resume: bool = False, holdout_fold: int | None = None) -> dict:
    """Train cfg.train.backbone; export the best-validation model to cfg.model_dir(). Returns meta.

    holdout_fold: train (and select) on the users of every other fold only, into
    cfg.model_dir(fold_model_name(...)): the cross-fitted models that pick step-3 candidates."""
    tc = cfg.train
    items, sequences, _ = load_prepared(cfg.prepared_dir)
    n_items, max_len = len(items) + 1, cfg.data.max_len
    model_name, model_dir = cfg.model_name, cfg.model_dir()
    if holdout_fold is not None:
        if tc.fusion != "none":
            raise DataError("cross-fitted fold models are base backbones (train.fusion=none)")
        model_name = fold_model_name(tc.backbone, holdout_fold, cfg.data.folds)
        model_dir = cfg.model_dir(model_name)
        sequences = sequences[fold_of(sequences["user_id"].to_numpy(), cfg.data.folds) != holdout_fold]
    backfill = load_backfill(cfg) if tc.fusion != "none" else None  # read once: vectors, guard, DLLM2Rec
    item_text, user_text, index = fusion_vectors(cfg, n_items, sequences, backfill)
    rows_of = training_windows if tc.objective == "all_positions" else training_table
    table = rows_of(sequences, max_len, shuffle_seed=cfg.run.seed, index=index, max_staleness=tc.max_staleness)
    if tc.leaky_baseline and index is not None:  # the old design, measured beside the new one
        table = table.set_column(table.schema.get_field_index("text_row"), "text_row",
                                 pa.array(leaky_rows(index, sequences, table.column("user_id").to_numpy())))
    guard = leak_guard(cfg, sequences, table, backfill[0]) if index is not None else None
    targets = None
    if "dllm2rec" in tc.fusion:
        from slim_ray.dllm2rec import distill_targets

        targets = distill_targets(backfill[0], items, tc.dllm2rec.top_k)
    task = BackboneTask(label=f"train {model_name} (max {tc.epochs} epochs)", seed=cfg.run.seed, tc=tc,
                        n_items=n_items, max_len=max_len, shuffle_buffer=tc.shuffle_buffer,
                        side={"sequences": sequences, "item_text": item_text, "user_text": user_text,
                              "distill_targets": targets})
    fitted = fit(task, tc, cfg.ray, table, f"train-{model_name}", cfg.run.output_dir / "ray_train", resume)
    state, last = fitted.best_state, fitted.last_state
    meta = {"backbone": tc.backbone, "fusion": tc.fusion, "rationale": tc.rationale, "name": model_name,
            "seed": cfg.run.seed, "holdout_fold": holdout_fold, "folds": cfg.data.folds, "leak_guard": guard,
            "model": tc.model, "n_items": n_items, "max_len": max_len,
            "dllm2rec": tc.dllm2rec.model_dump() if "dllm2rec" in tc.fusion else None,
            "best_epoch": state["best_epoch"], SELECT_METRIC: state["best"],
            "select_masks_history": tc.select_masks_history, "objective": tc.objective,
            "epochs_run": last["epoch"], "history": last["history"], "strategy": tc.strategy,
            "zero_stage": tc.zero_stage if tc.strategy == "deepspeed" else None,
            "num_workers": tc.num_workers, "shuffle_buffer": tc.shuffle_buffer, "train_wall_s": fitted.wall_s}
    with fitted.best.as_directory() as folder:
        def write(tmp: Path) -> None:
            shutil.copy(Path(folder, "model.pt"), tmp / "model.pt")
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))

        write_atomic_dir(model_dir, write)
    return meta


def run_train_folds(cfg: Config) -> dict:
    """The cross-fitted base backbones, one per fold, each trained without that fold's users: they
    pick the step-3 candidates of that fold's users (slim_ray.candidates)."""
    base = cfg.model_copy(update={"train": cfg.train.model_copy(update={"fusion": "none"})})
    metas = {fold: run_train(base, holdout_fold=fold) for fold in range(cfg.data.folds)}
    return {"folds": cfg.data.folds, "models": {m["name"]: {"best_epoch": m["best_epoch"], SELECT_METRIC: m[SELECT_METRIC]}
                                                for m in metas.values()}}


def leaky_rows(index: CheckpointIndex, sequences: pd.DataFrame, users) -> np.ndarray:
    """The design before checkpoints, as bench/slim.py measured it: every training row of a user uses the
    rationale of the user's last training prefix s[:n-3], which holds the targets of its earlier rows."""
    length = dict(zip(sequences["user_id"].astype(int), sequences["item_ids"].map(len)))
    return np.array([index.row_for(int(u), length[int(u)] - 3) for u in users], dtype=np.int64)


def leak_guard(cfg: Config, sequences: pd.DataFrame, table: pa.Table, rows: pd.DataFrame) -> dict:
    """Refuses to train when a training row would use a rationale written from a history that holds its
    target, or whose candidates came from a model trained on the user (see prefixes.check_leak_free);
    records whether the students were cross-fitted (`leak_free` needs both). `rows`: the backfill's."""
    report = check_leak_free(sequences, rows, *target_rows(table), cfg.data.folds)
    report["leak_free"] = report["violations"] == 0 and report["student_cross_fitted"]
    if report["violations"] and not cfg.train.leaky_baseline:
        raise DataError(f"leak guard: {report['violations']} training rows would see a rationale written "
                        f"after their target or by a model trained on their user ({report['first']})")
    return report


def run_evaluate(cfg: Config, split: str = "test", mask_history: bool = True) -> dict:
    """Evaluate the exported model of cfg.train.backbone; writes RUN_DIR/eval/<backbone>.json."""
    model_dir = cfg.model_dir()
    if not (model_dir / "model.pt").is_file():
        raise DataError(f"no trained model at {model_dir} (run `slim-ray train` first)")
    items, sequences, _ = load_prepared(cfg.prepared_dir)
    model, meta = load_trained(model_dir)
    if meta["n_items"] != len(items) + 1:
        raise DataError(f"{model_dir}: model has {meta['n_items'] - 1} items, dataset has {len(items)}")
    _, user_text, _ = fusion_vectors(cfg, meta["n_items"], sequences)
    report = {"backbone": meta["backbone"], "model": cfg.model_name, "best_epoch": meta["best_epoch"],
              **evaluate(model, sequences, meta["n_items"], meta["max_len"], split=split,
                         negatives=cfg.train.eval_negatives, seed=cfg.run.seed, mask_history=mask_history,
                         user_text=None if user_text is None else user_text[split])}
    suffix = "" if mask_history else "-unmasked"
    out = cfg.run.output_dir / "eval" / f"{cfg.model_name}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return report
