"""Connect to Ray: the cluster a job was submitted to, or an in-process one on this machine.

The local defaults are the ones measured on small machines (shared/ENVIRONMENT.md): loopback only,
no auth tokens, no usage reporting, the dashboard on 127.0.0.1 (Ray Train's placement-group
cleaner asks the state API about its controller every few seconds and logs a warning each time
it cannot), a short temp dir (socket paths must stay under 107 characters) and a long
worker-group start timeout for loaded 2-core boxes.
"""

from __future__ import annotations

import logging
import os
import tempfile

import ray

# For every worker of our jobs, local or submitted: Ray Train's print patch sends a worker's
# print to a logger with a console handler *and*, when sys.stdout is wrapped (it is in Ray
# workers), to the original print as well, so every training step line appeared twice.
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
LOCAL_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "180",
    **WORKER_ENV,
}


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join `RAY_ADDRESS` if set, else start Ray in this process (no-op if already connected)."""
    if ray.is_initialized():
        return
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    ray.init(
        num_cpus=num_cpus or max(4, os.cpu_count() or 1),
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        object_store_memory=300 * 1024**2,
        _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"),
    )


def quiet_ray_data_console() -> None:
    """Keep Ray Data's INFO lines (each dataset's start, plan and finish: three per dataset) off
    this process's console; they stay in `ray-data.log` in the Ray session's log folder. Ray
    Data logs under `ray.data` to that file at DEBUG and to the console (a stream handler) at
    INFO; only the console's level changes."""
    import ray.data  # noqa: F401  (its import configures the `ray.data` logger)

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setLevel(logging.WARNING)
