"""Expert-load telemetry, which megatron-core does not report the way we log it.

`ExpertLoad` counts the tokens routed to each expert per layer with forward hooks on
megatron-core's routers, summed over every rank that saw different tokens (data- and
sequence-parallel). What gets logged must scale to Qwen2-57B-A14B: its 28 layers x 64 experts
would be 1,792 MLflow series per step, one chart each. So each step logs four summaries per
layer (`expert_load_metrics`), and the whole layers x experts matrix goes out as an artifact
(`.npy` plus a heatmap) every `train.expert_load_interval` steps (`ExpertLoadArtifacts`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.moe.router import TopKRouter

from upcycle import runtime
from upcycle.config import ModelConfig
from upcycle.platform.plots import expert_load_heatmap
from upcycle.platform.tracking import RunTracker


class ExpertLoad:
    """Counts tokens per expert per layer across all ranks; reset every step."""

    def __init__(self, cfg: ModelConfig, chunks: list[torch.nn.Module], sequence_parallel: bool):
        self.cfg = cfg
        self.sequence_parallel = sequence_parallel
        self.counts = torch.zeros(
            cfg.num_layers, max(cfg.num_experts, 1), dtype=torch.float64, device=runtime.device()
        )
        self._hooks = [
            m.register_forward_hook(self._hook)
            for chunk in chunks
            for m in chunk.modules()
            if isinstance(m, TopKRouter)
        ]

    def _hook(self, router: TopKRouter, _inputs, outputs) -> None:
        _probs, routing_map = outputs
        self.counts[router.layer_number - 1] += routing_map.sum(0).to(self.counts)

    def collect(self) -> torch.Tensor:
        """[layers, experts] tokens routed in the forward passes since the last collect (CPU)."""
        counts = self.counts.clone()
        self.counts.zero_()
        if not self.cfg.is_moe:
            return counts[:, :0].cpu()
        dist.all_reduce(counts)  # layers live on one stage; ranks of a stage see distinct tokens
        if not self.sequence_parallel:
            # Without sequence parallelism every tensor-parallel rank routes the same tokens.
            counts /= parallel_state.get_tensor_model_parallel_world_size()
        return counts.cpu()


def expert_load_metrics(counts: torch.Tensor) -> dict[str, float]:
    """One step's [layers, experts] routed-token counts as 4 series per layer plus 2 overall.

    Per layer L, under `expert_load/layer_L/`: `cv` (std / mean of tokens per expert; 0 is
    perfectly balanced), `max_over_mean` (the busiest expert's load over the mean: what sets an
    expert-parallel step's time), `idle_share` (share of experts that got no token) and `tokens`
    (tokens routed: tokens x top-k when none are dropped). Overall: the worst layer's `cv` and
    `max_over_mean`.
    """
    counts = counts.double()
    mean = counts.mean(dim=1).clamp_min(1e-12)
    per_layer = {
        "cv": counts.std(dim=1, correction=0) / mean,
        "max_over_mean": counts.amax(dim=1) / mean,
        "idle_share": (counts == 0).double().mean(dim=1),
        "tokens": counts.sum(dim=1),
    }
    out = {
        f"expert_load/layer_{layer}/{name}": value
        for name, values in per_layer.items()
        for layer, value in enumerate(values.tolist())
    }
    out["expert_load/cv_max"] = float(per_layer["cv"].max())
    out["expert_load/max_over_mean_max"] = float(per_layer["max_over_mean"].max())
    return out


class ExpertLoadArtifacts:
    """The full layers x experts token matrix as MLflow artifacts (rank 0's tracker only).

    Every `interval` steps: `expert_load/step_NNNNNNN.npy` (int64 [layers, experts], tokens
    routed since the previous file) and its heatmap `.png`. At the end: `expert_load.npy` and
    `expert_load.png` over every step this process ran.
    """

    def __init__(self, tracker: RunTracker | None, interval: int, shape: tuple[int, int]):
        self.tracker, self.interval = tracker, interval
        self.since = torch.zeros(shape, dtype=torch.float64)
        self.total = torch.zeros(shape, dtype=torch.float64)

    def add(self, step: int, counts: torch.Tensor) -> None:
        self.since += counts
        self.total += counts
        if self.interval and step % self.interval == 0:
            self._log(self.since, f"step_{step:07d}", folder="expert_load")
            self.since.zero_()

    def finish(self) -> None:
        self._log(self.total, "expert_load")

    def _log(self, counts: torch.Tensor, stem: str, folder: str = "") -> None:
        if self.tracker is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            npy = Path(tmp) / f"{stem}.npy"
            np.save(npy, counts.round().to(torch.int64).numpy())
            png = expert_load_heatmap(counts, Path(tmp) / f"{stem}.png")
            for path in (npy, png):
                self.tracker.log_artifact(path, folder)
