"""`upcycle train / sft / dpo / reward train` on a Ray Train worker group, and the MLflow `runs`
commands."""

from __future__ import annotations

from pathlib import Path

import typer

from upcycle.config import ConfigError
from upcycle.jobs.cli.common import (
    ADDRESS_HELP,
    app,
    console,
    fail,
    print_result,
    reward_app,
    runs_app,
    submit_if_remote,
)


def _training_command(name: str, objective: str | None, doc: str, group: typer.Typer = app) -> None:
    """Register `upcycle [GROUP] NAME SPEC`: one job runner for train, sft, dpo and reward."""

    def command(
        spec: Path = typer.Argument(..., exists=True, dir_okay=False, help="job spec (YAML)"),
        workers: int = typer.Option(1, min=1, help="Ray Train workers (ranks)"),
        storage: Path = typer.Option(Path("runs"), help="where checkpoints and run state go"),
        max_failures: int = typer.Option(1, min=0, help="restarts from the last checkpoint"),
        address: str = typer.Option(None, help=ADDRESS_HELP),
    ) -> None:
        _run_training(spec, objective, workers, storage, max_failures, address)

    command.__doc__ = doc
    group.command(name)(command)


_training_command(
    "train",
    None,
    "Train (or resume) the job in SPEC on a Ray Train worker group; tracked in MLflow.",
)


_training_command(
    "sft", "sft",
    """Supervised fine-tuning on ChatML conversations (data: JSONL of {"messages": [...]}):
    loss on the assistant's tokens, conversations packed without seeing each other.""",
)  # fmt: skip


_training_command(
    "dpo", "dpo",
    """Direct Preference Optimization on offline pairs (data: JSONL of {"prompt", "chosen",
    "rejected"}) against the frozen starting model; logs reward margins and accuracy.""",
)  # fmt: skip


_training_command(
    "train", "reward",
    """Train a reward model (the spec's model + a score head) on preference pairs (data: JSONL
    of {"prompt", "chosen", "rejected"}) with the Bradley-Terry loss; logs accuracy and margin.""",
    group=reward_app,
)  # fmt: skip


def _run_training(spec, objective, workers, storage, max_failures, address) -> None:
    """sft/dpo/reward set (or check) the spec's objective; `train` takes it as written."""
    import yaml

    from upcycle.platform.cluster import ensure_ray
    from upcycle.training.data import DataError
    from upcycle.training.job import TrainJob
    from upcycle.training.ray_train import fit

    try:
        data = yaml.safe_load(spec.read_text()) or {}
        if objective and isinstance(data, dict):
            if data.setdefault("objective", objective) != objective:
                command = "reward train" if objective == "reward" else objective
                raise ConfigError(
                    "objective",
                    f"{data['objective']!r}, but `upcycle {command}` runs {objective}",
                )
        job = TrainJob.from_dict(data)
        job.validate(workers)
    except (ConfigError, DataError, yaml.YAMLError, TypeError) as e:
        fail(f"{spec}: {e}")
    submit_if_remote(address)
    ensure_ray()
    result = fit(job, num_workers=workers, storage_path=storage, max_failures=max_failures)
    print_result(result, job.name, job.tracking_uri)


@runs_app.command("register")
def runs_register(
    run_id: str = typer.Argument(..., help="a training run's MLflow id"),
    name: str = typer.Argument(..., help="registered model name"),
    tracking_uri: str = typer.Option(
        None, help="MLflow (default: MLFLOW_TRACKING_URI or ./mlflow.db)"
    ),
) -> None:
    """Register a training run's newest checkpoint as a model version (serve it as models:/NAME)."""
    from upcycle.deploy.sources import register

    try:
        version, ckpt = register(run_id, name, tracking_uri=tracking_uri)
    except ConfigError as e:
        fail(str(e))
    console.print(f"models:/{name}/{version} -> {ckpt}")


@runs_app.command("import")
def runs_import(
    spool: Path = typer.Argument(..., exists=True, file_okay=False, help="a run's tracking folder"),
    tracking_uri: str = typer.Option(None, help="deliver here instead of the run's own server"),
) -> None:
    """Deliver a run's spooled metrics (kept while MLflow was unreachable) to MLflow."""
    from upcycle.platform.tracking import replay

    console.print(f"delivered to run {replay(spool, tracking_uri)}")
