"""Parallel training through the Ray worker group equals one process, step by step.

Every run starts from the same initial checkpoint (so initialisation cannot differ between
layouts) and reads the same prepared corpus. The single-process reference runs the same
`upcycle.platform.training.train` in this process.

Tolerance (fp32): losses and grad norms agree within a relative 1e-5. Parallel layouts change only
the order of floating-point reductions: TP splits the GEMMs and the vocab-parallel softmax over
151,936 logits, DP/EP sum gradients across ranks, PP moves activations unchanged. Measured
differences: <= 1e-8 for DP, EP and PP, <= 2e-6 (grad norm) for TP after 5 Adam steps. A wrong
gradient reduction is far larger: megatron-core's expert gradients with tp=2, ep=1, etp=1 (0.6x
the true ones, which `Layout` now refuses) moved the first step's grad norm by 4.5e-5.
"""

from __future__ import annotations

import dataclasses

import pytest

from upcycle.config import Layout, TrainConfig, from_name
from upcycle.moe.model import build_model
from upcycle.platform.checkpoint import save_checkpoint
from upcycle.platform.distributed import single_process
from upcycle.platform.ray_train import fit
from upcycle.platform.tracking import spooled_metrics
from upcycle.platform.training import LocalSink, TrainJob, train

RTOL = 1e-5
STEPS = 5
TRAIN = TrainConfig(steps=STEPS, seq_length=32, lr=1e-3, warmup_steps=1, clip_grad=1.0)


@pytest.fixture(scope="module")
def references(corpus, tmp_path_factory):
    """Per model: the initial checkpoint, the base job and the single-process per-step metrics."""
    out = {}
    for name in ("tiny-dense", "tiny-moe"):
        root = tmp_path_factory.mktemp(name)
        cfg = from_name(name)
        with single_process(seed=7):
            save_checkpoint(build_model(cfg), cfg, root / "init")
        job = TrainJob(
            model=cfg,
            data=str(corpus),
            layout=Layout(micro_batch_size=2, global_batch_size=8),
            train=TRAIN,
            init_from=str(root / "init"),
            name=f"{name}-reference",
            tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
            tracking_dir=str(root / "reference-tracking"),
        )
        with single_process():
            train(job, LocalSink(root / "reference"))
        out[name] = (job, spooled_metrics(root / "reference-tracking"), root)
    return out


def assert_same_curve(got: dict, want: dict, steps=range(1, STEPS + 1)) -> None:
    for step in steps:
        for key in ("lm_loss", "grad_norm", "loss"):
            assert got[step][key] == pytest.approx(want[step][key], rel=RTOL), (step, key)


CASES = [
    ("tiny-dense", dict(tp=2, sequence_parallel=True), 2, "alltoall"),
    ("tiny-dense", dict(pp=2), 2, "alltoall"),
    ("tiny-dense", dict(), 2, "alltoall"),  # DP=2
    ("tiny-moe", dict(tp=2, sequence_parallel=True), 2, "alltoall"),  # etp = tp
    ("tiny-moe", dict(pp=2), 2, "alltoall"),
    ("tiny-moe", dict(ep=2), 2, "alltoall"),
    ("tiny-moe", dict(ep=2), 2, "allgather"),
    ("tiny-moe", dict(tp=2, ep=2, etp=1, sequence_parallel=True), 2, "alltoall"),
    ("tiny-moe", dict(), 2, "alltoall"),  # DP=2
    ("tiny-moe", dict(tp=2, pp=2, ep=2, etp=1, sequence_parallel=True), 4, "alltoall"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("model", "layout", "workers", "dispatcher"), CASES)
def test_parallel_run_equals_single_process(
    references, tmp_path, model, layout, workers, dispatcher
):
    base, want, _ = references[model]
    job = dataclasses.replace(
        base,
        name=f"{model}-{workers}w-" + "-".join(f"{k}{v}" for k, v in layout.items()) + dispatcher,
        layout=Layout(micro_batch_size=2, global_batch_size=8, **layout),
        train=dataclasses.replace(TRAIN, token_dispatcher=dispatcher),
        tracking_dir="",
    )
    result = fit(job, num_workers=workers, storage_path=tmp_path)
    assert result.error is None
    got = spooled_metrics(tmp_path / job.name / "tracking")
    assert sorted(got) == list(range(1, STEPS + 1))
    assert_same_curve(got, want)
    if model == "tiny-moe":
        for step in got.values():  # every routed token counted once: tokens * top-k
            routed = sum(v for k, v in step.items() if k.startswith("expert_tokens/layer_0/"))
            assert routed == 8 * 32 * 2
