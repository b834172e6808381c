"""Ray job entrypoint: `ray job submit --working-dir . -- python -m jobs.pipeline --config FILE`."""

from slim_ray.cli import app

if __name__ == "__main__":
    app(["pipeline", *__import__("sys").argv[1:]])
