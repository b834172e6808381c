"""Stage `train`: a sequential backbone trained with Ray Train (DDP or DeepSpeed ZeRO 1/2/3).

Pure core: `training_table` (every prefix of every training history -> next item, as RecBole does)
and the per-epoch helpers. Ray wrapper: `run_train` builds a TorchTrainer whose workers read Ray Data
shards, select the model on validation NDCG@10 with early stopping, and report a checkpoint each
epoch. `--resume` re-attaches to the same Ray Train run folder and continues from its latest one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from slim_ray.config import Config, TrainConfig
from slim_ray.evaluation import evaluate
from slim_ray.models import build_backbone
from slim_ray.prepare import load_prepared, write_atomic_dir

SELECT_METRIC = "valid_ndcg@10"


def training_table(sequences: pd.DataFrame, max_len: int, shuffle_seed: int | None = None) -> pa.Table:
    """One row per (history prefix -> next item) of each training sequence, right-padded.

    With shuffle_seed the rows come in a random order, so that Ray Data's local shuffle buffer
    (a window, not a global shuffle) still mixes users from the whole dataset in every batch.
    """
    from ray.data.extensions import ArrowTensorArray

    seqs, lens, targets = [], [], []
    for train in sequences["train_item_ids"]:
        train = np.asarray(train, dtype=np.int32)
        for t in range(1, len(train)):
            history = train[max(0, t - max_len):t]
            row = np.zeros(max_len, dtype=np.int32)
            row[: len(history)] = history
            seqs.append(row)
            lens.append(len(history))
            targets.append(train[t])
    order = (np.random.default_rng(shuffle_seed).permutation(len(seqs)) if shuffle_seed is not None
             else np.arange(len(seqs)))
    return pa.table({"item_seq": ArrowTensorArray.from_numpy(np.stack(seqs)[order]),
                     "item_seq_len": np.asarray(lens, dtype=np.int32)[order],
                     "pos_item": np.asarray(targets, dtype=np.int32)[order]})


def deepspeed_config(tc: TrainConfig, micro_batch: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": tc.zero_stage},
        "bf16": {"enabled": False},  # fp32: bf16 is ~15x slower on AVX2-only CPUs
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def _full_parameters(module, stage3: bool):
    """Context in which every parameter is whole (ZeRO-3 partitions them; others are whole)."""
    if not stage3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)


def train_loop_per_worker(config: dict) -> None:
    """Runs in every Ray Train worker."""
    import ray.train
    from ray.train import Checkpoint

    tc = TrainConfig(**config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(tc.cpus_per_worker)
    torch.manual_seed(config["seed"])  # identical init on every rank
    model = build_backbone(tc.backbone, config["n_items"], config["max_len"], **tc.model)
    scorer = build_backbone(tc.backbone, config["n_items"], config["max_len"], **tc.model)
    micro_batch = max(1, tc.batch_size // world)
    deep = tc.strategy == "deepspeed"
    stage3 = deep and tc.zero_stage == 3
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    if deep:
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if tc.use_gpu else "gloo")
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(tc, micro_batch))
        module = engine.module
        if stage3:  # the item table is read outside its Embedding.forward (logits, scoring)
            deepspeed.zero.register_external_parameter(module, module.item_embedding.weight)
    else:
        engine = ray.train.torch.prepare_model(model)
        module = model
    device = ray.train.torch.get_device() if tc.use_gpu else torch.device("cpu")

    state = {"epoch": 0, "best": -1.0, "best_epoch": 0, "bad_epochs": 0, "history": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = json.loads(Path(folder, "state.json").read_text())
            if deep:
                engine.load_checkpoint(folder, tag="ds")
            else:
                module.load_state_dict(torch.load(Path(folder, "model.pt")))
                optimizer.load_state_dict(torch.load(Path(folder, "optimizer.pt")))

    shard = ray.train.get_dataset_shard("train")
    for epoch in range(state["epoch"] + 1, tc.epochs + 1):
        torch.manual_seed(config["seed"] + 1000 * epoch + rank)  # dropout differs per rank/epoch
        engine.train()
        total, steps = 0.0, 0
        for batch in shard.iter_torch_batches(
                batch_size=micro_batch, local_shuffle_buffer_size=tc.shuffle_buffer or None,
                local_shuffle_seed=config["seed"] + epoch, device=device):
            loss = engine(batch)
            if deep:
                engine.backward(loss)
                engine.step()
            else:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            total, steps = total + loss.item(), steps + 1
        with _full_parameters(module, stage3):
            weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
        # Every rank scores the whole (small) valid split on a plain copy: ZeRO-3's hooks would
        # re-partition parameters between the sub-module calls of the scoring code.
        scorer.load_state_dict(weights)
        valid = evaluate(scorer, config["sequences"], config["n_items"], config["max_len"],
                         split="valid", negatives=tc.eval_negatives, seed=config["seed"])
        score = valid["full"]["ndcg@10"]
        improved = score > state["best"]
        state.update(epoch=epoch, bad_epochs=0 if improved else state["bad_epochs"] + 1)
        if improved:
            state.update(best=score, best_epoch=epoch)
        metrics = {"epoch": epoch, "train_loss": total / max(steps, 1), SELECT_METRIC: score,
                   "valid_hr@10": valid["full"]["hr@10"], "steps": steps}
        state["history"].append(metrics)
        with tempfile.TemporaryDirectory() as folder:
            if deep:
                engine.save_checkpoint(folder, tag="ds")  # each rank writes its own partition
            if rank == 0:
                torch.save(weights, Path(folder, "model.pt"))
                if not deep:
                    torch.save(optimizer.state_dict(), Path(folder, "optimizer.pt"))
                Path(folder, "state.json").write_text(json.dumps(state))
            report_checkpoint = Checkpoint.from_directory(folder) if rank == 0 or deep else None
            ray.train.report(metrics, checkpoint=report_checkpoint)
        if state["bad_epochs"] >= tc.patience:
            break


def run_train(cfg: Config, resume: bool = False) -> dict:
    """Train cfg.train.backbone; export the best-validation model to cfg.model_dir(). Returns meta."""
    import ray.data
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from slim_ray.ray_session import ray_session

    tc = cfg.train
    items, sequences, _ = load_prepared(cfg.prepared_dir)
    n_items, max_len = len(items) + 1, cfg.data.max_len
    storage = (cfg.run.output_dir / "ray_train").resolve()
    name = f"train-{tc.backbone}"
    if not resume:
        shutil.rmtree(storage / name, ignore_errors=True)
    env = {"OMP_NUM_THREADS": str(tc.cpus_per_worker)}
    if not tc.use_gpu:
        env.update(DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "slim-ray" / "torch_extensions")))
    with ray_session(cfg.ray, env=env):
        train_ds = ray.data.from_arrow(training_table(sequences, max_len, shuffle_seed=cfg.run.seed))
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"train": tc.model_dump(), "seed": cfg.run.seed, "n_items": n_items,
                               "max_len": max_len, "sequences": sequences},
            torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                         resources_per_worker={"CPU": tc.cpus_per_worker}),
            run_config=RunConfig(
                name=name, storage_path=str(storage), worker_runtime_env={"env_vars": env},
                checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=SELECT_METRIC,
                                                   checkpoint_score_order="max")),
            datasets={"train": train_ds},
        )
        result = trainer.fit()
    best, _ = max(result.best_checkpoints, key=lambda pair: pair[1][SELECT_METRIC])
    with best.as_directory() as folder:
        state = json.loads(Path(folder, "state.json").read_text())
        meta = {"backbone": tc.backbone, "model": tc.model, "n_items": n_items, "max_len": max_len,
                "best_epoch": state["best_epoch"], SELECT_METRIC: state["best"],
                "epochs_run": state["epoch"], "history": state["history"], "strategy": tc.strategy,
                "zero_stage": tc.zero_stage if tc.strategy == "deepspeed" else None,
                "num_workers": tc.num_workers}

        def write(tmp: Path) -> None:
            shutil.copy(Path(folder, "model.pt"), tmp / "model.pt")
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))

        write_atomic_dir(cfg.model_dir(), write)
    # The latest checkpoint's history covers every epoch run, including those after the best one.
    latest = result.checkpoint
    if latest is not None:
        with latest.as_directory() as folder:
            meta["history"] = json.loads(Path(folder, "state.json").read_text())["history"]
            Path(cfg.model_dir(), "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def load_trained(model_dir: Path):
    meta = json.loads(Path(model_dir, "meta.json").read_text())
    model = build_backbone(meta["backbone"], meta["n_items"], meta["max_len"], **meta["model"])
    model.load_state_dict(torch.load(Path(model_dir, "model.pt")))
    return model.eval(), meta


def run_evaluate(cfg: Config, split: str = "test") -> dict:
    """Evaluate the exported model of cfg.train.backbone; writes RUN_DIR/eval/<backbone>.json."""
    from slim_ray.errors import DataError

    model_dir = cfg.model_dir()
    if not (model_dir / "model.pt").is_file():
        raise DataError(f"no trained model at {model_dir} (run `slim-ray train` first)")
    items, sequences, _ = load_prepared(cfg.prepared_dir)
    model, meta = load_trained(model_dir)
    if meta["n_items"] != len(items) + 1:
        raise DataError(f"{model_dir}: model has {meta['n_items'] - 1} items, dataset has {len(items)}")
    report = {"backbone": meta["backbone"], "best_epoch": meta["best_epoch"],
              **evaluate(model, sequences, meta["n_items"], meta["max_len"], split=split,
                         negatives=cfg.train.eval_negatives, seed=cfg.run.seed)}
    out = cfg.run.output_dir / "eval" / f"{meta['backbone']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return report
