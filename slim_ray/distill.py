"""Stage `distill`: LoRA fine-tuning of the student on (simplified prompt -> teacher rationale).

Pure core: `split_users` and `tokenize_pairs` (chat template of the base model; loss only on the
rationale tokens, the prompt is masked with -100). Ray wrapper: a TorchTrainer whose workers wrap
the PEFT model in DeepSpeed ZeRO (stage 2 default, 3 available) or DDP, stream Ray Data shards,
report validation loss and an adapter checkpoint every epoch, and resume from the latest one.
Output, RUN_DIR/student/ (with distill.cross_fit, RUN_DIR/student/fold{k}/ per fold, each trained
without fold k's users): adapter/ (best validation epoch), merged/ (base + adapter, an HF folder
vLLM can load), meta.json (loss curves, held-out users, holdout_fold).
"""

from __future__ import annotations

import json
import re
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from slim_ray.artifacts import student_dir
from slim_ray.config import Config, DistillConfig
from slim_ray.distributed import Engine, early_stopping, report_epoch, restore_state, worker_env
from slim_ray.errors import DataError
from slim_ray.prefixes import fold_of
from slim_ray.storage import load_teacher_rows, write_atomic_dir
from slim_ray.student import ensure_student_base

IGNORE = -100


def split_users(rows: pd.DataFrame, valid_fraction: float, seed: int, only_parsed: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train / held-out users (seeded). Held-out users keep every row, for a fair quality eval."""
    rows = rows[rows["rationale"].notna()]
    users = np.array(sorted(rows["user_id"].unique()))
    rng = np.random.default_rng(seed)
    held = set(rng.choice(users, size=max(1, int(round(len(users) * valid_fraction))), replace=False).tolist())
    train = rows[~rows["user_id"].isin(held)]
    if only_parsed:
        train = train[train["parsed"]]
    valid = rows[rows["user_id"].isin(held)]
    if train.empty:
        raise DataError("no usable teacher rationales to train on (all failed or unparsed)")
    return train.reset_index(drop=True), valid.reset_index(drop=True)


def training_target(row) -> str:
    """The teacher's rationale, normalised to the three labelled steps when it parsed. Step 3 drops the
    "[genre, ...]" tags the teacher copies from the candidate list (they repeat step 2, and every token
    the student learns to write is paid again for every user in the backfill) and a heading line such
    as "Recommended movies from the candidate list:" (the student is shown no candidate list)."""
    steps = list(row["steps"]) if row.get("steps") is not None else []
    if row.get("parsed") and len(steps) == 3:
        items = re.sub(r"[ \t]*\[[^\]\n]*\]", "", steps[2])
        steps[2] = re.sub(r"\A[^\n]*:[ \t]*\n\s*", "", items).strip() or items
        return "\n".join(f"Step {i}: {step}" for i, step in enumerate(steps, start=1))
    return str(row["rationale"]).strip()


def tokenize_pairs(tokenizer, messages: list[str], targets: list[str], max_prompt: int, max_target: int) -> dict:
    """input_ids / labels per example: the chat-templated prompt (masked) + rationale + EOS."""
    input_ids, labels = [], []
    for conversation, target in zip(messages, targets):
        prompt = tokenizer.apply_chat_template(json.loads(conversation), add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
        prompt = list(prompt)[-max_prompt:]
        answer = tokenizer(target.strip(), add_special_tokens=False)["input_ids"][:max_target]
        answer = answer + [tokenizer.eos_token_id]
        input_ids.append(np.asarray(prompt + answer, dtype=np.int32))
        labels.append(np.asarray([IGNORE] * len(prompt) + answer, dtype=np.int32))
    return {"input_ids": input_ids, "labels": labels}


def collate(batch: dict, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a numpy batch of variable-length rows into tensors."""
    width = max(len(x) for x in batch["input_ids"])
    size = len(batch["input_ids"])
    ids = torch.full((size, width), pad_id, dtype=torch.long)
    labels = torch.full((size, width), IGNORE, dtype=torch.long)
    mask = torch.zeros((size, width), dtype=torch.long)
    for row, (x, y) in enumerate(zip(batch["input_ids"], batch["labels"])):
        ids[row, : len(x)] = torch.as_tensor(x)
        labels[row, : len(y)] = torch.as_tensor(y)
        mask[row, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def answer_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens (labels != IGNORE), as the HF loss with `labels` gives,
    but with vocabulary logits only for positions from the batch's earliest answer on: the ~49k-word
    head over every prompt position cost most of the step's memory and a good part of its time."""
    labels = batch["labels"]
    first = int((labels != IGNORE).int().argmax(1).min()) - 1  # the position that predicts the earliest answer token
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=torch.arange(first, labels.size(1) - 1, device=labels.device)).logits
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                                             labels[:, first + 1:].reshape(-1), ignore_index=IGNORE)


