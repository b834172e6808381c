"""`ray job submit --working-dir . -- python -m jobs.index --config FILE [--train.fusion slim]`"""
from jobs import run

if __name__ == "__main__":
    run("index")
