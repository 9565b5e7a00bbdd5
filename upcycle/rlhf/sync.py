"""Policy weights from the trainer's ranks to the rollout engines, in memory, re-laid out.

The trainer holds the policy under its own layout (tp/pp/ep/dp); a rollout engine holds it under
another (usually tp 1). Both sides describe their pieces with the same plan the distributed
conversions use (`upcycle.conversion.shards`: which slice of which full tensor a rank holds):

- `gather_full` (every trainer rank): each tensor's pieces are gathered within its TP group
  (routed experts: expert-TP), and the first rank of each group, in the first data-parallel
  copy, keeps the full tensor. Pipeline stages and expert-parallel ranks each keep their own
  layers and experts, so the union over ranks is the whole model, each tensor once.
- `Inbox` (a rollout engine): collects one part per trainer rank for a version; when all parts
  are in, the engine applies them.
- `ModelRunner.load_weights` (every rank of a rollout engine, upcycle.deploy.engine.runner): copies its
  slice of each full tensor (`take`) into its model, under its own layout.
The parts travel as Ray objects: each trainer rank puts its part once and every rollout engine
reads it (the object store moves the bytes between nodes; on one machine they are shared
memory). There is no disk and no format conversion: both sides run the same model code.
"""

from __future__ import annotations

import torch

from upcycle.config import Layout, ModelConfig
from upcycle.conversion.shards import check_chunk, gather, plan, this_rank, writes


@torch.no_grad()
def gather_full(chunk: torch.nn.Module, cfg: ModelConfig, layout: Layout) -> dict:
    """The full tensors this trainer rank sends (fp32-exact copies on the CPU), by full key.

    Every rank must call it (the TP gathers are collective); ranks that are not the first of
    their group return the tensors they were not asked to send as an empty dict."""
    coords = this_rank(layout)
    shards = plan(cfg, layout, coords)
    tensors = check_chunk(getattr(chunk, "module", chunk), shards)
    out = {}
    for s in shards:
        if not s.primary(coords):  # a data-parallel copy: its twin in dp rank 0 sends it
            continue
        full = gather(tensors[s.local].detach(), s)
        if writes(s, coords) and s.key not in out:  # a tied output layer: the embedding once
            out[s.key] = full.cpu().clone()
    return out


class Inbox:
    """A rollout engine's parts of one policy version: complete when every trainer rank's
    part has arrived (parts of an older version are dropped: a newer sync started)."""

    def __init__(self) -> None:
        self.version, self.parts, self.expected = -1, {}, 0

    def add(self, version: int, rank: int, world: int, part: dict) -> dict | None:
        """File `part`; the merged full tensors once all `world` parts of `version` are in."""
        if version != self.version:
            self.version, self.parts, self.expected = version, {}, world
        self.parts[rank] = part
        if len(self.parts) < self.expected:
            return None
        merged = {k: v for p in self.parts.values() for k, v in p.items()}
        self.parts = {}
        return merged


def nbytes(full: dict) -> int:
    return sum(t.numel() * t.element_size() for t in full.values())
