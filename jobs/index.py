"""`ray job submit --working-dir . -- python -m jobs.index --config FILE [--fusion slim]`"""
from jobs import run

if __name__ == "__main__":
    run("index")
