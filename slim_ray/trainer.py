"""The one training loop: Ray Train workers under DDP or DeepSpeed ZeRO, for every model we train.

A `Task` says what is trained (backbones: slim_ray.train; the student: slim_ray.distill): how to build
the model and its optimizer, turn a Ray Data batch into tensors, compute the loss, score the
validation data, and write the epoch's files. Everything else lives here once: the DeepSpeed config
(gradient clipping, accumulation, warm-up/decay schedule from the section's `LoopConfig` fields),
checkpoints and resume, early stopping, progress lines, and the TorchTrainer set-up (`fit`). Large
read-only side data (`Task.side`) travels as Ray object refs, not inside `train_loop_config`.
On CPU: gloo, DS_ACCELERATOR=cpu, fp32 (bf16 is ~15x slower on AVX2-only CPUs); on GPU: NCCL.
A checkpoint folder holds `state.json` (epoch, early-stopping state, metric history) and the task's
files from rank 0; with DeepSpeed every rank adds its optimizer partition (tag "ds").
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from slim_ray.config import LoopConfig, RayConfig, cache_root
from slim_ray.progress import report


def worker_env(use_gpu: bool, threads: int) -> dict[str, str]:
    env = {"OMP_NUM_THREADS": str(threads)}
    if not use_gpu:
        # Ops DeepSpeed JIT-compiles on CPU are built once per environment: keep them in our cache.
        env.update(DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(cache_root() / "torch_extensions")))
    return env


def micro_batch_size(spec: LoopConfig, world: int) -> int:
    return max(1, spec.batch_size // (world * spec.grad_accum))


def lr_factor(spec: LoopConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak rate at optimizer step `step`: linear warm-up, then constant or decay to 0."""
    warmup = int(spec.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if spec.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 1.0 - progress if spec.lr_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def deepspeed_config(spec: LoopConfig, micro_batch: int, bf16: bool = False) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": spec.grad_accum,
        "gradient_clipping": spec.grad_clip or 0.0,
        "zero_optimization": {"stage": spec.zero_stage},
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


class Engine:
    """A model ready to train under DDP (via Ray) or DeepSpeed, with one step/save/load API; the same
    clipping, accumulation and learning-rate schedule either way."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, spec: LoopConfig,
                 micro_batch: int, total_steps: int, bf16: bool = False, frozen_base: bool = False):
        import ray.train.torch

        # frozen_base (LoRA): checkpoints skip the frozen weights (~540 MB each for SmolLM2).
        self.spec, self.micro_batch, self.frozen_base, self.micro_steps = spec, micro_batch, frozen_base, 0
        self.deep, self.stage3 = spec.strategy == "deepspeed", spec.strategy == "deepspeed" and spec.zero_stage == 3
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(spec, total_steps))
        if self.deep:
            import deepspeed

            if not spec.use_gpu:
                # DeepSpeed's CPU backend JIT-compiles its shared-memory comm op (~2 min in every new
                # environment) although only inference all-reduce uses it; training all-reduces go through
                # torch.distributed (gloo). Marking the op unbuildable skips the compile.
                deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
            deepspeed.init_distributed(dist_backend="nccl" if spec.use_gpu else "gloo")
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=self.scheduler,
                config=deepspeed_config(spec, micro_batch, bf16))
            self.module = self.engine.module
        else:
            self.engine, self.optimizer, self.module = ray.train.torch.prepare_model(model), optimizer, model
        self.device = ray.train.torch.get_device() if spec.use_gpu else torch.device("cpu")

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def step(self, loss: torch.Tensor) -> None:
        """One micro-batch; the optimizer (and the schedule) steps every grad_accum of them."""
        if self.deep:  # DeepSpeed scales, accumulates, clips and steps the scheduler itself
            self.engine.backward(loss)
            self.engine.step()
            return
        (loss / self.spec.grad_accum).backward()
        self.micro_steps += 1
        if self.micro_steps % self.spec.grad_accum == 0:
            if self.spec.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.spec.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

    def full_parameters(self, params=None):
        """Context in which parameters are whole (ZeRO-3 partitions them across ranks)."""
        if not self.stage3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(params or self.module.parameters()), modifier_rank=None)

    def save(self, folder: Path) -> None:
        """Optimizer, schedule (and DeepSpeed) state; the model weights are the task's own files."""
        if self.deep:
            self.engine.save_checkpoint(str(folder), tag="ds",  # every rank writes its partition
                                        exclude_frozen_parameters=self.frozen_base)
        else:
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "micro_steps": self.micro_steps}, folder / "optimizer.pt")

    def load(self, folder: Path, load_weights: Callable[[Path], None]) -> None:
        if self.deep:
            self.engine.load_checkpoint(str(folder), tag="ds", load_module_strict=not self.frozen_base)
        else:
            load_weights(folder)
            saved = torch.load(folder / "optimizer.pt")
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            self.micro_steps = saved["micro_steps"]


