"""`upcycle rlhf`: check the job, start the rollout engines (and the reward model), run the loop
on a Ray Train worker group, and take the actors down afterwards.

Placement: the trainer's ranks are Ray Train workers in their own placement group
(`train.threads_per_worker` CPUs each, or a GPU each where CUDA is); each rollout engine rank is
an actor with `rollout.cpus_per_rank` / `rollout.gpus_per_rank`, and the reward model an actor
of its own, so by default nothing shares a device. On one CPU machine they all fit side by side.
To colocate engines with trainer ranks on GPUs, give both fractional GPUs (for example
`rollout.gpus_per_rank: 0.5` and a trainer of 0.5 GPU per worker) so Ray packs one of each onto a
device; the engines then hold their own copy of the policy beside the trainer's, and the weight
sync becomes a device-local copy.

Fault tolerance: the engines restart (up to MAX_RESTARTS times) and retry their calls; the loop
re-sends them the weights (upcycle.rlhf.loop). A trainer rank that fails restarts the group
from the newest checkpoint (`max_failures`, Ray Train's FailureConfig), which resumes the loop
at the iteration after it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from upcycle import runtime
from upcycle.rlhf.rollout import MAX_RESTARTS, RolloutEngine
from upcycle.rlhf.scorers import scorer_for, start_reward_model
from upcycle.rlhf.spec import VERIFIER_SCORERS, RlhfJob
from upcycle.training.step import Sink


def start_engines(job: RlhfJob, seq_length: int) -> list:
    """The rollout engines: `rollout.workers` restartable actors holding the starting policy."""
    import ray

    engine = ray.remote(
        num_cpus=job.rollout.cpus_per_rank,
        num_gpus=job.rollout.gpus_per_rank,
        max_restarts=MAX_RESTARTS,
        max_task_retries=-1,
        runtime_env={"env_vars": runtime.ENGINE_THREAD_ENV},
    )(RolloutEngine)
    runner = job.rollout.runner(seq_length)
    return [
        engine.remote(str(Path(job.policy).absolute()), runner) for _ in range(job.rollout.workers)
    ]


def start_scorer_actor(job: RlhfJob, seq_length: int):
    """The reward model actor, or None for a verifier."""
    if job.scorer in VERIFIER_SCORERS:
        return None
    return start_reward_model(str(Path(job.scorer).absolute()), seq_length + 8)


def _worker(config: dict) -> None:
    from upcycle.platform.cpu import apply_cpu_patches
    from upcycle.rlhf.loop import run
    from upcycle.training.ray_train import RaySink

    apply_cpu_patches()  # in the thread that runs the model (see upcycle.platform.cpu)
    job = RlhfJob.from_dict(config["job"])
    run(job, RaySink(), config["engines"], scorer_for(job, config["scorer"]))


def _prepared(job: RlhfJob, storage_path: Path) -> RlhfJob:
    from upcycle.platform.tracking import CHECKPOINTS_TAG, default_tracking_uri
    from upcycle.training.ray_train import git_revision

    absolute = lambda p: p if p in VERIFIER_SCORERS else str(Path(p).absolute())  # noqa: E731
    return dataclasses.replace(
        job,
        policy=absolute(job.policy),
        prompts=absolute(job.prompts),
        scorer=absolute(job.scorer),
        tracking_uri=job.tracking_uri or default_tracking_uri(),
        tracking_dir=job.tracking_dir or str(storage_path / job.name / "tracking"),
        tags={
            "git_revision": git_revision(),
            CHECKPOINTS_TAG: str(storage_path / job.name),
            **job.tags,
        },  # fmt: skip
    )


def fit(job: RlhfJob, *, num_workers: int, storage_path: Path, max_failures: int = 0):
    """Validate `job` for `num_workers` trainer ranks, then run it: the Ray Train `Result`
    (its metrics: the last iteration's headline). A job whose name has checkpoints under
    `storage_path` resumes from the newest valid one."""
    import ray

    from upcycle.training.ray_train import worker_group

    _cfg, _layout, tasks = job.validate(num_workers)
    storage_path = Path(storage_path).absolute()
    job = _prepared(job, storage_path)
    seq_length = job.seq_length(tasks)
    engines = start_engines(job, seq_length)
    scorer = start_scorer_actor(job, seq_length)
    try:
        trainer = worker_group(
            _worker, {"job": job.to_dict(), "engines": engines, "scorer": scorer},
            name=job.name, num_workers=num_workers,
            threads_per_worker=job.train.threads_per_worker, storage_path=storage_path,
            max_failures=max_failures, keep_checkpoints=job.train.keep_checkpoints,
        )  # fmt: skip
        return trainer.fit()
    finally:
        for actor in [*engines, *([scorer] if scorer else [])]:
            ray.kill(actor)


def run_local(job: RlhfJob, sink: Sink, **hooks) -> dict[str, float]:
    """The loop in this process as one trainer rank (inside `single_process()`), the engines
    and scorer still Ray actors: reference runs and tests."""
    import ray

    from upcycle.rlhf.loop import run

    _cfg, _layout, tasks = job.validate(1)
    seq_length = job.seq_length(tasks)
    engines = start_engines(job, seq_length)
    scorer = start_scorer_actor(job, seq_length)
    try:
        return run(job, sink, engines, scorer_for(job, scorer), **hooks)
    finally:
        for actor in [*engines, *([scorer] if scorer else [])]:
            ray.kill(actor)
