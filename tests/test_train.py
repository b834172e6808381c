"""Ray Train on a real local Ray cluster: DDP and DeepSpeed ZeRO with 2 workers, checkpoints, resume."""

from __future__ import annotations

import json
import os

import pytest

from slim_ray.config import load_config
from slim_ray.errors import ConfigError, DataError
from slim_ray.prepare import run_prepare
from slim_ray.train import run_evaluate, run_train, training_table
from slim_ray.trainer import deepspeed_config, lr_factor, micro_batch_size
from conftest import write_ring  # tests/ is on sys.path (pytest rootdir)

TINY_SASREC = "train.model={hidden_size: 16, inner_size: 32, n_layers: 1, hidden_dropout: 0.1, attn_dropout: 0.1}"


@pytest.fixture(scope="module")
def pattern_run(tmp_path_factory, shared_ray):
    """60 users walking the item ring (i -> i+1): a pattern every backbone can learn."""
    root = write_ring(tmp_path_factory.mktemp("pattern"), "ring", users=60, n_items=25, seed=0, length=(6, 10),
                      title="Movie", genres=("Drama",))
    base = [f"data.interactions={root / 'ring.inter'}", f"data.items={root / 'ring.item'}",
            "data.max_len=8", "ray.object_store_memory_mb=100", "train.batch_size=32", "train.lr=0.01",
            "train.eval_negatives=10", "train.patience=10", TINY_SASREC]

    def make(name: str, *extra: str):
        cfg = load_config(None, base + [f"run.output_dir={root / name}", *extra])
        run_prepare(cfg.data, cfg.prepared_dir)
        return cfg

    return make


def test_training_table_has_every_prefix(pattern_run):
    import pandas as pd

    sequences = pd.DataFrame({"user_id": [1, 2], "item_ids": [[1, 2, 3, 4, 90, 91], [5, 6, 92, 93]]})
    table = training_table(sequences, max_len=2)  # the last two items are valid and test targets
    assert table.column("item_seq").chunk(0).to_numpy().tolist() == [[1, 0], [1, 2], [2, 3], [5, 0]]
    assert table.column("item_seq_len").to_pylist() == [1, 2, 2, 1]
    assert table.column("pos_item").to_pylist() == [2, 3, 4, 6]
    assert table.column("user_id").to_pylist() == [1, 1, 1, 2]
    assert table.column("target_pos").to_pylist() == [1, 2, 3, 1] and set(table.column("text_row").to_pylist()) == {0}


def _epochs(meta):
    return [h["epoch"] for h in meta["history"]]


@pytest.mark.slow
@pytest.mark.parametrize("strategy, stage", [("ddp", None), ("deepspeed", 2)])
def test_two_workers_train_checkpoint_and_resume(pattern_run, strategy, stage):
    """Both engines under one loop, with accumulation, clipping and a warm-up + cosine schedule over 4
    epochs (the rate the loop reports rises, then falls), resumed mid-schedule."""
    cfg = pattern_run(f"{strategy}{stage}", "train.num_workers=2", f"train.strategy={strategy}",
                      f"train.zero_stage={stage or 2}", "train.epochs=2", "train.grad_accum=2", "train.grad_clip=1.0",
                      "train.lr_schedule=cosine", "train.warmup_ratio=0.6", "train.lr=0.003")
    first = run_train(cfg)
    assert _epochs(first) == [1, 2] and first["num_workers"] == 2
    assert first["history"][1]["train_loss"] < first["history"][0]["train_loss"]
    rates = [h["lr"] for h in first["history"]]
    assert 0 < rates[0] < 0.003 and rates[1] < rates[0]  # warming up after epoch 1 (60% of the steps), then decayed
    report = run_evaluate(cfg)
    assert report["full"]["ndcg@10"] > 0 and (cfg.run.output_dir / "eval" / "SASRec.json").is_file()

    # Resume: nothing was killed; the run continues from its latest checkpoint (epoch 2).
    longer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 4})})
    resumed = run_train(longer, resume=True)
    assert _epochs(resumed) == [1, 2, 3, 4]
    assert resumed["history"][:2] == first["history"]  # epochs 1-2 were not re-run
    late = [h["lr"] for h in resumed["history"][2:]]
    assert 0.003 > late[0] > late[1] >= 0  # the schedule, stretched to 4 epochs, decays on from the checkpoint
    assert resumed["history"][3]["train_loss"] < first["history"][1]["train_loss"]