@dataclasses.dataclass(kw_only=True)
class Task:
    """What one training job plugs into the loop. Subclasses fill in the methods below; `side` holds
    large read-only data (`fit` ships it as object refs, `setup` resolves them in each worker)."""

    label: str
    seed: int
    metric: str  # the validation metric that selects the kept epoch and drives early stopping
    higher_is_better: bool
    side: dict[str, Any] = dataclasses.field(default_factory=dict)
    frozen_base = False  # LoRA: the base model's weights are not trained and not checkpointed
    shuffle_buffer: int | None = None
    bf16: bool = False

    def setup(self) -> None:
        import ray

        self.side = {k: ray.get(v) if isinstance(v, ray.ObjectRef) else v for k, v in self.side.items()}

    def build(self) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        raise NotImplementedError

    def prepare(self, engine: Engine) -> None:
        """After the engine wraps the model (e.g. ZeRO-3 registrations)."""

    def load(self, engine: Engine, folder: Path) -> None:
        raise NotImplementedError

    def collate(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: torch.as_tensor(v) for k, v in batch.items()}

    def loss(self, engine: Engine, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return engine(batch)

    def evaluate(self, engine: Engine) -> dict:
        raise NotImplementedError

    def files(self, engine: Engine) -> Callable[[Path], None]:
        """Writes the epoch's model files into a checkpoint folder (rank 0)."""
        raise NotImplementedError


def _collate_fn(task: Task):
    from ray.data.collate_fn import NumpyBatchCollateFn

    class Collate(NumpyBatchCollateFn):  # Ray moves the result to the worker's device
        def __call__(self, batch):
            return task.collate(batch)
    return Collate()


def train_loop_per_worker(config: dict) -> None:
    """Runs in every Ray Train worker, for every task."""
    import ray.train

    task, spec = config["task"], config["spec"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(spec.cpus_per_worker)
    torch.manual_seed(task.seed)  # identical init on every rank
    task.setup()
    model, optimizer = task.build()
    micro_batch = micro_batch_size(spec, world)
    engine = Engine(model, optimizer, spec, micro_batch, config["total_steps"], task.bf16, task.frozen_base)
    task.prepare(engine)
    state = restore_state(engine, lambda folder: task.load(engine, folder),
                          {"epoch": 0, "best": None, "best_epoch": 0, "bad_epochs": 0, "history": []})
    shard, collate = ray.train.get_dataset_shard("train"), _collate_fn(task)
    for epoch in range(state["epoch"] + 1, spec.epochs + 1):
        torch.manual_seed(task.seed + 1000 * epoch + rank)  # dropout differs per rank/epoch
        engine.train()
        total, steps, start = 0.0, 0, time.perf_counter()
        for batch in shard.iter_torch_batches(batch_size=micro_batch, collate_fn=collate,
                                              local_shuffle_buffer_size=task.shuffle_buffer or None,
                                              local_shuffle_seed=task.seed + epoch):
            loss = task.loss(engine, batch)
            engine.step(loss)
            total, steps = total + loss.item(), steps + 1
        train_s = time.perf_counter() - start
        engine.train(False)
        valid = task.evaluate(engine)
        state["epoch"] = epoch
        early_stopping(state, valid[task.metric], task.higher_is_better)
        metrics = {"epoch": epoch, "train_loss": total / max(steps, 1), **valid, "steps": steps,
                   "lr": engine.scheduler.get_last_lr()[0], "train_s": round(train_s, 1),
                   "valid_s": round(time.perf_counter() - start - train_s, 1),
                   "epoch_s": round(time.perf_counter() - start, 1),
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        state["history"].append(metrics)
        report_epoch(engine, metrics, state, task.files(engine), config["progress"], task.label)
        if spec.patience and state["bad_epochs"] >= spec.patience:
            break


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


@dataclasses.dataclass
class Fitted:
    best: Any         # the best epoch's ray.train.Checkpoint
    best_state: dict  # its state.json (best_epoch, best score)
    last_state: dict  # the latest checkpoint's state.json: the history of every epoch run
    wall_s: float


def fit(task: Task, spec: LoopConfig, ray_cfg: RayConfig, dataset_rows: Any, name: str, storage: Path,
        resume: bool = False) -> Fitted:
    """Train `task` on `dataset_rows` (a pyarrow table or a list of dicts) with a TorchTrainer under
    storage/name; `resume` continues from that run's latest checkpoint instead of starting over."""
    import ray
    import ray.data
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from slim_ray.progress import progress_channel
    from slim_ray.ray_session import ray_session

    storage = storage.resolve()
    if not resume:
        shutil.rmtree(storage / name, ignore_errors=True)
    rows = dataset_rows.num_rows if hasattr(dataset_rows, "num_rows") else len(dataset_rows)
    micro_batch = micro_batch_size(spec, spec.num_workers)
    steps_per_epoch = math.ceil(math.ceil(rows / spec.num_workers) / micro_batch / spec.grad_accum)
    env = worker_env(spec.use_gpu, spec.cpus_per_worker)
    # Read by the TorchTrainer from this process's environment and passed on to its controller.
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(ray_cfg.train_poll_s)
    start = time.perf_counter()
    with ray_session(ray_cfg, env=env), progress_channel() as progress:
        shipped = dataclasses.replace(task, side={k: ray.put(v) for k, v in task.side.items()})
        dataset = ray.data.from_arrow(dataset_rows) if hasattr(dataset_rows, "num_rows") else ray.data.from_items(dataset_rows)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"task": shipped, "spec": spec, "progress": progress,
                               "total_steps": spec.epochs * steps_per_epoch},
            torch_config=TorchConfig(backend="nccl" if spec.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=spec.num_workers, use_gpu=spec.use_gpu,
                                         resources_per_worker={"CPU": spec.cpus_per_worker}),
            run_config=RunConfig(name=name, storage_path=str(storage), worker_runtime_env={"env_vars": env},
                                 checkpoint_config=CheckpointConfig(
                                     num_to_keep=2, checkpoint_score_attribute=task.metric,
                                     checkpoint_score_order="max" if task.higher_is_better else "min")),
            datasets={"train": dataset},
        )
        result = trainer.fit()
    pick = max if task.higher_is_better else min
    best, _ = pick(result.best_checkpoints, key=lambda pair: pair[1][task.metric])
    # The latest checkpoint's history covers every epoch run, including those after the best one.
    with result.checkpoint.as_directory() as folder:
        last_state = json.loads(Path(folder, "state.json").read_text())
    with best.as_directory() as folder:
        best_state = json.loads(Path(folder, "state.json").read_text())
    return Fitted(best, best_state, last_state, time.perf_counter() - start)
