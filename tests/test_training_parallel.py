"""Parallel training through the Ray worker group equals one process, step by step.

Every run starts from the same initial checkpoint (so initialisation cannot differ between
layouts) and reads the same prepared corpus. The single-process reference runs the same
`upcycle.training.loop.train` in this process.

The tolerance and why: tests/training_reference.py.
"""

from __future__ import annotations

import dataclasses

import pytest
from training_reference import STEPS, TRAIN, assert_same_curve, reference_job, run_locally

from upcycle.config import Layout
from upcycle.platform.tracking import spooled_metrics
from upcycle.training.ray_train import fit

# Each case is a Ray Train worker group (~30 s on 2 cores), so a layout another test already
# proves against one process is not repeated here:
# - tiny-dense TP=2 + SP: the reward model's tp=2 run (tests/test_reward_model.py) and RLHF's
#   dense weight sync (tests/test_rlhf.py); the vocab-parallel LM loss: tiny-moe's TP=2 case.
# - tiny-dense PP=2: the interleaved pp=2 case below and SFT / DPO on two stages
#   (tests/test_post_training.py).
# - tiny-moe EP=2 all-to-all: the 4-worker case, the TP2/EP2 resume and reshard runs
#   (tests/test_training_checkpoints.py) and RLHF's MoE weight sync.
# - tiny-dense DP=2, tiny-moe PP=2 and 2-worker TP2/EP2/ETP1: DP=2 on tiny-moe (dense layers
#   included) and the 4-worker case (pipeline stages with MoE layers, experts with their own etp).
CASES = [
    ("tiny-moe", dict(tp=2, sequence_parallel=True), 2, "alltoall"),  # etp = tp
    ("tiny-moe", dict(ep=2), 2, "allgather"),
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
            assert step["expert_load/layer_0/tokens"] == 8 * 32 * 2


@pytest.mark.slow
def test_interleaved_pipeline_equals_single_process(corpus, tmp_path):
    """pp=2 with two virtual stages per rank: megatron-core's interleaved 1F1B schedule."""
    base = reference_job("tiny-dense", corpus, tmp_path, num_layers=4)
    want = run_locally(base, tmp_path / "reference")
    job = dataclasses.replace(
        base,
        name="dense-pp2-vpp2",
        layout=Layout(pp=2, vpp=2, micro_batch_size=2, global_batch_size=8),
        tracking_dir="",
    )
    assert fit(job, num_workers=2, storage_path=tmp_path).error is None
    assert_same_curve(spooled_metrics(tmp_path / job.name / "tracking"), want)
