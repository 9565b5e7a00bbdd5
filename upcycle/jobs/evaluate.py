"""`upcycle eval`: held-out perplexity of a checkpoint as a Ray task, recorded as an MLflow run.

The run (named `eval-<model>` unless given) holds the checkpoint, data and window settings as
params, `eval_loss`, `perplexity` and `eval_tokens` as metrics, and an `evaluates` tag naming
the checkpoint. It goes through the same spool as training runs (upcycle.platform.tracking), kept
in `spool_dir`: an unreachable MLflow server loses nothing.
"""

from __future__ import annotations

from pathlib import Path

from upcycle.platform.evaluation import Perplexity, perplexity
from upcycle.platform.tracking import RunTracker, default_tracking_uri


def run(
    ckpt: Path,
    data: Path,
    *,
    spool_dir: Path,
    seq_length: int = 128,
    max_windows: int = 64,
    run_name: str | None = None,
    experiment: str = "upcycle",
    tracking_uri: str | None = None,
) -> Perplexity:
    import ray

    task = ray.remote(num_cpus=1, max_retries=0)(perplexity)
    result: Perplexity = ray.get(
        task.remote(
            Path(ckpt).absolute(),
            Path(data).absolute(),
            seq_length=seq_length,
            max_windows=max_windows,
        )
    )
    tracker = RunTracker(
        spool_dir,
        tracking_uri=tracking_uri or default_tracking_uri(),
        experiment=experiment,
        run_name=run_name or f"eval-{result.model}",
    )
    tracker.log_params(
        {
            "model": result.model,
            "checkpoint": result.checkpoint,
            "data": result.data,
            "seq_length": result.seq_length,
            "max_windows": max_windows,
        }
    )
    tracker.set_tags({"kind": "eval", "evaluates": result.checkpoint})
    tracker.log_metrics(0, result.metrics())
    tracker.close()
    return result
