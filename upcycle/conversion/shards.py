"""Which slice of which full tensor each rank of a layout holds: the plan a distributed
conversion fills, reads, gathers and writes by.

A rank's model chunk (megatron-core's GPTModel under that rank's parallel state) holds, for each
of its parameters, one piece of a full (one-process) tensor: its pipeline stage's layers, its
expert-parallel block of experts, and a tensor-parallel slice. The slicing rules are
megatron-core's module semantics: column-parallel weights (`linear_qkv`, `linear_fc1`, the
embedding and the output layer) split rows, row-parallel ones (`linear_proj`, `linear_fc2`) split
columns, a SwiGLU `linear_fc1` = [gate; up] splits each half, norms, the router and the shared
expert's gate are whole; routed experts use the expert-tensor-parallel size (etp), everything
else tp. megatron-core sets its own partition attributes only on initialised weights, so the
rules are written here once; every rank checks its plan against the chunk it built
(`check_chunk`), and the conversion tests check the values against one-process conversions.

Ranks are numbered as megatron-core numbers them (`RankGenerator`, order tp-cp-ep-dp-pp), so a
dry run can plan all ranks of a 64-GPU layout in one process from shapes alone.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cache

import torch
from megatron.core import parallel_state
from megatron.core.parallel_state import RankGenerator

from upcycle.config import ConfigError, Layout, ModelConfig
from upcycle.dense.hf_weights import CheckpointError, megatron_shapes

_ORDER = "tp-cp-ep-dp-pp"  # megatron-core's default
_COLUMN = ("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight")
_ROW = ("linear_proj.weight", "linear_fc2.weight")
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")  # TP splits their rows
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")


@dataclass(frozen=True)
class Coords:
    """One rank's place in a resolved layout."""

    rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    ep_rank: int
    etp_rank: int
    edp_rank: int  # data-parallel rank among the copies of this rank's experts


def all_coords(layout: Layout) -> list[Coords]:
    """Every rank's coordinates, by megatron-core's own rank generators."""
    world = layout.world_size
    dense = RankGenerator(tp=layout.tp, ep=1, dp=layout.dp, pp=layout.pp, cp=1, order=_ORDER)
    expert_dp = world // (layout.pp * layout.ep * layout.expert_tp)
    experts = RankGenerator(
        tp=layout.expert_tp, ep=layout.ep, dp=expert_dp, pp=layout.pp, cp=1, order=_ORDER
    )

    def position(gen: RankGenerator, token: str) -> dict[int, int]:
        return {r: i for group in gen.get_ranks(token) for i, r in enumerate(group)}

    tp, pp, dp = (position(dense, t) for t in ("tp", "pp", "dp"))
    ep, etp, edp = (position(experts, t) for t in ("ep", "tp", "dp"))
    return [Coords(r, tp[r], pp[r], dp[r], ep[r], etp[r], edp[r]) for r in range(world)]


def this_rank(layout: Layout) -> Coords:
    """This process's coordinates from megatron-core's parallel state (checked against
    `all_coords`, so a dry run's per-rank figures name the ranks a real run has)."""
    ps = parallel_state
    here = Coords(
        rank=torch.distributed.get_rank(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        etp_rank=ps.get_expert_tensor_parallel_rank(),
        edp_rank=ps.get_expert_data_parallel_rank(),
    )
    planned = all_coords(layout)[here.rank]
    if here != planned:
        raise RuntimeError(f"megatron-core placed rank {here.rank} at {here}, planned {planned}")
    return here


@dataclass(frozen=True)
class Shard:
    """One parameter of a rank's chunk: `local` in the chunk's state dict is piece `index` of
    `parts` along `dim` of the full tensor `key` (global layer and expert numbers)."""

    local: str
    key: str
    full_shape: tuple[int, ...]
    dim: int | None  # None: the whole tensor
    parts: int
    index: int
    glu: bool  # [gate; up]: each half split
    expert: bool  # a routed expert's weight (etp, expert-parallel)
    layer: int | None  # global layer number

    @property
    def local_shape(self) -> tuple[int, ...]:
        if self.dim is None:
            return self.full_shape
        shape = list(self.full_shape)
        shape[self.dim] //= self.parts
        return tuple(shape)

    def bounds(self, length: int) -> tuple[int, int]:
        """This piece's [start, stop) along a split dimension of `length`."""
        size = length // self.parts
        return self.index * size, (self.index + 1) * size

    @property
    def numel(self) -> int:
        return math.prod(self.local_shape)

    def primary(self, c: Coords) -> bool:
        """Whether `c` holds the first copy of this piece (the one a checkpoint writes)."""
        return (c.edp_rank if self.expert else c.dp_rank) == 0


def writes(s: Shard, c: Coords) -> bool:
    """Whether rank `c` writes the full tensor of `s` in an export: the first rank of its
    (expert-)TP group, in the first data-parallel copy."""
    return s.primary(c) and (c.etp_rank if s.expert else c.tp_rank) == 0


def take(full: torch.Tensor, s: Shard) -> torch.Tensor:
    """The piece of `full` that `s` describes."""
    if s.dim is None:
        return full
    if s.glu:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(s.parts)[s.index], up.chunk(s.parts)[s.index]])
    return full.chunk(s.parts, dim=s.dim)[s.index]


def join(pieces: list[torch.Tensor], s: Shard) -> torch.Tensor:
    """The full tensor from all `parts` pieces of `s`, in index order (`take`'s inverse)."""
    if s.dim is None:
        return pieces[0]
    if s.glu:
        halves = [p.chunk(2, dim=0) for p in pieces]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return torch.cat(pieces, dim=s.dim)


