"""What each rank of a distributed conversion reads, holds and writes, from shapes alone.

For `upcycle convert --dry-run --workers N --layout ...`: every rank's plan
(`upcycle.conversion.shards.plan`) is made in this process, so a 64-rank layout of
Qwen2-57B-A14B is sized in seconds without a cluster. The figures follow what the ranks do:
- reads: the dense pieces the MoE keeps (TP slices) plus each of its layers' whole FFN (the
  qwen2 permutations span it), in the source's dtype; from our own checkpoint, its dense chunk;
- holds: its MoE chunk (fp32, as written) plus the larger of two transients: while filling,
  the one-layer working set (the layer's dense FFN in fp32 and the MoE MLP tensors made from it:
  router, shared expert, its experts) and, from our checkpoint, the dense chunk; while saving,
  the save's copies: megatron-core's dist-checkpoint
  save clones every CPU tensor that is a view (filesystem_async `_clone_if_needed`), and it
  saves each SwiGLU `linear_fc1` as two views (gate, up), so all fc1 weights are held twice
  (measured: bench/upcycle_memory.py);
- writes: its pieces of the dist checkpoint; a piece that several ranks hold (data-parallel
  copies, tensors whole on every TP rank) is written by the first of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from upcycle.config import Layout, ModelConfig
from upcycle.conversion.shards import Coords, Shard, all_coords, plan

FP32 = 4


@dataclass(frozen=True)
class RankBudget:
    rank: int
    coords: Coords
    reads: int
    holds: int
    writes: int


def saves(s: Shard, c: Coords) -> bool:
    """Whether rank `c` writes piece `s` into the dist checkpoint."""
    group_rank = c.etp_rank if s.expert else c.tp_rank
    return s.primary(c) and (s.parts > 1 or group_rank == 0)


def upcycle_budget(
    dense: ModelConfig,
    moe: ModelConfig,
    layout: Layout,
    *,
    source_bytes_per_element: int = 2,
    source_is_ours: bool = False,
) -> list[RankBudget]:
    """Per rank of the resolved `layout`: bytes read, held (peak) and written."""
    out = []
    ffn = 3 * dense.ffn_hidden_size * dense.hidden_size
    h = moe.hidden_size
    for c in all_coords(layout):
        shards = plan(moe, layout, c)
        chunk = sum(s.numel for s in shards) * FP32
        layers = {s.layer for s in shards if s.layer is not None}
        kept = sum(s.numel for s in shards if ".mlp." not in s.key)
        if source_is_ours:
            dense_layout = Layout(tp=layout.tp, pp=layout.pp).resolve(layout.world_size)
            reads = sum(s.numel for s in plan(dense, dense_layout, c)) * FP32
        else:
            reads = (kept + ffn * len(layers)) * source_bytes_per_element
        local_experts = moe.num_experts // layout.ep
        made = (
            moe.num_experts * h
            + 3 * moe.shared_expert_ffn_hidden_size * h
            + local_experts * 3 * moe.moe_ffn_hidden_size * h
        )
        working = (ffn + made) * FP32 if layers else 0
        save_copies = sum(s.numel for s in shards if s.key.endswith("linear_fc1.weight")) * FP32
        source = reads if source_is_ours else 0  # the dense chunk, loaded while filling
        holds = chunk + max(working + source, save_copies)
        writes = sum(s.numel for s in shards if saves(s, c)) * FP32
        out.append(RankBudget(c.rank, c, reads, holds, writes))
    return out
