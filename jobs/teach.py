"""`ray job submit --working-dir . -- python -m jobs.teach --config FILE`"""
from jobs import run

if __name__ == "__main__":
    run("teach")
