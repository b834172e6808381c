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

import dataclasses
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from slim_ray.artifacts import student_dir
from slim_ray.config import Config, DistillConfig
from slim_ray.errors import DataError
from slim_ray.prefixes import fold_of
from slim_ray.storage import DECLARED_VERSION, load_teacher_rows, model_version, write_atomic_dir
from slim_ray.student import ensure_student_base
from slim_ray.trainer import Task, fit

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


@dataclasses.dataclass(kw_only=True)
class StudentTask(Task):
    """LoRA on the student for slim_ray.trainer's loop; side["valid"]: the tokenized held-out pairs."""

    dc: DistillConfig
    base_path: str
    init_adapter: str | None
    pad_id: int
    metric: str = "valid_loss"
    higher_is_better: bool = False
    shuffle_buffer: int | None = 256
    frozen_base = True

    def build(self):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        model = lora_model(self.base_path, self.dc)
        if self.init_adapter:  # continue from a committed adapter (same LoRA shape), e.g. the demo's
            set_peft_model_state_dict(model, load_file(str(Path(self.init_adapter) / "adapter_model.safetensors")))
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=self.dc.lr)

    def load(self, engine, folder: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(engine.module, load_file(str(folder / "adapter" / "adapter_model.safetensors")))

    def collate(self, batch: dict) -> dict:
        return collate(batch, self.pad_id)

    def loss(self, engine, batch) -> torch.Tensor:
        return answer_loss(engine, batch)

    def evaluate(self, engine) -> dict:
        valid, losses, size = self.side["valid"], [], engine.micro_batch
        with torch.no_grad():  # every rank: the whole (small) held-out set, same numbers everywhere
            for begin in range(0, len(valid["input_ids"]), size):
                part = {k: v[begin:begin + size] for k, v in valid.items()}
                losses.append(answer_loss(engine, {k: v.to(engine.device)
                                                   for k, v in collate(part, self.pad_id).items()}).item())
        return {"valid_loss": float(np.mean(losses)) if losses else float("nan")}

    def files(self, engine):
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        with engine.full_parameters([p for p in engine.module.parameters() if p.requires_grad]):
            adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(engine.module).items()}

        def write(folder: Path) -> None:
            (folder / "adapter").mkdir()
            save_file(adapter, str(folder / "adapter" / "adapter_model.safetensors"))
            engine.module.peft_config["default"].save_pretrained(str(folder / "adapter"))
        return write


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
    # Absolute: Ray Train workers run in their own working directory, not the driver's.
    folder = (dc.init_adapters / (f"fold{holdout_fold}" if holdout_fold is not None else "") / "adapter").resolve()
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
    from transformers import AutoTokenizer

    dc = cfg.distill
    train_rows, valid_rows = split_users(rows, dc.valid_fraction, cfg.run.seed, dc.only_parsed)
    base_path = ensure_student_base(dc.base_model)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encode = lambda rows: tokenize_pairs(tokenizer, rows["student_messages"].tolist(),  # noqa: E731
                                         [training_target(r) for r in rows.to_dict("records")],
                                         dc.max_prompt_tokens, dc.max_target_tokens)
    train, valid = encode(train_rows), encode(valid_rows[valid_rows["parsed"]] if dc.only_parsed else valid_rows)
    adapter = init_adapter(dc, holdout_fold)
    task = StudentTask(label=f"{name} (max {dc.epochs} epochs)", seed=cfg.run.seed, dc=dc, bf16=dc.bf16,
                       base_path=base_path, init_adapter=adapter, pad_id=pad_id, side={"valid": valid})
    fitted = fit(task, dc, cfg.ray, [{"input_ids": x, "labels": y} for x, y in zip(train["input_ids"], train["labels"])],
                 name, cfg.run.output_dir / "ray_train", resume)
    state = fitted.best_state
    meta = {"base_model": dc.base_model, "base_path": base_path, "best_epoch": state["best_epoch"],
            "valid_loss": state["best"], "history": fitted.last_state["history"], "train_rows": len(train_rows),
            "train_users": int(train_rows["user_id"].nunique()),
            "heldout_users": sorted(int(u) for u in valid_rows["user_id"].unique()),
            "holdout_fold": holdout_fold, "folds": cfg.data.folds, "init_adapter": adapter,
            "strategy": dc.strategy, "zero_stage": dc.zero_stage if dc.strategy == "deepspeed" else None,
            "num_workers": dc.num_workers}
    with fitted.best.as_directory() as folder:
        export_student(Path(folder) / "adapter", base_path, out_dir, meta)
    return meta


def export_student(adapter: Path, base_path: str, out_dir: Path, meta: dict) -> None:
    """adapter/ + merged/ (base with the adapter folded in, ready for vLLM) + meta.json, atomically."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not torch.cuda.is_available():  # the merge imports DeepSpeed, which warns when it has to guess the CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    def write(tmp: Path) -> None:
        shutil.copytree(adapter, tmp / "adapter")
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
        merged.save_pretrained(tmp / "merged")
        AutoTokenizer.from_pretrained(base_path).save_pretrained(tmp / "merged")
        inputs = f"{model_version(str(adapter))}+{model_version(base_path)}"
        (tmp / "merged" / DECLARED_VERSION).write_text(hashlib.sha256(inputs.encode()).hexdigest()[:16])
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))

    write_atomic_dir(out_dir, write)
