"""`--address URL`: run an `upcycle` command as a Ray job on a cluster (Ray Jobs API).

The job runs the same command line (without `--address`) in this working directory, so every
relative path means what it means here: the cluster's nodes must see this folder (a local
cluster, or shared storage; otherwise give paths on storage they see). Its runtime env ships
the `upcycle` package itself (`py_modules`; the cluster's Python needs the dependencies) and
this side's MLflow tracking URI, so the job's runs land where `upcycle runs`/`mlflow ui` here
look. The job's logs stream to this terminal; the exit status is the job's (0 only for
SUCCEEDED). Ctrl-C stops the job.
"""

from __future__ import annotations

import asyncio
import shlex
import sys
import time
from pathlib import Path

import upcycle
from upcycle.platform.cluster import WORKER_ENV
from upcycle.platform.tracking import default_tracking_uri

AGENT_WAIT_S = 120  # how long a freshly started head may take to accept jobs
FORWARDED_ENV = (
    "RAY_AUTH_MODE",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
    "RAY_USAGE_STATS_ENABLED",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S",
)


def without_address(argv: list[str]) -> list[str]:
    """`argv` minus `--address URL` / `--address=URL`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--address":
            skip = True
        elif not arg.startswith("--address="):
            out.append(arg)
    return out


def submit(address: str, argv: list[str], *, echo=print) -> int:
    """Submit `upcycle ARGV` to the Ray cluster whose dashboard is at `address`; stream its logs
    until it ends; its exit status (0 for SUCCEEDED, 1 otherwise)."""
    import os

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env["MLFLOW_TRACKING_URI"] = default_tracking_uri()
    env |= WORKER_ENV
    command = shlex.join(["python", "-m", "upcycle.jobs.cli", *without_address(argv)])
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            job_id = client.submit_job(
                entrypoint=f"cd {shlex.quote(str(Path.cwd()))} && {command}",
                runtime_env={"py_modules": [str(Path(upcycle.__file__).parent)], "env_vars": env},
                metadata={"submitted_by": "upcycle", "command": command},
            )
            break
        except RuntimeError as e:  # a head that just started: its job agent is not up yet
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)
    echo(f"submitted Ray job {job_id} to {address}: {command}")

    async def follow() -> None:
        async for lines in client.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    try:
        asyncio.run(follow())
    except KeyboardInterrupt:
        client.stop_job(job_id)
        echo(f"stopped Ray job {job_id}")
        return 130
    status = client.get_job_status(job_id)
    echo(f"Ray job {job_id}: {status.value}")
    return 0 if status == JobStatus.SUCCEEDED else 1