def lora_model(base_path: str, dc: DistillConfig):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.bfloat16 if dc.bf16 else torch.float32)
    lora = LoraConfig(r=dc.lora_r, lora_alpha=dc.lora_alpha, lora_dropout=dc.lora_dropout,
                      target_modules=dc.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def distill_loop_per_worker(config: dict) -> None:
    import ray.train
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    dc = DistillConfig(**config["distill"])
    world = ray.train.get_context().get_world_size()
    torch.set_num_threads(dc.cpus_per_worker)
    torch.manual_seed(config["seed"])
    model = lora_model(config["base_path"], dc)
    if config["init_adapter"]:  # continue from a committed adapter (same LoRA shape), e.g. the demo's
        set_peft_model_state_dict(model, load_file(str(Path(config["init_adapter"]) / "adapter_model.safetensors")))
    micro_batch = max(1, dc.batch_size // world)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=dc.lr)
    engine = Engine(model, optimizer, dc.strategy, dc.zero_stage, micro_batch, dc.use_gpu, dc.bf16,
                    frozen_base=True)
    trainable = [p for p in engine.module.parameters() if p.requires_grad]

    def load_adapter(folder: Path) -> None:
        set_peft_model_state_dict(engine.module, load_file(str(folder / "adapter" / "adapter_model.safetensors")))

    state = restore_state(engine, load_adapter, {"epoch": 0, "best": None, "best_epoch": 0, "bad_epochs": 0,
                                                 "history": []})
    pad_id, valid = config["pad_id"], config["valid"]
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(state["epoch"] + 1, dc.epochs + 1):
        engine.train()
        total, steps, start = 0.0, 0, time.perf_counter()
        for batch in shard.iter_batches(batch_size=micro_batch, batch_format="numpy",
                                        local_shuffle_buffer_size=256, local_shuffle_seed=config["seed"] + epoch):
            loss = answer_loss(engine, {k: v.to(engine.device) for k, v in collate(batch, pad_id).items()})
            engine.step(loss)
            total, steps = total + loss.item(), steps + 1
        engine.train(False)
        valid_losses = []
        with torch.no_grad():  # every rank: the whole (small) held-out set, same numbers everywhere
            for begin in range(0, len(valid["input_ids"]), micro_batch):
                part = {k: v[begin:begin + micro_batch] for k, v in valid.items()}
                valid_losses.append(answer_loss(engine, {k: v.to(engine.device)
                                                         for k, v in collate(part, pad_id).items()}).item())
        state["epoch"] = epoch
        valid_loss = float(np.mean(valid_losses)) if valid_losses else float("nan")
        early_stopping(state, valid_loss, higher_is_better=False)
        metrics = {"epoch": epoch, "train_loss": total / max(steps, 1), "valid_loss": valid_loss,
                   "steps": steps, "epoch_s": time.perf_counter() - start,
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        state["history"].append(metrics)
        with engine.full_parameters(trainable):
            adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(engine.module).items()}

        def write(folder: Path) -> None:
            (folder / "adapter").mkdir()
            save_file(adapter, str(folder / "adapter" / "adapter_model.safetensors"))
            engine.module.peft_config["default"].save_pretrained(str(folder / "adapter"))

        report_epoch(engine, metrics, state, write, config["progress"], f"distill {config['label']}")


def run_distill(cfg: Config, resume: bool = False) -> dict:
    """One student, or with distill.cross_fit one per fold trained without that fold's users (the
    backfill then writes each user's rationales with the student that never saw the user)."""
    rows = load_teacher_rows(cfg)
    if not cfg.distill.cross_fit:
        return _distill(cfg, rows, "distill", student_dir(cfg), resume)
    folds = cfg.data.folds
    metas = {}
    for fold in range(folds):
        keep = fold_of(rows["user_id"].to_numpy(), folds) != fold
        metas[fold] = _distill(cfg, rows[keep], f"distill-fold{fold}", student_dir(cfg, fold), resume, holdout_fold=fold)
    return {"cross_fit": True, "folds": folds, "students": {str(fold): metas[fold] for fold in range(folds)}}


def init_adapter(dc: DistillConfig, holdout_fold: int | None) -> str | None:
    """The adapter folder distill.init_adapters holds for this student (fold{k}/adapter when cross-fitted,
    so a fold's student only ever continues from weights that never saw that fold), checked for shape."""
    if dc.init_adapters is None:
        return None
    folder = dc.init_adapters / (f"fold{holdout_fold}" if holdout_fold is not None else "") / "adapter"
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise DataError(f"distill.init_adapters: no adapter at {folder}")
    saved = json.loads(config_file.read_text())
    if saved.get("r") != dc.lora_r or sorted(saved.get("target_modules") or []) != sorted(dc.target_modules):
        raise DataError(f"distill.init_adapters: {folder} has r={saved.get('r')} on {saved.get('target_modules')}, "
                        f"the config asks for r={dc.lora_r} on {dc.target_modules}")
    return str(folder)


def _distill(cfg: Config, rows: pd.DataFrame, name: str, out_dir: Path, resume: bool,
             holdout_fold: int | None = None) -> dict:
    import ray.data
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from transformers import AutoTokenizer

    from slim_ray.progress import progress_channel
    from slim_ray.ray_session import ray_session

    dc = cfg.distill
    train_rows, valid_rows = split_users(rows, dc.valid_fraction, cfg.run.seed, dc.only_parsed)
    base_path = ensure_student_base(dc.base_model)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encode = lambda rows: tokenize_pairs(tokenizer, rows["student_messages"].tolist(),  # noqa: E731
                                         [training_target(r) for r in rows.to_dict("records")],
                                         dc.max_prompt_tokens, dc.max_target_tokens)
    train, valid = encode(train_rows), encode(valid_rows[valid_rows["parsed"]] if dc.only_parsed else valid_rows)
    storage = (cfg.run.output_dir / "ray_train").resolve()
    if not resume:
        shutil.rmtree(storage / name, ignore_errors=True)
    env = worker_env(dc.use_gpu, dc.cpus_per_worker)
    with ray_session(cfg.ray, env=env), progress_channel() as progress:
        trainer = TorchTrainer(
            distill_loop_per_worker,
            train_loop_config={"distill": dc.model_dump(mode="json"), "seed": cfg.run.seed, "base_path": base_path,
                               "init_adapter": init_adapter(dc, holdout_fold), "progress": progress,
                               "label": f"{name} (max {dc.epochs} epochs)",
                               "pad_id": pad_id, "valid": valid},
            torch_config=TorchConfig(backend="nccl" if dc.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=dc.num_workers, use_gpu=dc.use_gpu,
                                         resources_per_worker={"CPU": dc.cpus_per_worker}),
            run_config=RunConfig(name=name, storage_path=str(storage), worker_runtime_env={"env_vars": env},
                                 checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="valid_loss",
                                                                    checkpoint_score_order="min")),
            datasets={"train": ray.data.from_items([{"input_ids": x, "labels": y} for x, y in
                                                    zip(train["input_ids"], train["labels"])])},
        )
        result = trainer.fit()
    best, _ = min(result.best_checkpoints, key=lambda pair: pair[1]["valid_loss"])
    with result.checkpoint.as_directory() as latest:
        history = json.loads(Path(latest, "state.json").read_text())["history"]
    with best.as_directory() as folder:
        state = json.loads(Path(folder, "state.json").read_text())
        meta = {"base_model": dc.base_model, "base_path": base_path, "best_epoch": state["best_epoch"],
                "valid_loss": state["best"], "history": history, "train_rows": len(train_rows),
                "train_users": int(train_rows["user_id"].nunique()),
                "heldout_users": sorted(int(u) for u in valid_rows["user_id"].unique()),
                "holdout_fold": holdout_fold, "folds": cfg.data.folds,
                "init_adapter": init_adapter(dc, holdout_fold),
                "strategy": dc.strategy, "zero_stage": dc.zero_stage if dc.strategy == "deepspeed" else None,
                "num_workers": dc.num_workers}
        export_student(Path(folder) / "adapter", base_path, out_dir, meta)
    return meta


def export_student(adapter: Path, base_path: str, out_dir: Path, meta: dict) -> None:
    """adapter/ + merged/ (base with the adapter folded in, ready for vLLM) + meta.json, atomically."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def write(tmp: Path) -> None:
        shutil.copytree(adapter, tmp / "adapter")
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
        merged.save_pretrained(tmp / "merged")
        AutoTokenizer.from_pretrained(base_path).save_pretrained(tmp / "merged")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))

    write_atomic_dir(out_dir, write)
