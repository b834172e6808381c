"""Progress lines from Ray workers to the driver's console. Worker logs stay off the console (Ray's
log_to_driver is off unless ray.verbose, since Ray and the libraries are noisy there), so training
loops and actors send one line per epoch or batch through a queue that the driver prints."""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator


@contextlib.contextmanager
def progress_channel(show: Callable[[str], None] = print) -> Iterator[object]:
    """A queue to hand to workers (inside a Ray session); a driver thread prints what they put on it."""
    import ray
    from ray.util.queue import Empty, Queue

    queue = Queue(actor_options={"num_cpus": 0})
    done = threading.Event()

    def drain() -> None:
        while True:
            try:
                show(queue.get(timeout=0.5))
            except Empty:
                if done.is_set():
                    return

    printer = threading.Thread(target=drain, daemon=True)
    printer.start()
    try:
        yield queue
    finally:
        done.set()
        printer.join(timeout=10)
        ray.kill(queue.actor)


def report(queue, line: str) -> None:
    """From a worker or actor: one progress line; never fails the work it describes."""
    if queue is None:
        return
    try:
        queue.put_nowait(line)
    except Exception:  # noqa: BLE001 - a full or gone queue costs a line, not the job
        pass