def gather(t: torch.Tensor, s: Shard) -> torch.Tensor:
    """The full tensor of `s` from this rank's piece `t`: an all-gather within its TP group
    (routed experts: expert-TP) that every rank of the group joins."""
    if s.parts == 1:
        return t
    group = (
        parallel_state.get_expert_tensor_parallel_group()
        if s.expert
        else parallel_state.get_tensor_model_parallel_group()
    )
    pieces = [torch.empty_like(t) for _ in range(s.parts)]
    torch.distributed.all_gather(pieces, t.contiguous(), group=group)
    return join(pieces, s)


@cache
def _full_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    return megatron_shapes(cfg)


def plan(cfg: ModelConfig, layout: Layout, c: Coords) -> list[Shard]:
    """The parameters of rank `c`'s chunk, in the full model's order (layer by layer)."""
    stage_layers = cfg.num_layers // layout.pp
    first_layer = c.pp_rank * stage_layers
    local_experts = cfg.num_experts // layout.ep if cfg.is_moe else 0
    first_expert = c.ep_rank * local_experts
    first_stage, last_stage = c.pp_rank == 0, c.pp_rank == layout.pp - 1
    out: list[Shard] = []
    for key, shape in _full_shapes(cfg).items():
        local, layer, expert = key, None, False
        if m := _LAYER.match(key):
            layer = int(m.group(1))
            if not first_layer <= layer < first_layer + stage_layers:
                continue
            local = f"decoder.layers.{layer - first_layer}." + key[m.end() :]
        if m := _EXPERT.search(local):
            e = int(m.group(1))
            if not first_expert <= e < first_expert + local_experts:
                continue
            expert = True
            local = (
                f"{local[: m.start()]}.mlp.experts.local_experts.{e - first_expert}."
                + (local[m.end() :])
            )
        if key == "embedding.word_embeddings.weight" and not first_stage:
            continue
        if key in ("decoder.final_layernorm.weight", "output_layer.weight") and not last_stage:
            continue
        whole = key == "output_layer.weight" and cfg.is_reward_model  # the score head: [1, h]
        out.append(_shard(local, key, shape, layout, c, expert, layer, whole))
    if cfg.tie_embeddings and layout.pp > 1 and last_stage:
        # the last stage keeps its own copy of the tied embedding as the output layer
        shape = _full_shapes(cfg)["embedding.word_embeddings.weight"]
        out.append(_shard("output_layer.weight", "embedding.word_embeddings.weight", shape,
                          layout, c, False, None))  # fmt: skip
    return out


def _shard(local, key, shape, layout, c, expert, layer, whole=False) -> Shard:
    parts, index = (layout.expert_tp, c.etp_rank) if expert else (layout.tp, c.tp_rank)
    if whole:
        dim = None
    elif key.endswith(_COLUMN) or key in VOCAB_KEYS:
        dim = 0
    elif key.endswith(_ROW):
        dim = 1
    else:
        dim = None
    if dim is None or parts == 1:
        dim, parts, index = None, 1, 0
    glu = dim == 0 and key.endswith("linear_fc1.weight")
    return Shard(local, key, tuple(shape), dim, parts, index, glu, expert, layer)


def chunk_tensors(chunk: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A chunk's parameters by state-dict name (megatron-core's `_extra_state` entries dropped)."""
    return {
        k: v
        for k, v in chunk.state_dict(keep_vars=True).items()
        if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")
    }


def check_chunk(chunk: torch.nn.Module, shards: list[Shard]) -> dict[str, torch.Tensor]:
    """The chunk's tensors, after checking they are exactly the plan's names and shapes."""
    have = chunk_tensors(chunk)
    want = {s.local: s.local_shape for s in shards}
    got = {k: tuple(v.shape) for k, v in have.items()}
    if got != want:
        wrong = sorted(k for k in got.keys() | want.keys() if got.get(k) != want.get(k))
        raise CheckpointError(
            f"the model chunk does not match the conversion plan at {wrong[:4]}: chunk "
            f"{[got.get(k) for k in wrong[:4]]}, plan {[want.get(k) for k in wrong[:4]]}"
        )
    return have


def check_layout(cfg: ModelConfig, layout: Layout, workers: int) -> Layout:
    """The layout resolved for `workers` ranks and checked against `cfg` (named errors)."""
    if workers < 1:
        raise ConfigError("workers", f"must be >= 1, got {workers}")
    if layout.vpp != 1:
        raise ConfigError("layout.vpp", "a conversion builds one chunk per rank: use vpp 1")
    moe_tp = cfg.is_moe and layout.tp > 1
    resolved = Layout(
        tp=layout.tp, pp=layout.pp, ep=layout.ep, etp=layout.etp, dp=layout.dp,
        sequence_parallel=moe_tp,  # megatron's MoE layer needs it at tp > 1; no effect here
    ).resolve(workers)  # fmt: skip
    resolved.check_model(cfg)
    if cfg.vocab_size % resolved.tp:
        raise ConfigError(
            "layout.tp", f"vocab_size ({cfg.vocab_size}) must be divisible by tp ({resolved.tp})"
        )
    return resolved


def parse_layout(text: str) -> Layout:
    """`tp=2,pp=4,ep=8,etp=1` -> Layout (unknown or bad fields named)."""
    fields: dict[str, int] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise ConfigError("layout", f"{item!r}: write name=integer, e.g. tp=2,pp=4,ep=8")
        fields[name.strip()] = int(value)
    allowed = {"tp", "pp", "ep", "etp", "dp"}
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise ConfigError(f"layout.{unknown[0]}", f"unknown; allowed: {sorted(allowed)}")
    return Layout(**fields)
