"""Expert-load telemetry at Qwen2-57B-A14B scale: what each step logs stays a few series per
layer (not one per expert), counted through the same router hooks the training loop uses."""

from __future__ import annotations

import torch

from upcycle.config import from_name
from upcycle.moe.model import build_on_meta
from upcycle.training.metrics import ExpertLoad, expert_load_metrics


def test_57b_a14b_step_logs_at_most_four_series_per_layer():
    cfg = from_name("qwen2-57b-a14b")
    model = build_on_meta(cfg)
    load = ExpertLoad(cfg, [model], sequence_parallel=False)
    assert load.counts.shape == (28, 64) and len(load._hooks) == 28  # one hook per router

    routers = [m for m in model.modules() if type(m).__name__ == "TopKRouter"]
    generator = torch.Generator().manual_seed(0)
    for router in routers:  # 32 tokens, each to its top-8 of 64 experts
        chosen = torch.rand(32, 64, generator=generator).topk(8, dim=1).indices
        routing_map = torch.zeros(32, 64, dtype=torch.bool).scatter_(1, chosen, True)
        load._hook(router, None, (None, routing_map))
    metrics = expert_load_metrics(load.counts)

    assert len(metrics) <= 4 * cfg.num_layers + 2  # 1,792 with one series per expert
    for layer in range(cfg.num_layers):
        counts = load.counts[layer]
        assert metrics[f"expert_load/layer_{layer}/tokens"] == 32 * 8
        assert metrics[f"expert_load/layer_{layer}/max_over_mean"] == counts.max() / 4
        assert metrics[f"expert_load/layer_{layer}/idle_share"] == (counts == 0).sum() / 64
    cvs = [metrics[f"expert_load/layer_{layer}/cv"] for layer in range(28)]
    assert metrics["expert_load/cv_max"] == max(cvs) > 0


def test_balanced_load_reads_zero_cv_and_no_idle_expert():
    metrics = expert_load_metrics(torch.full((2, 8), 5.0))
    assert metrics["expert_load/layer_1/cv"] == 0.0
    assert metrics["expert_load/layer_1/max_over_mean"] == 1.0
    assert metrics["expert_load/layer_1/idle_share"] == 0.0
