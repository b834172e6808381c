"""`ray job submit --working-dir . -- python -m jobs.pipeline --config FILE`"""
from jobs import run

if __name__ == "__main__":
    run("pipeline")
