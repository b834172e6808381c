"""`ray job submit --working-dir . -- python -m jobs.backfill --config FILE`"""
from jobs import run

if __name__ == "__main__":
    run("backfill")
