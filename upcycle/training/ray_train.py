"""Run a `TrainJob` on a Ray Train worker group: the Ray actors own the TP/PP/EP/DP groups.

Ray Train's `TorchTrainer` places the workers with a placement group, creates the default
torch.distributed group (gloo on CPU, NCCL on GPU), restarts the group from the last reported
checkpoint on failure (`FailureConfig`), and stores checkpoints under `storage_path/name`.
Inside each worker `upcycle.training.loop.train` initialises megatron-core's parallel state
from the job's layout and trains. The job is validated against the world size before any actor
starts, so a bad layout costs no cluster time.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import posixpath
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pyarrow.fs
import ray.train
import torch.distributed as dist
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    FailureConfig,
    LoggingConfig,
    Result,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchConfig, TorchTrainer

from upcycle import runtime
from upcycle.platform.checkpoint import newest_valid
from upcycle.platform.tracking import CHECKPOINTS_TAG, default_tracking_uri
from upcycle.training.job import TrainJob
from upcycle.training.loop import train

CHECKPOINT_PREFIX = "step_"


class RaySink:
    """Checkpoints reported through `ray.train.report`, one folder per rank merged by Ray."""

    def resume_from(self) -> Path | None:
        latest = ray.train.get_checkpoint()
        if latest is None:
            return None
        fs, parent = latest.filesystem, posixpath.dirname(latest.path.rstrip("/"))
        infos = fs.get_file_info(pyarrow.fs.FileSelector(parent))
        paths = sorted(
            i.path
            for i in infos
            if i.type == pyarrow.fs.FileType.Directory
            and posixpath.basename(i.path).startswith(CHECKPOINT_PREFIX)
            and posixpath.basename(i.path)[-1].isdigit()
        )
        if isinstance(fs, pyarrow.fs.LocalFileSystem):
            chosen = newest_valid([Path(p) for p in paths], set_aside=dist.get_rank() == 0)
            dist.barrier()  # damaged ones are out of the way before anyone saves that step again
            return chosen
        local = Path(tempfile.mkdtemp(prefix="upcycle-resume-"))
        return newest_valid(
            [
                Path(Checkpoint(p, fs).to_directory(str(local / posixpath.basename(p))))
                for p in paths
            ]
        )

    def save(self, step: int, metrics: dict, write: Callable[[Path], None]) -> None:
        with tempfile.TemporaryDirectory(prefix="upcycle-ckpt-") as tmp:
            write(Path(tmp))
            ray.train.report(
                metrics,
                checkpoint=Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{step:07d}",
            )


def _worker(config: dict) -> None:
    from upcycle.platform.cpu import apply_cpu_patches

    apply_cpu_patches()  # in the thread that runs the model (see upcycle.platform.cpu)
    train(TrainJob.from_dict(config), RaySink())


def git_revision() -> str:
    """The commit of the upcycle source tree, or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _quiet_reports(fn: Callable[[dict], None], config: dict) -> None:
    """Run `fn(config)` without Ray Train's line per report at INFO ("Reporting training result
    N: TrainingReport(...)"): Ray 2.x logs it under a logger named by its file's path
    (`logging.getLogger(__file__)` in ray.train.v2._internal.execution.context), which the
    `ray.train` level of LoggingConfig does not reach and the worker's INFO root logger prints."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    fn(config)


def worker_group(
    fn: Callable[[dict], None],
    config: dict,
    *,
    name: str,
    num_workers: int,
    threads_per_worker: int,
    storage_path: Path,
    max_failures: int,
    keep_checkpoints: int = 0,
) -> TorchTrainer:
    """A Ray Train `TorchTrainer` running `fn(config)` on `num_workers` ranks (a GPU each where
    CUDA is, else `threads_per_worker` CPUs), checkpoints under `storage_path/name`, the newest
    `keep_checkpoints` of them kept (0: all)."""
    return TorchTrainer(
        functools.partial(_quiet_reports, fn),
        train_loop_config=config,
        torch_config=TorchConfig(backend=runtime.distributed_backend()),
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=runtime.has_cuda(),
            resources_per_worker={"CPU": threads_per_worker},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage_path),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints or None),
            # Ray Train's INFO lines (each report's TrainingReport, each checkpoint's path, the
            # worker list) stay in its log files under the Ray session folder, off the console.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def fit(
    job: TrainJob,
    *,
    num_workers: int,
    storage_path: Path,
    max_failures: int = 0,
) -> Result:
    """Validate `job` for `num_workers` ranks, then train it on a Ray Train worker group.

    A job whose name already has checkpoints under `storage_path` resumes from the newest valid
    one. The MLflow run's spool lives at `storage_path/name/tracking`.
    """
    job.validate(num_workers)
    storage_path = Path(storage_path).absolute()
    absolute = lambda p: str(Path(p).absolute()) if p else p  # noqa: E731  workers' cwd differs
    job = dataclasses.replace(
        job,
        data=absolute(job.data),
        init_from=absolute(job.init_from),
        resume_from=absolute(job.resume_from),
        dpo=dataclasses.replace(job.dpo, reference=absolute(job.dpo.reference)),
        tracking_uri=job.tracking_uri or default_tracking_uri(),
        tracking_dir=job.tracking_dir or str(storage_path / job.name / "tracking"),
        tags={
            "git_revision": git_revision(),
            CHECKPOINTS_TAG: str(storage_path / job.name),  # `upcycle serve --model runs:/ID`
            **job.tags,
        },
    )
    trainer = worker_group(
        _worker, job.to_dict(), name=job.name, num_workers=num_workers,
        threads_per_worker=job.train.threads_per_worker, storage_path=storage_path,
        max_failures=max_failures, keep_checkpoints=job.train.keep_checkpoints,
    )  # fmt: skip
    return trainer.fit()
