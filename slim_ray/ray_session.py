"""How every stage gets a Ray cluster: join the one named, else start (and later stop) a local one.

Never `address="auto"`: on a shared machine it can attach to somebody else's cluster. A local
instance is started with `address="local"` and shut down by this process alone (never `ray stop`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from slim_ray.config import RayConfig
from slim_ray.errors import ConfigError

# Every process of ours: no hub downloads, no tokenizer thread pools fighting over 2 cores.
WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_WAIT_POLICY": "PASSIVE",
}


def resolve_address(cfg: RayConfig) -> str | None:
    """The cluster to join, or None for a fresh local instance."""
    address = cfg.address or os.environ.get("RAY_ADDRESS") or None
    if address == "auto":
        raise ConfigError("ray.address / RAY_ADDRESS 'auto' is not accepted: give the cluster's "
                          "explicit address (host:6379 or ray://host:10001)")
    return address


@contextmanager
def ray_session(cfg: RayConfig, env: dict[str, str] | None = None) -> Iterator[dict]:
    """Yields a dict describing the session; shuts Ray down afterwards only if it started a local one."""
    import ray

    if ray.is_initialized():
        yield {"address": ray.get_runtime_context().gcs_address, "started_here": False}
        return
    os.environ.update(WORKER_ENV)
    quiet = {} if cfg.verbose else {"RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0", "RAY_DEDUP_LOGS": "1"}
    os.environ.update(quiet)
    logging = {"log_to_driver": cfg.verbose, "logging_level": "INFO" if cfg.verbose else "WARNING"}
    address = resolve_address(cfg)
    if address:
        # Joining a cluster (a `ray job submit` driver, a notebook): connect once per process and stay
        # connected; later stages reuse the connection (the early return above). Disconnecting would end
        # the driver's job, and Ray would delete the job's working_dir copy (this process's cwd and
        # code) under the next stage. Stage-specific env goes to the stage's own workers instead
        # (Ray Train's worker_runtime_env; actors get their threads from num_cpus).
        ray.init(address=address, runtime_env={"env_vars": {**WORKER_ENV, **quiet}}, **logging)
    else:
        ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False, _temp_dir=cfg.temp_dir,
                 object_store_memory=cfg.object_store_memory_mb * 2**20 if cfg.object_store_memory_mb else None,
                 runtime_env={"env_vars": {**WORKER_ENV, **quiet, **(env or {})}}, **logging)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = cfg.progress_bars
    session = {"address": ray.get_runtime_context().gcs_address, "started_here": not address, "local": not address}
    if address:
        yield session
        return
    try:
        yield session
    finally:
        ray.shutdown()
