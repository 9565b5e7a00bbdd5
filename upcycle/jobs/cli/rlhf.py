"""`upcycle rlhf`: the online RLHF loop (upcycle.rlhf) on a Ray Train worker group."""

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
    submit_if_remote,
)


@app.command("rlhf")
def rlhf(
    spec: Path = typer.Argument(..., exists=True, dir_okay=False, help="RLHF spec (YAML)"),
    workers: int = typer.Option(1, min=1, help="trainer ranks (Ray Train workers)"),
    storage: Path = typer.Option(Path("runs"), help="where checkpoints and run state go"),
    max_failures: int = typer.Option(1, min=0, help="trainer restarts from the last checkpoint"),
    address: str = typer.Option(None, help=ADDRESS_HELP),
) -> None:
    """Online RLHF: rollout engines sample K responses per prompt, a verifier or reward model
    scores them, the trainer takes online DPO or GRPO steps, and the new weights go to the
    engines in memory; iteration after iteration, tracked in MLflow."""
    import yaml

    from upcycle.platform.cluster import ensure_ray
    from upcycle.rlhf.driver import fit
    from upcycle.rlhf.spec import RlhfJob
    from upcycle.training.data import DataError

    try:
        job = RlhfJob.from_dict(yaml.safe_load(spec.read_text()) or {})
        job.validate(workers)
    except (ConfigError, DataError, yaml.YAMLError, TypeError) as e:
        fail(f"{spec}: {e}")
    submit_if_remote(address)
    ensure_ray()
    result = fit(job, num_workers=workers, storage_path=storage, max_failures=max_failures)
    console.print(f"rollouts: {Path(storage).absolute() / job.name / 'rollouts.jsonl'}")
    print_result(result, job.name, job.tracking_uri)
