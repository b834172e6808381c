"""Our SASRec / GRU4Rec / SRGNN vs RecBole 1.2.1's on the identical ML-100k split, equal budgets.

  python bench/backbones.py --epochs 8                      # all three models
  python bench/backbones.py --epochs 8 --models SASRec      # one
  python bench/backbones.py --epochs 8 --models GRU4Rec --seeds 0 1 2 --reuse-ours   # 3 seeds a side

Both sides: the same chronological order (RecBole gets rank timestamps, see recbole_input), leave-one-out (last item test, second last valid), chronological order, max_len 50,
CE loss over all items, batch 256, Adam lr 1e-3, same epochs, model selected on valid NDCG@10 with
the same unmasked protocol as RecBole's (train.select_masks_history=false), test scored by full ranking over all items with history items NOT masked (RecBole's protocol for
sequential models; our masked numbers are reported beside). RecBole runs in its own environment
(bench/setup_recbole_env.sh). The script asserts equal user/item/interaction counts and identical
test targets before comparing. Writes bench/results/backbones.json and a BENCHMARKS.md section.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import PREFIX_OBJECTIVE, ROOT, publish  # noqa: E402

from slim_ray.config import load_config  # noqa: E402
from slim_ray.datasets import packaged_ml100k_dir  # noqa: E402
from slim_ray.evaluation import evaluate  # noqa: E402
from slim_ray.fusion import build_model  # noqa: E402
from slim_ray.prepare import run_prepare  # noqa: E402
from slim_ray.storage import load_prepared  # noqa: E402
from slim_ray.train import SELECT_METRIC, run_evaluate, run_train, training_table  # noqa: E402

RECBOLE_PY = ROOT / ".bench-venv-recbole" / "bin" / "python"
RECBOLE_DATASET = "ml-100k-ranked"
METRICS = ("ndcg@10", "hit@10", "ndcg@20", "hit@20", "mrr@10")


def recbole_input(workdir: Path) -> Path:
    """ML-100k for RecBole with each timestamp replaced by its chronological rank.

    RecBole's ml-100k config min-max normalises timestamps and stores them as float32, which ties
    interactions seconds apart and reorders them by file position (4 users' test items change).
    Ranks are exact in float32, so RecBole sees the true chronological order, as slim-ray does.
    The copy has its own dataset name: RecBole reads its packaged copy whenever it is "ml-100k".
    """
    source = packaged_ml100k_dir()
    target = workdir / "recbole_data" / RECBOLE_DATASET
    target.mkdir(parents=True, exist_ok=True)
    header, *rows = (source / "ml-100k.inter").read_text().splitlines()
    fields = [row.split("\t") for row in rows if row]
    order = sorted(range(len(fields)), key=lambda i: int(float(fields[i][3])))  # stable
    rank = {row: position for position, row in enumerate(order)}
    lines = [header] + ["\t".join(f[:3] + [str(rank[i])]) for i, f in enumerate(fields)]
    (target / f"{RECBOLE_DATASET}.inter").write_text("\n".join(lines) + "\n")
    shutil.copy(source / "ml-100k.item", target / f"{RECBOLE_DATASET}.item")
    return target.parent


def run_recbole(workdir: Path, out: Path, *args: str, load: bool = True) -> dict | None:
    cmd = [str(RECBOLE_PY), str(ROOT / "bench" / "recbole_runner.py"), *args, "--workdir", str(workdir),
           "--data-path", str(recbole_input(workdir)), "--dataset", RECBOLE_DATASET, "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=workdir, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text()) if load else None


def recbole_result(model: str, epochs: int, patience: int, workdir: Path, reuse: bool, offset: int = 0) -> dict:
    """RecBole's run for this model and seed (2020 + offset); an earlier identical run is reused."""
    out = workdir / (f"recbole_{model}.json" if offset == 0 else f"recbole_{model}_seed+{offset}.json")
    if reuse and out.is_file():
        cached = json.loads(out.read_text())
        if (cached.get("epochs"), cached.get("patience")) == (epochs, patience) and "test" in cached:
            return cached
    return run_recbole(workdir, out, "--model", model, "--epochs", str(epochs), "--patience", str(patience),
                       "--seed", str(2020 + offset))


def check_identical_split(recbole: dict, stats: dict, items, sequences) -> None:
    ours = stats["after_filtering"]
    for key in ("users", "items", "interactions"):
        assert recbole[key] == ours[key], f"{key}: RecBole {recbole[key]} vs ours {ours[key]}"
    raw_item = dict(zip(items["item_id"], items["raw_id"]))
    targets = {u: raw_item[t] for u, t in zip(sequences["raw_user_id"], sequences["test_target"])}
    assert targets == recbole["test_targets"], "test targets differ between RecBole and slim-ray"


# RecBole parameter name -> ours, for the models whose layers map one to one.
RECBOLE_KEYS = {"GRU4Rec": {"item_embedding.weight": "item_embedding.weight", "gru_layers.weight_ih_l0": "gru.weight_ih_l0",
                            "gru_layers.weight_hh_l0": "gru.weight_hh_l0", "dense.weight": "dense.weight",
                            "dense.bias": "dense.bias"}}


def recbole_model_in_ours(model: str, recbole: dict, workdir: Path, items, sequences, max_len: int) -> dict | None:
    """RecBole's trained weights loaded into our class and scored by our evaluator (unmasked).

    Equal numbers to RecBole's own mean the architecture and the evaluation agree exactly, so a gap
    between the two sides can only come from training (seeds, data order, dropout draws).
    """
    checkpoint = recbole.get("saved_model_file")
    if model not in RECBOLE_KEYS or not checkpoint or not Path(checkpoint).is_file():
        return None
    npz = workdir / (Path(checkpoint).stem + ".npz")
    run_recbole(workdir, npz, "--model", model, "--export-weights", checkpoint, load=False)
    weights = np.load(npz)
    row = {str(token): i for i, token in enumerate(weights["item_tokens"])}
    order = np.array([0] + [row[str(raw)] for raw in items.sort_values("item_id")["raw_id"]])  # ours -> RecBole
    state = {ours: torch.from_numpy(weights[theirs][order] if ours == "item_embedding.weight" else weights[theirs])
             for theirs, ours in RECBOLE_KEYS[model].items()}
    net = build_model("none", model, len(items) + 1, max_len, {}, None)
    net.load_state_dict(state)
    return {split: {m: evaluate(net, sequences, len(items) + 1, max_len, split=split, mask_history=False)["full"][
        m.replace("hit", "hr")] for m in ("ndcg@10", "hit@10")} for split in ("valid", "test")}


def training_evidence(pairs: list[dict]) -> dict:
    """Per-side best validation NDCG@10 and mean train loss per epoch, over the seeds."""
    mean = lambda values: float(np.mean(values)) if values and None not in values else None  # noqa: E731
    losses = [p["recbole_train_loss"] for p in pairs]
    return {"ours_valid_ndcg10": mean([p.get("ours_valid_ndcg10") for p in pairs]),
            "recbole_valid_ndcg10": mean([p.get("recbole_valid_ndcg10") for p in pairs]),
            "train_loss_per_epoch": {
                "ours": np.mean([p["ours_train_loss"] for p in pairs], axis=0).round(4).tolist(),
                "recbole": np.mean(losses, axis=0).round(4).tolist() if None not in losses else None}}


def _seconds(value) -> str:
    return f"{value:.0f}" if value is not None else "n/a"


def one_pair(base, model: str, offset: int, args) -> dict:
    """Our model and RecBole's for one seed offset, scored on RecBole's (unmasked) protocol."""
    out_dir = args.workdir if offset == 0 else args.workdir / f"seed+{offset}"
    cfg = base.model_copy(update={"train": base.train.model_copy(update={"backbone": model}),
                                  "run": base.run.model_copy(update={"output_dir": out_dir,
                                                                     "seed": base.run.seed + offset})})
    if offset:
        run_prepare(cfg.data, cfg.prepared_dir)
    meta_path = cfg.model_dir() / "meta.json"
    previous = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if (args.reuse_ours and len(previous.get("history", [])) == args.epochs
            and previous.get("select_masks_history") is False
            and previous.get("shuffle_buffer") == cfg.train.shuffle_buffer):
        meta = previous
    else:
        meta = run_train(cfg)
    # RecBole ranks history items for sequential models (no masking): compare on that protocol.
    report = run_evaluate(cfg, mask_history=False)
    masked = run_evaluate(cfg)["full"]
    print(model, f"seed+{offset} ours NDCG@10 {report['full']['ndcg@10']:.4f}", flush=True)
    recbole = recbole_result(model, args.epochs, args.patience, args.workdir, not args.no_reuse, offset)
    items, sequences, _ = load_prepared(cfg.prepared_dir)
    return {"recbole_model_under_our_evaluator": recbole_model_in_ours(model, recbole, args.workdir, items, sequences,
                                                                       cfg.data.max_len),
            "recbole_valid_ndcg10": recbole.get("best_valid_ndcg10"), "ours_valid_ndcg10": meta[SELECT_METRIC],
            "recbole_train_loss": recbole.get("train_loss"), "seed_offset": offset,
            "ours": {m: report["full"][m.replace("hit", "hr")] for m in METRICS},
            "recbole": {m: recbole["test"][m] for m in METRICS}, "ours_best_epoch": meta["best_epoch"],
            "ours_history_masked": {m: masked[m.replace("hit", "hr")] for m in METRICS},
            "ours_train_wall_s": meta.get("train_wall_s"), "recbole_train_s": recbole["train_s"],
            "ours_train_loss": [h["train_loss"] for h in meta["history"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--models", nargs="+", default=["SASRec", "GRU4Rec", "SRGNN"])
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench_backbones")
    parser.add_argument("--no-reuse", action="store_true", help="rerun RecBole even if a result exists")
    parser.add_argument("--reuse-ours", action="store_true", help="re-evaluate our models trained earlier "
                        "with the same epoch budget instead of retraining them")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="seed offsets: 0 = ours run.seed "
                        "42 / RecBole 2020 (the cached pair); k runs both sides with seeds +k")
    parser.add_argument("--shuffle-buffer", type=int, default=None,
                        help="our per-epoch local shuffle window in rows; default: the whole training table, "
                        "i.e. a full seeded reshuffle every epoch, as RecBole's; 0 replays one order every epoch")
    args = parser.parse_args()

    subprocess.run(["bash", str(ROOT / "bench" / "setup_recbole_env.sh")], check=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    base = load_config(ROOT / "configs" / "ml100k.yaml", [
        f"run.output_dir={args.workdir}", f"train.epochs={args.epochs}", f"train.patience={args.patience}",
        "train.num_workers=1", "train.cpus_per_worker=2", *PREFIX_OBJECTIVE, "train.lr=0.001",
        "train.select_masks_history=false"])
    stats = run_prepare(base.data, base.prepared_dir)
    items, sequences, _ = load_prepared(base.prepared_dir)
    if args.shuffle_buffer is None:  # a window as large as the table = a full reshuffle per epoch
        args.shuffle_buffer = training_table(sequences, base.data.max_len).num_rows
    base = base.model_copy(update={"train": base.train.model_copy(update={"shuffle_buffer": args.shuffle_buffer})})
    check_identical_split(run_recbole(args.workdir, args.workdir / "recbole_split.json", "--split-only"),
                          stats, items, sequences)

    # Models not rerun keep their earlier rows (with the seeds and shuffle they were measured with).
    results_path = ROOT / "bench" / "results" / "backbones.json"
    earlier = json.loads(results_path.read_text())["models"] if results_path.is_file() else {}
    rows = {m: {"seeds_per_side": 1, "shuffle_buffer": 0, **r} for m, r in earlier.items()}
    for model in args.models:
        pairs = [one_pair(base, model, offset, args) for offset in args.seeds]
        ours = {m: float(np.mean([p["ours"][m] for p in pairs])) for m in METRICS}
        theirs = {m: float(np.mean([p["recbole"][m] for p in pairs])) for m in METRICS}
        rows[model] = {"ours": ours, "recbole": theirs, "runs": pairs, "seeds_per_side": len(args.seeds),
                       "shuffle_buffer": args.shuffle_buffer,
                       "ours_ndcg10_std": float(np.std([p["ours"]["ndcg@10"] for p in pairs])),
                       "recbole_ndcg10_std": float(np.std([p["recbole"]["ndcg@10"] for p in pairs])),
                       "ours_train_wall_s": pairs[0]["ours_train_wall_s"], "recbole_train_s": pairs[0]["recbole_train_s"],
                       "ndcg10_ratio": ours["ndcg@10"] / theirs["ndcg@10"],
                       "hit10_ratio": ours["hit@10"] / theirs["hit@10"], **training_evidence(pairs)}
        print(model, json.dumps({k: v for k, v in rows[model].items() if k != "runs"}), flush=True)

    summary = {"ndcg10_ratio_vs_recbole": {m: r["ndcg10_ratio"] for m, r in rows.items()},
               "hit10_ratio_vs_recbole": {m: r["hit10_ratio"] for m, r in rows.items()},
               "epochs": args.epochs, "seeds": {m: r["seeds_per_side"] for m, r in rows.items()},  # a side
               "shuffle_buffer": {m: r["shuffle_buffer"] for m, r in rows.items()},  # one protocol: all equal
               "identical_split_checked": True}
    std = lambda r, side: f" ± {r[side + '_ndcg10_std']:.4f}" if side + "_ndcg10_std" in r else ""  # noqa: E731
    lines = ["| model | seeds a side | our shuffle window | ours NDCG@10 | RecBole NDCG@10 | ratio | ours HR@10 "
             "| RecBole HR@10 | ratio | ours train+startup s | RecBole train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in rows.items():
        lines.append(f"| {m} | {r['seeds_per_side']} | {r['shuffle_buffer'] or 'none (same order each epoch)'} | "
                     f"{r['ours']['ndcg@10']:.4f}{std(r, 'ours')} | {r['recbole']['ndcg@10']:.4f}{std(r, 'recbole')} | "
                     f"**{r['ndcg10_ratio']:.3f}** | {r['ours']['hit@10']:.4f} | {r['recbole']['hit@10']:.4f} | "
                     f"{r['hit10_ratio']:.3f} | {_seconds(r['ours_train_wall_s'])} | {_seconds(r['recbole_train_s'])} |")
    notes = (f"ML-100k (943 users, 1,682 items, 100,000 interactions; identical split asserted), "
             f"{args.epochs} epochs each side, mean ± std over the seeds of each row (ratio = ratio "
             "of the means), test full ranking over all items with history items not "
             "masked (RecBole's protocol for sequential models), model chosen on valid NDCG@10 under that same "
             "protocol by each side. RecBole reshuffles the training prefixes every epoch; ours shuffles the "
             "table once and then, per epoch, through a seeded Ray Data local shuffle window of the given size "
             "(97,171 rows = the whole training table: a full reshuffle every epoch; rows measured "
             "without a window replayed one order every epoch). Equal budgets, not converged runs: a "
             "floor for both sides, not the literature's converged numbers. Ours: Ray Train, 1 worker x 2 "
             "threads, time includes Ray start-up and per-epoch validation; RecBole: its trainer's fit() time. "
             "Runs may share the machine with other work, so times are context only.")
    for m, r in rows.items():
        for run in r.get("runs", []):
            if not (check := run.get("recbole_model_under_our_evaluator")):
                continue
            notes += (f" Cross-check ({m}, seed +{run['seed_offset']}): RecBole's trained weights loaded into our "
                      f"{m} and scored by our evaluator give valid/test NDCG@10 {check['valid']['ndcg@10']:.4f}/"
                      f"{check['test']['ndcg@10']:.4f}; RecBole's own numbers are "
                      f"{run['recbole_valid_ndcg10']:.4f}/{run['recbole']['ndcg@10']:.4f}.")
        loss = r.get("train_loss_per_epoch", {})
        if loss.get("recbole"):
            notes += (f" {m} mean train loss per epoch (CE per batch, mean over seeds), ours "
                      f"{', '.join(f'{v:.3f}' for v in loss['ours'])}; RecBole "
                      f"{', '.join(f'{v:.3f}' for v in loss['recbole'])}; best valid NDCG@10 ours "
                      f"{r['ours_valid_ndcg10']:.4f}, RecBole {r['recbole_valid_ndcg10']:.4f}.")
    publish("backbones", "Backbones vs RecBole 1.2.1 (ML-100k, full ranking)",
            {"summary": summary, "models": rows}, "\n".join(lines), notes)


if __name__ == "__main__":
    main()
