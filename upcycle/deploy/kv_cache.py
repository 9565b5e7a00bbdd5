"""A slot-based KV cache plugged into megatron-core's own attention layers.

Why our own and not megatron-core's inference contexts: `StaticInferenceContext` keeps one
`sequence_len_offset` for the whole batch (every request at the same position: no continuous
batching), and `DynamicInferenceContext` (paged, ragged) is built on CUDA-only pieces (CUDA
memory pools, Triton/flashinfer kernels, CUDA graphs) that do not run on CPU. So every module of
the model stays megatron-core's (embedding, QKV/proj linears with their TP collectives, RoPE
application, MoE layer with its dispatcher, norms, output layer); only `core_attention`, the
softmax(QK^T)V kernel, is swapped for `CachedAttention`, which writes this step's keys and values
into the cache and attends over each sequence's cached prefix.

A step is a flat run of tokens from several sequences (`StepPlan`): decode steps give one token
per sequence, prefill chunks many; both mix freely in one forward. Tokens travel in megatron's
[s, b, h] layout as [T, 1, h], so the linears and the MoE layer see T tokens, whatever sequence
they belong to; RoPE gets each token's own position.

With Dual Chunk Attention (`DualChunkRoPE` in the step state; upcycle.dense.dual_chunk) megatron
applies no RoPE: keys are rotated at their chunk positions before they are cached, and each query
three ways (intra, successive, inter chunk) before `DualChunk.attend`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

from upcycle.dense.dual_chunk import DualChunk


@dataclass
class StepPlan:
    """One forward: sequence i feeds `tokens[starts[i]:starts[i]+lengths[i]]` into cache slot
    `slots[i]` at positions `offsets[i], offsets[i]+1, ...`."""

    tokens: list[int]
    slots: list[int]
    offsets: list[int]
    lengths: list[int]

    def __post_init__(self) -> None:
        if not (len(self.slots) == len(self.offsets) == len(self.lengths)):
            raise ValueError("StepPlan: slots, offsets and lengths differ in length")
        if sum(self.lengths) != len(self.tokens):
            raise ValueError("StepPlan: lengths do not add up to the token count")


@dataclass
class StepIndex:
    """The tensors `CachedAttention` needs for one step, computed once per forward and handed to
    every layer as megatron's `attention_mask` (it passes that argument through untouched)."""

    positions: torch.Tensor  # [T] each token's position in its sequence
    token_slots: torch.Tensor  # [T] each token's cache slot
    seq_slots: torch.Tensor  # [S] each sequence's cache slot
    seg: torch.Tensor  # [T] each token's sequence
    within: torch.Tensor  # [T] each token's row within its sequence's chunk
    last_token: torch.Tensor  # [S] each sequence's last row in the step
    q_pos: torch.Tensor  # [S, max_len] query row (i, j)'s position; padded rows the last real one
    mask: torch.Tensor  # [S, 1, max_len, kv_len] True where a query may see a key
    kv_len: int  # cache positions attended to (the longest sequence's end)
    max_len: int  # the longest chunk

    @staticmethod
    def of(plan: StepPlan, device: torch.device) -> StepIndex:
        lengths = torch.tensor(plan.lengths)
        seg = torch.repeat_interleave(torch.arange(len(plan.lengths)), lengths)
        first = torch.cumsum(lengths, 0) - lengths
        within = torch.arange(len(plan.tokens)) - first[seg]
        max_len = int(lengths.max())
        ends = torch.tensor([o + n for o, n in zip(plan.offsets, plan.lengths, strict=True)])
        q_pos = torch.tensor(plan.offsets)[:, None] + torch.arange(max_len)[None, :]
        q_pos = torch.minimum(q_pos, (ends - 1)[:, None])
        key_pos = torch.arange(int(ends.max()))
        return StepIndex(
            positions=(torch.tensor(plan.offsets)[seg] + within).to(device),
            token_slots=torch.tensor(plan.slots)[seg].to(device),
            seq_slots=torch.tensor(plan.slots, device=device),
            seg=seg.to(device),
            within=within.to(device),
            last_token=(first + lengths - 1).to(device),
            q_pos=q_pos.to(device),
            mask=(key_pos[None, None, None, :] <= q_pos[:, None, :, None]).to(device),
            kv_len=len(key_pos),
            max_len=max_len,
        )

    @staticmethod
    def decode(
        positions: torch.Tensor, slots: torch.Tensor, key_positions: torch.Tensor
    ) -> StepIndex:
        """One token per sequence (a decode step), from tensors only: what a compiled step
        builds inside its graph (upcycle.deploy.compiled_step). `key_positions` is
        arange(kv_len); its length is the step's only dynamic size."""
        rows = torch.arange(positions.shape[0], device=positions.device)
        return StepIndex(
            positions=positions,
            token_slots=slots,
            seq_slots=slots,
            seg=rows,
            within=torch.zeros_like(rows),
            last_token=rows,
            q_pos=positions[:, None],
            mask=key_positions[None, None, None, :] <= positions[:, None, None, None],
            kv_len=key_positions.shape[0],
            max_len=1,
        )


class KVCache:
    """Keys and values per layer: [slots, kv_heads (this TP rank's), max_len, head_dim]."""

    def __init__(
        self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int, dtype, device
    ):
        shape = (slots, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]


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
        k_cache[idx.token_slots, :, idx.positions] = key[:, 0]
        v_cache[idx.token_slots, :, idx.positions] = value[:, 0]
        heads, d = query.shape[2], query.shape[3]
        k = k_cache[idx.seq_slots, :, : idx.kv_len]
        v = v_cache[idx.seq_slots, :, : idx.kv_len]
        if rope is None and idx.max_len == 1:
            return _decode_attention(query, k, v, idx.mask)
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
    """One query per sequence: query [S, 1, heads, d], k/v [S, kv_heads, L, d], mask
    [S, 1, 1, L] -> [S, 1, heads * d]. Two batched products and a softmax in fp32 (each group
    of query heads against its key-value head) rather than SDPA: torch's CPU flash kernel is
    built for long queries and spends ~0.1-0.5 ms a layer on one row (moe-bench, 1-16
    sequences), where these are a few microseconds, and inductor fuses the mask, scale and
    softmax into one loop."""
    seqs, _, heads, d = query.shape
    groups = heads // k.shape[1]
    q = query.view(seqs, k.shape[1], groups, d)  # heads h = kv_head * groups + g, as GQA
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * d**-0.5  # [S, kv_heads, g, L]
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.matmul(torch.softmax(scores, -1).to(v.dtype), v)  # [S, kv_heads, g, d]
    return out.reshape(seqs, 1, heads * d)


def _by_sequence(query: torch.Tensor, idx: StepIndex) -> torch.Tensor:
    """Flat step rows [T, 1, heads, d] -> [num_seqs, heads, max_len, d] (zero-padded)."""
    if idx.max_len == 1:  # one token per sequence: a view
        return query.transpose(1, 2)
    q = query.new_zeros(len(idx.seq_slots), idx.max_len, query.shape[2], query.shape[3])
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
