"""`ray job submit --working-dir . -- python -m jobs.train_folds --config FILE`"""
from jobs import run

if __name__ == "__main__":
    run("train-folds")