@pytest.mark.slow
def test_deepspeed_zero3_two_workers(pattern_run, tmp_path, monkeypatch):
    cfg = pattern_run("zero3", "train.num_workers=2", "train.strategy=deepspeed", "train.zero_stage=3",
                      "train.epochs=2", "ray.train_poll_s=0.3")
    extensions = tmp_path / "torch_extensions"  # the workers' JIT build folder (trainer.worker_env)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    meta = run_train(cfg)
    assert meta["zero_stage"] == 3 and _epochs(meta) == [1, 2]
    # DeepSpeed's CPU shm comm op (inference only) is not compiled: ~2 min saved in a new environment
    assert not extensions.exists() or not any(extensions.iterdir())
    # Ray Train passes the driver's poll interval on to the run's controller (bench/fit_overhead.py)
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.3"
    saved = json.loads((cfg.model_dir() / "meta.json").read_text())
    assert saved["best_epoch"] in (1, 2)
    assert run_evaluate(cfg)["full"]["hr@20"] > 0


def test_one_schedule_and_deepspeed_config_from_the_loop_fields():
    spec = load_config(None, ["train.lr_schedule=linear", "train.warmup_ratio=0.2", "train.grad_clip=0.5",
                              "train.grad_accum=4", "train.batch_size=64"]).train
    factor = lr_factor(spec, total_steps=100)
    assert [factor(s) for s in (0, 9, 19)] == [1 / 20, 10 / 20, 1.0]  # linear warm-up over 20 steps
    assert factor(60) == 0.5 and factor(100) == 0.0  # then linear decay to 0 at the last step
    cosine = lr_factor(spec.model_copy(update={"lr_schedule": "cosine", "warmup_ratio": 0.0}), 100)
    assert cosine(0) == 1.0 and abs(cosine(50) - 0.5) < 1e-9 and abs(cosine(100)) < 1e-9
    assert lr_factor(spec.model_copy(update={"lr_schedule": "constant", "warmup_ratio": 0.0}), 100)(99) == 1.0
    micro = micro_batch_size(spec, world=2)
    ds = deepspeed_config(spec, micro)
    assert micro == 8 and ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 0.5
    assert micro * 2 * ds["gradient_accumulation_steps"] == spec.batch_size  # one optimizer step = the global batch


def test_evaluate_without_model_is_a_clear_error(pattern_run):
    cfg = pattern_run("nomodel")
    with pytest.raises(DataError, match="no trained model at .*run `slim-ray train` first"):
        run_evaluate(cfg)


@pytest.mark.slow
def test_all_positions_objective_learns_the_ring_in_one_pass_per_window(pattern_run, capsys):
    """train.objective=all_positions: one window row per user (histories of 6-10 items fit max_len 8 at
    most twice), loss at every position; it learns the ring as the prefix objective does. Each epoch's
    line reaches the driver's console although worker logs do not (slim_ray.progress)."""
    cfg = pattern_run("windows", "train.objective=all_positions", "train.backbone=GRU4Rec", "train.epochs=6",
                      "train.batch_size=8", "train.model={}")
    meta = run_train(cfg)
    printed = capsys.readouterr().out
    assert all(f"train GRU4Rec (max 6 epochs) epoch {e}: train_loss " in printed for e in range(1, meta["epochs_run"] + 1))
    assert meta["objective"] == "all_positions"
    assert meta["history"][0]["steps"] <= 60 / 8 + 2  # windows, not the ~300 prefixes
    assert meta["valid_ndcg@10"] > 0.8
    with pytest.raises(ConfigError, match="all_positions needs a causal backbone"):
        pattern_run("srgnn-windows", "train.objective=all_positions", "train.backbone=SRGNN")
