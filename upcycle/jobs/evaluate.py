"""`upcycle eval`: held-out perplexity of a checkpoint and, optionally, needle-in-a-haystack
retrieval, each as a Ray task, recorded together as one MLflow run.

The run (named `eval-<model>` unless given) holds the checkpoint, data and window settings as
params, `eval_loss`, `perplexity` and `eval_tokens` as metrics, and an `evaluates` tag naming
the checkpoint. With a `NeedleSpec` it adds the grid's settings as `niah.*` params, metrics
`niah_accuracy` (all cells), `niah_accuracy/len_L` (per length) and `niah/len_L/depth_D` (per
cell), and artifacts `needle_heatmap.png` and `needle_trials.json` (every prompt's length,
depth, number, needle position and answer). It goes through the same spool as training runs
(upcycle.platform.tracking), kept in `spool_dir`: an unreachable MLflow server loses nothing.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

from upcycle.jobs.needle import NeedleResult, NeedleSpec, run_grid
from upcycle.platform.checkpoint import read_model_config
from upcycle.platform.plots import needle_heatmap
from upcycle.platform.tracking import RunTracker, default_tracking_uri
from upcycle.training.evaluation import Perplexity, perplexity


def run(
    ckpt: Path,
    data: Path,
    *,
    spool_dir: Path,
    seq_length: int = 128,
    max_windows: int = 64,
    needle: NeedleSpec | None = None,
    run_name: str | None = None,
    experiment: str = "upcycle",
    tracking_uri: str | None = None,
) -> tuple[Perplexity, NeedleResult | None]:
    import ray

    ckpt, data = Path(ckpt).absolute(), Path(data).absolute()
    if needle is not None:  # a grid the model cannot run fails before any task starts
        needle.runner_config().check(read_model_config(ckpt))
    task = ray.remote(num_cpus=1, max_retries=0)
    ppl_ref = task(perplexity).remote(ckpt, data, seq_length=seq_length, max_windows=max_windows)
    needle_ref = task(run_grid).remote(ckpt, data, needle) if needle is not None else None
    result: Perplexity = ray.get(ppl_ref)  # both tasks run side by side
    found = ray.get(needle_ref) if needle_ref is not None else None
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
            **{f"niah.{k}": v for k, v in (dataclasses.asdict(needle) if needle else {}).items()},
        }
    )
    tracker.set_tags({"kind": "eval", "evaluates": result.checkpoint})
    tracker.log_metrics(0, result.metrics() | (found.metrics() if found else {}))
    if found:
        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / "needle_heatmap.png"
            needle_heatmap(found.accuracy(), needle.lengths, needle.depths, png)
            trials = Path(tmp) / "needle_trials.json"
            records = [dataclasses.asdict(t) | {"retrieved": t.retrieved} for t in found.trials]
            trials.write_text(json.dumps(records, indent=1))
            tracker.log_artifact(png)
            tracker.log_artifact(trials)
    tracker.close()
    return result, found
