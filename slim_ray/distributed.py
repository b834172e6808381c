"""What every Ray Train loop of ours shares: DDP or DeepSpeed ZeRO set-up, steps, checkpoints.

Used inside `TorchTrainer` workers by slim_ray.train (backbones) and slim_ray.distill (student).
On CPU: gloo, DS_ACCELERATOR=cpu, fp32 (bf16 is ~15x slower on AVX2-only CPUs); on GPU: NCCL.
A checkpoint folder holds `state.json` (epoch, early-stopping state, metric history) and the
loop's own files from rank 0; with DeepSpeed every rank adds its optimizer partition (tag "ds").
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch

from slim_ray.config import cache_root
from slim_ray.progress import report


def worker_env(use_gpu: bool, threads: int) -> dict[str, str]:
    env = {"OMP_NUM_THREADS": str(threads)}
    if not use_gpu:
        # DeepSpeed JIT-compiles its shared-memory comm op on first use (~2 min): keep it cached.
        env.update(DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(cache_root() / "torch_extensions")))
    return env


def deepspeed_config(zero_stage: int, micro_batch: int, bf16: bool = False) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


class Engine:
    """A model ready to train under DDP (via Ray) or DeepSpeed, with one step/save/load API."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, strategy: str,
                 zero_stage: int, micro_batch: int, use_gpu: bool, bf16: bool = False,
                 frozen_base: bool = False):
        import ray.train.torch

        # frozen_base (LoRA): checkpoints skip the frozen weights (~540 MB each for SmolLM2).
        self.frozen_base = frozen_base
        self.deep, self.stage3 = strategy == "deepspeed", strategy == "deepspeed" and zero_stage == 3
        if self.deep:
            import deepspeed

            deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=deepspeed_config(zero_stage, micro_batch, bf16))
            self.module = self.engine.module
        else:
            self.engine, self.optimizer, self.module = ray.train.torch.prepare_model(model), optimizer, model
        self.device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def step(self, loss: torch.Tensor) -> None:
        if self.deep:
            self.engine.backward(loss)
            self.engine.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()

    def full_parameters(self, params=None):
        """Context in which parameters are whole (ZeRO-3 partitions them across ranks)."""
        if not self.stage3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(params or self.module.parameters()), modifier_rank=None)

    def save(self, folder: Path) -> None:
        """Optimizer (and DeepSpeed) state; the model weights are the loop's own files."""
        if self.deep:
            self.engine.save_checkpoint(str(folder), tag="ds",  # every rank writes its partition
                                        exclude_frozen_parameters=self.frozen_base)
        else:
            torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")

    def load(self, folder: Path, load_weights: Callable[[Path], None]) -> None:
        if self.deep:
            self.engine.load_checkpoint(str(folder), tag="ds", load_module_strict=not self.frozen_base)
        else:
            load_weights(folder)
            self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt"))


def restore_state(engine: Engine, load_weights: Callable[[Path], None], initial: dict) -> dict:
    """Loop state from the run's latest checkpoint (Ray hands it over on --resume), else `initial`."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return initial
    with checkpoint.as_directory() as folder:
        engine.load(Path(folder), load_weights)
        return json.loads(Path(folder, "state.json").read_text())


def report_epoch(engine: Engine, metrics: dict, state: dict, write_files: Callable[[Path], None],
                 progress=None, label: str = "") -> None:
    """Report metrics + a checkpoint: rank 0 writes state and files, every DeepSpeed rank its shard;
    rank 0 also sends the epoch's line to the driver's console (slim_ray.progress)."""
    import ray.train
    from ray.train import Checkpoint

    rank = ray.train.get_context().get_world_rank()
    if rank == 0:
        report(progress, f"{label} epoch {metrics['epoch']}: " + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items() if k != "epoch"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if engine.deep or rank == 0:
            engine.save(folder)
        if rank == 0:
            write_files(folder)
            (folder / "state.json").write_text(json.dumps(state))
        keep = engine.deep or rank == 0
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp) if keep else None)


def early_stopping(state: dict, score: float, higher_is_better: bool = True) -> bool:
    """Update best/bad_epochs in `state`; True when this epoch is the best so far."""
    improved = state["best"] is None or (score > state["best"] if higher_is_better else score < state["best"])
    if improved:
        state.update(best=score, best_epoch=state["epoch"], bad_epochs=0)
    else:
        state["bad_epochs"] += 1
    return improved
