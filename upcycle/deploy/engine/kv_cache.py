"""A paged KV cache plugged into megatron-core's own attention layers.

Why our own and not megatron-core's inference contexts: `StaticInferenceContext` keeps one
`sequence_len_offset` for the whole batch (every request at the same position: no continuous
batching), and `DynamicInferenceContext` (paged, ragged) is built on CUDA-only pieces (CUDA
memory pools, Triton/flashinfer kernels, CUDA graphs) that do not run on CPU. So every module of
the model stays megatron-core's (embedding, QKV/proj linears with their TP collectives, RoPE
application, MoE layer with its dispatcher, norms, output layer); only `core_attention`, the
softmax(QK^T)V kernel, is swapped for `CachedAttention`, which writes this step's keys and values
into the cache and attends over each sequence's cached prefix.

The cache is paged (vLLM's PagedAttention layout): per layer, keys and values are rows of
[kv_heads, blocks * block_size, head_dim]; a sequence's tokens live in the blocks its block table
lists (upcycle.deploy.engine.blocks decides which), so position p of a sequence is row
`table[p // block_size] * block_size + p % block_size`. Each step gathers its sequences' rows
into a dense [kv_heads, sequences, length, head_dim] view and attends over that.

A step is a flat run of tokens from several sequences (`StepPlan`): decode steps give one token
per sequence, prefill chunks many; both mix freely in one forward. Tokens travel in megatron's
[s, b, h] layout as [T, 1, h], so the linears and the MoE layer see T tokens, whatever sequence
they belong to; RoPE gets each token's own position.

With Dual Chunk Attention (`DualChunkRoPE` in the step state; upcycle.dense.dual_chunk) megatron
applies no RoPE: keys are rotated at their chunk positions before they are cached, and each query
three ways (intra, successive, inter chunk) before `DualChunk.attend`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

from upcycle.dense.dual_chunk import DualChunk
from upcycle.deploy.engine.blocks import blocks_for


@dataclass
class StepPlan:
    """One forward: sequence i feeds `tokens[starts[i]:starts[i]+lengths[i]]` at positions
    `offsets[i], offsets[i]+1, ...`, its keys and values in the cache blocks `tables[i]` lists
    (enough of them for every position up to `offsets[i] + lengths[i]`). `copies` (source,
    destination) blocks are copied before the forward: a sequence's private copy of a shared
    block it is about to write to."""

    tokens: list[int]
    tables: list[list[int]]
    offsets: list[int]
    lengths: list[int]
    copies: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not (len(self.tables) == len(self.offsets) == len(self.lengths)):
            raise ValueError("StepPlan: tables, offsets and lengths differ in length")
        if sum(self.lengths) != len(self.tokens):
            raise ValueError("StepPlan: lengths do not add up to the token count")


def rows_of(tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache rows of `positions` [S, L] (or [S]) under block tables [S, blocks]."""
    flat = positions if positions.dim() == 2 else positions[:, None]
    rows = tables.gather(1, flat // block_size) * block_size + flat % block_size
    return rows if positions.dim() == 2 else rows[:, 0]


@dataclass
class StepIndex:
    """The tensors `CachedAttention` needs for one step, computed once per forward and handed to
    every layer as megatron's `attention_mask` (it passes that argument through untouched).

    A step that mixes decodes (one token) with prefill chunks attends in `parts`: the decoding
    sequences together, the chunks together, each (its token rows in the step, its own index),
    so that one long chunk does not pad every decode to its length."""

    positions: torch.Tensor  # [T] each token's position in its sequence
    write_at: torch.Tensor  # [T] each token's cache row
    last_token: torch.Tensor  # [S] each sequence's last row in the step
    # attention over whole sequences (None where `parts` attend instead)
    read_at: torch.Tensor | None  # [S, kv_len] cache rows of each sequence's positions
    seg: torch.Tensor | None  # [T] each token's sequence
    within: torch.Tensor | None  # [T] each token's row within its sequence's chunk
    q_pos: torch.Tensor | None  # [S, max_len] row (i, j)'s position; padded rows the last real one
    mask: torch.Tensor | None  # [S, 1, max_len, kv_len] True where a query may see a key
    kv_len: int = 0  # cache positions attended to (the longest sequence's end)
    max_len: int = 0  # the longest chunk
    parts: tuple[tuple[torch.Tensor, StepIndex], ...] = ()

    @staticmethod
    def of(plan: StepPlan, block_size: int, device: torch.device) -> StepIndex:
        lengths = torch.tensor(plan.lengths)
        first = torch.cumsum(lengths, 0) - lengths
        seg = torch.repeat_interleave(torch.arange(len(plan.lengths)), lengths)
        within = torch.arange(len(plan.tokens)) - first[seg]
        positions = torch.tensor(plan.offsets)[seg] + within
        single = [i for i, n in enumerate(plan.lengths) if n == 1]
        if 0 < len(single) < len(plan.lengths):
            chunks = [i for i, n in enumerate(plan.lengths) if n > 1]
            tables = torch.tensor(
                _padded(plan.tables, blocks_for(int(positions.max()) + 1, block_size))
            )
            return StepIndex(
                positions=positions.to(device),
                write_at=rows_of(tables[seg], positions, block_size).to(device),
                last_token=(first + lengths - 1).to(device),
                read_at=None, seg=None, within=None, q_pos=None, mask=None,
                parts=tuple(_part(plan, seqs, first, block_size, device)
                            for seqs in (single, chunks)),
            )  # fmt: skip
        max_len = int(lengths.max())
        ends = torch.tensor([o + n for o, n in zip(plan.offsets, plan.lengths, strict=True)])
        q_pos = torch.tensor(plan.offsets)[:, None] + torch.arange(max_len)[None, :]
        q_pos = torch.minimum(q_pos, (ends - 1)[:, None])
        kv_len = int(ends.max())
        tables = torch.tensor(_padded(plan.tables, blocks_for(kv_len, block_size)))
        key_pos = torch.arange(kv_len)
        return StepIndex(
            positions=positions.to(device),
            write_at=rows_of(tables[seg], positions, block_size).to(device),
            last_token=(first + lengths - 1).to(device),
            read_at=rows_of(tables, key_pos.expand(len(plan.tables), -1), block_size).to(device),
            seg=seg.to(device),
            within=within.to(device),
            q_pos=q_pos.to(device),
            mask=(key_pos[None, None, None, :] <= q_pos[:, None, :, None]).to(device),
            kv_len=kv_len,
            max_len=max_len,
        )

    @staticmethod
    def decode(
        positions: torch.Tensor, tables: torch.Tensor, key_positions: torch.Tensor, block_size: int
    ) -> StepIndex:
        """One token per sequence (a decode step), from tensors only: what a compiled step
        builds inside its graph (upcycle.deploy.engine.compiled_step). `key_positions` is
        arange(kv_len); its length is the step's only dynamic size."""
        rows = torch.arange(positions.shape[0], device=positions.device)
        return StepIndex(
            positions=positions,
            write_at=rows_of(tables, positions, block_size),
            last_token=rows,
            read_at=rows_of(tables, key_positions.expand(positions.shape[0], -1), block_size),
            seg=rows,
            within=torch.zeros_like(rows),
            q_pos=positions[:, None],
            mask=key_positions[None, None, None, :] <= positions[:, None, None, None],
            kv_len=key_positions.shape[0],
            max_len=1,
        )


def _padded(tables: list[list[int]], width: int) -> list[list[int]]:
    """Block tables cut or padded (with block 0: read, but masked) to `width` blocks."""
    return [(t + [0] * width)[:width] for t in tables]


def _part(plan: StepPlan, seqs: list[int], first: torch.Tensor, block_size: int, device):
    """(token rows, index) of sequences `seqs` of `plan` attending on their own."""
    rows = [r for i in seqs for r in range(int(first[i]), int(first[i]) + plan.lengths[i])]
    part = StepPlan(
        tokens=[plan.tokens[r] for r in rows],
        tables=[plan.tables[i] for i in seqs],
        offsets=[plan.offsets[i] for i in seqs],
        lengths=[plan.lengths[i] for i in seqs],
    )
    return torch.tensor(rows, device=device), StepIndex.of(part, block_size, device)


class KVCache:
    """Keys and values per layer: [kv_heads (this TP rank's), blocks * block_size, head_dim].
    The last block is scratch: what a compiled step's padded rows write, never read."""

    def __init__(
        self, layers: int, blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype, device
    ):
        self.block_size, self.scratch_block = block_size, blocks
        shape = (kv_heads, (blocks + 1) * block_size, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]

    def copy(self, pairs: list[tuple[int, int]]) -> None:
        """Copy blocks (source, destination) in every layer."""
        bs = self.block_size
        for src, dst in pairs:
            for cache in (*self.keys, *self.values):
                cache[:, dst * bs : (dst + 1) * bs] = cache[:, src * bs : (src + 1) * bs]


@dataclass(frozen=True)
class DualChunkRoPE:
    """What `CachedAttention` needs for Dual Chunk Attention: the chunk rules, megatron's RoPE
    angle table (positions 0..chunk_size), the transformer config and YaRN's cos/sin factor."""

    dca: DualChunk
    table: torch.Tensor  # [chunk_size + 1, 1, 1, head_dim]
    config: object
    mscale: float

    def rotate(self, t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """`t` [T, 1, heads, d] rotated to `positions` [T] (megatron-core's RoPE application)."""
        return apply_rotary_pos_emb(t, self.table[positions], self.config, mscale=self.mscale)


class CachedAttention(torch.nn.Module):
    """Drop-in for megatron-core's `DotProductAttention` that reads and writes the KV cache.

    Called by megatron's `Attention.forward` (RoPE applied, unless Dual Chunk Attention is on):
    query [T, 1, heads, d], key/value [T, 1, kv_heads, d]; returns [T, 1, heads * d] like the
    module it replaces.
    """

    def __init__(self, cache: KVCache, layer: int, runner_state: dict, gqa: bool):
        super().__init__()
        self.cache, self.layer, self.state = cache, layer, runner_state
        self.gqa = gqa  # fewer key-value heads than query heads (a plain bool for compiling)

    def forward(self, query, key, value, attention_mask: StepIndex, **_ignored):
        idx = attention_mask
        rope: DualChunkRoPE | None = self.state.get("dual_chunk")
        if rope is not None:
            key = rope.rotate(key, rope.dca.key_positions(idx.positions))
        k_cache, v_cache = self.cache.keys[self.layer], self.cache.values[self.layer]
        k_cache[:, idx.write_at] = key[:, 0].transpose(0, 1)
        v_cache[:, idx.write_at] = value[:, 0].transpose(0, 1)
        if not idx.parts:
            return self._attend(query, idx, rope)
        out = query.new_empty(query.shape[0], 1, query.shape[2] * query.shape[3])
        for rows, part in idx.parts:
            out[rows] = self._attend(query[rows], part, rope)
        return out

    def _attend(self, query, idx: StepIndex, rope: DualChunkRoPE | None) -> torch.Tensor:
        """query [T, 1, heads, d] of the sequences `idx` covers, against their cached keys."""
        k_cache, v_cache = self.cache.keys[self.layer], self.cache.values[self.layer]
        heads, d = query.shape[2], query.shape[3]
        k = k_cache[:, idx.read_at]  # [kv_heads, S, kv_len, d]
        v = v_cache[:, idx.read_at]
        if rope is None and idx.max_len == 1:
            return _decode_attention(query, k, v, idx.mask)
        k, v = k.transpose(0, 1), v.transpose(0, 1)  # [S, kv_heads, kv_len, d]
        if rope is None:
            out = F.scaled_dot_product_attention(
                _by_sequence(query, idx), k, v, attn_mask=idx.mask, enable_gqa=self.gqa
            )  # [B, heads, max_len, d]
        else:
            queries = tuple(
                _by_sequence(rope.rotate(query, p), idx)
                for p in rope.dca.query_positions(idx.positions)
            )
            out = rope.dca.attend(queries, k, v, idx.q_pos, scale=d**-0.5)
        out = out.transpose(1, 2)  # [S, max_len, heads, d]
        if idx.max_len > 1:
            out = out[idx.seg, idx.within]  # [T, heads, d]
        return out.reshape(out.shape[0], 1, heads * d)


def _decode_attention(
    query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """One query per sequence: query [S, 1, heads, d], k/v [kv_heads, S, L, d], mask
    [S, 1, 1, L] -> [S, 1, heads * d]. Two batched products and a softmax in fp32 (each group
    of query heads against its key-value head) rather than SDPA: torch's CPU flash kernel is
    built for long queries and spends ~0.1-0.5 ms a layer on one row (moe-bench, 1-16
    sequences), where these are a few microseconds, and inductor fuses the mask, scale and
    softmax into one loop."""
    seqs, _, heads, d = query.shape
    kv_heads = k.shape[0]
    # heads h = kv_head * groups + g, as GQA; [kv_heads, S, groups, d]
    q = query.view(seqs, kv_heads, heads // kv_heads, d).transpose(0, 1)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * d**-0.5  # [kv_heads, S, g, L]
    scores = scores.masked_fill(~mask[:, 0][None], float("-inf"))
    out = torch.matmul(torch.softmax(scores, -1).to(v.dtype), v)  # [kv_heads, S, g, d]
    return out.transpose(0, 1).reshape(seqs, 1, heads * d)


def _by_sequence(query: torch.Tensor, idx: StepIndex) -> torch.Tensor:
    """Flat step rows [T, 1, heads, d] -> [num_seqs, heads, max_len, d] (zero-padded)."""
    if idx.max_len == 1:  # one token per sequence: a view
        return query.transpose(1, 2)
    q = query.new_zeros(idx.read_at.shape[0], idx.max_len, query.shape[2], query.shape[3])
    q[idx.seg, idx.within] = query[:, 0]
    return q.transpose(1, 2)


def install(model: torch.nn.Module, cache: KVCache) -> dict:
    """Swap every layer's core attention for `CachedAttention`; returns the state the layers
    share (`state["dual_chunk"]`: a `DualChunkRoPE` where Dual Chunk Attention is on)."""
    state: dict = {}
    for i, layer in enumerate(model.decoder.layers):
        attn = layer.self_attention
        gqa = attn.num_query_groups_per_partition != attn.num_attention_heads_per_partition
        attn.core_attention = CachedAttention(cache, i, state, gqa)
    return state
