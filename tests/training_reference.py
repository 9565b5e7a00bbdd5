"""The single-process reference runs that parallel, resumed and restarted runs are compared to.

Tolerance (fp32): losses and grad norms agree within a relative 1e-5. Parallel layouts change only
the order of floating-point reductions: TP splits the GEMMs and the vocab-parallel softmax over
151,936 logits, DP/EP sum gradients across ranks, PP moves activations unchanged. Measured
differences: <= 1e-8 for DP, EP and PP, <= 2e-6 (grad norm) for TP after 5 Adam steps. A wrong
gradient reduction is far larger: megatron-core's expert gradients with tp=2, ep=1, etp=1 (0.6x
the true ones, a layout `Layout` now refuses) moved the first step's grad norm by 4.5e-5.
"""

from __future__ import annotations

import pytest

from upcycle.config import Layout, from_name
from upcycle.moe.model import build_model
from upcycle.platform.checkpoint import save_checkpoint
from upcycle.platform.distributed import single_process
from upcycle.platform.tracking import spooled_metrics
from upcycle.train_config import TrainConfig
from upcycle.training.job import TrainJob
from upcycle.training.loop import LocalSink, train

RTOL = 1e-5
STEPS = 5
TRAIN = TrainConfig(steps=STEPS, seq_length=32, lr=1e-3, warmup_steps=1, clip_grad=1.0)


def reference_job(name: str, corpus, root, **model_changes) -> TrainJob:
    """A job for preset `name` (with `model_changes`) starting from a fixed random checkpoint
    written under `root`."""
    cfg = from_name(name).replace(**model_changes)
    if not (root / "init").exists():
        with single_process(seed=7):
            save_checkpoint(build_model(cfg), cfg, root / "init")
    return TrainJob(
        model=cfg,
        data=str(corpus),
        layout=Layout(micro_batch_size=2, global_batch_size=8),
        train=TRAIN,
        init_from=str(root / "init"),
        name=f"{name}-reference",
        tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
        tracking_dir=str(root / "reference-tracking"),
    )


def run_locally(job: TrainJob, out) -> dict[int, dict[str, float]]:
    """Train `job` in this process; its per-step metrics."""
    with single_process():
        train(job, LocalSink(out, keep=job.train.keep_checkpoints))
    return spooled_metrics(job.tracking_dir)


def assert_same_curve(got: dict, want: dict, steps=range(1, STEPS + 1)) -> None:
    for step in steps:
        for key in ("lm_loss", "grad_norm", "loss"):
            assert got[step][key] == pytest.approx(want[step][key], rel=RTOL), (step, key)
