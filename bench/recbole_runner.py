"""Runs one RecBole 1.2.1 model on ML-100k and prints a JSON line (bench only).

Executed with the separate RecBole environment (bench/setup_recbole_env.sh), never the project's:
  .bench-venv-recbole/bin/python bench/recbole_runner.py --model SASRec --epochs 8 --out result.json
Reports test metrics (full ranking) plus the split itself (raw user -> raw test item) so that
bench/backbones.py can assert that both sides evaluated the identical split (`--split-only`: just
the split, no training). `--export-weights CKPT` writes a trained model's weights with its item tokens
(raw ids) to --out as .npz, so that bench/backbones.py can score RecBole's model with slim-ray's evaluator.
"""

import argparse
import json
import os
import time

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # RecBole's pickled checkpoints


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="SASRec", choices=["SASRec", "GRU4Rec", "SRGNN"])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--data-path", default=None, help="folder holding DATASET/DATASET.{inter,item}")
    parser.add_argument("--dataset", default="ml-100k", help="ml-100k always reads RecBole's packaged copy")
    parser.add_argument("--out", required=True)
    parser.add_argument("--split-only", action="store_true", help="dump counts + test targets, no training")
    parser.add_argument("--export-weights", default=None, help="a RecBole checkpoint (.pth) to export as .npz")
    args = parser.parse_args()

    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_seed

    torch.set_num_threads(args.threads)
    config = Config(model=args.model, dataset=args.dataset, config_dict={
        "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]},
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
        "MAX_ITEM_LIST_LENGTH": args.max_len, "loss_type": "CE", "train_neg_sample_args": None,
        "valid_metric": "NDCG@10", "metrics": ["Hit", "NDCG", "MRR"], "topk": [5, 10, 20],
        "epochs": args.epochs, "train_batch_size": args.batch_size, "eval_batch_size": 4096,
        "stopping_step": args.patience, "seed": args.seed, "reproducibility": True,
        "checkpoint_dir": os.path.join(args.workdir, "saved"), "show_progress": False,
        "log_wandb": False, "data_path": args.data_path,
    })
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    counts = {"users": int(dataset.user_num - 1), "items": int(dataset.item_num - 1),
              "interactions": int(len(dataset.inter_feat))}  # before sequence augmentation
    train_data, valid_data, test_data = data_preparation(config, dataset)
    test = test_data._dataset.inter_feat
    users = dataset.id2token(dataset.uid_field, test[dataset.uid_field].numpy())
    items = dataset.id2token(dataset.iid_field, test[dataset.iid_field].numpy())
    split = {**counts, "test_targets": {str(u): str(i) for u, i in zip(users, items)}}
    if args.export_weights:
        import numpy as np

        state = torch.load(args.export_weights, map_location="cpu")["state_dict"]
        np.savez(args.out, item_tokens=np.array(dataset.field2id_token[dataset.iid_field], dtype=str),
                 **{key: value.numpy() for key, value in state.items()})
        return
    if args.split_only:
        with open(args.out, "w") as f:
            json.dump(split, f)
        return
    # Importing RecBole's sequential models turns anomaly detection on globally (~1.6x slower).
    torch.autograd.set_detect_anomaly(False)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    start = time.perf_counter()
    best_valid, valid_result = trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    train_s = time.perf_counter() - start
    test_result = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    result = {
        "model": args.model, "epochs": args.epochs, "patience": args.patience, "seed": args.seed,
        "train_s": train_s, "best_valid_ndcg10": float(best_valid), "saved_model_file": trainer.saved_model_file,
        # RecBole sums batch losses per epoch; per batch, as slim-ray reports it:
        "train_loss": [float(loss) / len(train_data) for _, loss in sorted(trainer.train_loss_dict.items())],
        "test": {k.lower(): float(v) for k, v in test_result.items()}, **split,
    }
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
