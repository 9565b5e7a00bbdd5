"""Dual Chunk Attention (An et al. 2024, "Training-Free Long-Context Scaling of Large Language
Models"): attention over inputs longer than the trained context, without training.

Keys and queries never get a RoPE position beyond the chunk size c, so every relative distance
the model sees is one it was trained on. With chunk size c (3/4 of the trained length L), local
window w (L/16) and chunk length s = c - w, token i lies in chunk i // s and:
    key position                                       i mod s
    query position against keys of its own chunk       i mod s          (intra-chunk)
    ... against keys of the previous chunk             min(i mod s + s, c)   (successive)
    ... against keys of earlier chunks                 c                (inter-chunk)
Intra-chunk distances are exact; successive-chunk ones are exact up to the local window, then
capped; all earlier tokens sit at a distance of at least c - s + 1 = w + 1. The three partial
attentions are merged by their log-sum-exp weights, which is exactly one softmax over the union
of the three score blocks: that is how `attend` computes it. An input of at most c tokens is
never past the successive chunk with an uncapped position, so DCA then equals plain attention.

Why our own: megatron-core has no DCA, and vLLM's is a set of CUDA flash-attention kernels.
Used by the serving engine (upcycle.deploy.engine.kv_cache) when `engine.dual_chunk_length` is set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DualChunk:
    chunk_size: int  # c
    local_size: int  # w

    def __post_init__(self) -> None:
        if not 0 < self.local_size < self.chunk_size:
            raise ValueError(f"DCA needs 0 < local_size < chunk_size, got {self}")

    @classmethod
    def for_trained_length(cls, length: int) -> DualChunk:
        """Qwen2's setting: chunk 3/4 of the trained context length, local window 1/16."""
        return cls(chunk_size=3 * length // 4, local_size=length // 16)

    @property
    def chunk_len(self) -> int:  # s
        return self.chunk_size - self.local_size

    def key_positions(self, pos: torch.Tensor) -> torch.Tensor:
        return pos % self.chunk_len

    def query_positions(self, pos: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(intra, successive, inter) RoPE positions of queries at absolute positions `pos`."""
        within = pos % self.chunk_len
        successive = torch.clamp(within + self.chunk_len, max=self.chunk_size)
        return within, successive, torch.full_like(pos, self.chunk_size)

    def attend(
        self,
        queries: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        keys: torch.Tensor,
        values: torch.Tensor,
        q_pos: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """Causal DCA of queries [B, heads, Q, d] (rotated three ways, as `query_positions`)
        over keys/values [B, kv_heads, K, d] (rotated at `key_positions`, keys at absolute
        positions 0..K-1); `q_pos` [B, Q] are the queries' absolute positions.

        Decode steps (Q == 1) score every key with all three query rotations and select (3x a
        small product, no Python loop); steps with prefill rows take each sequence's queries
        chunk by chunk and score each key range with the one rotation it needs (1x)."""
        heads, kv_heads = queries[0].shape[1], keys.shape[1]
        if heads != kv_heads:  # GQA
            keys = keys.repeat_interleave(heads // kv_heads, dim=1)
            values = values.repeat_interleave(heads // kv_heads, dim=1)
        if q_pos.shape[1] == 1:
            return self._attend_selecting(queries, keys, values, q_pos, scale)
        out = torch.zeros_like(queries[0])
        chunks = q_pos // self.chunk_len
        for b in range(q_pos.shape[0]):
            for chunk in chunks[b].unique().tolist():
                rows = (chunks[b] == chunk).nonzero()[:, 0]
                out[b, :, rows] = self._attend_chunk(
                    [q[b, :, rows] for q in queries], keys[b], values[b], q_pos[b, rows], chunk,
                    scale,
                ).to(out.dtype)  # fmt: skip
        return out

    def _attend_chunk(self, queries, keys, values, q_pos, chunk: int, scale: float):
        """Queries [heads, n, d] of one sequence, all in chunk `chunk`, over its keys."""
        intra, successive, inter = (q.float() for q in queries)
        start = chunk * self.chunk_len  # first key of the query chunk
        previous = max(0, start - self.chunk_len)  # first key of the chunk before it
        end = int(q_pos.max()) + 1  # causal: no key past the last query
        k = keys[:, :end].float()
        scores = (
            torch.cat(
                [
                    inter @ k[:, :previous].transpose(-1, -2),
                    successive @ k[:, previous:start].transpose(-1, -2),
                    intra @ k[:, start:end].transpose(-1, -2),
                ],
                dim=-1,
            )
            * scale
        )
        future = torch.arange(end, device=keys.device)[None, :] > q_pos[:, None]
        scores = scores.masked_fill(future, float("-inf"))
        return scores.softmax(-1) @ values[:, :end].float()

    def _attend_selecting(self, queries, keys, values, q_pos, scale: float) -> torch.Tensor:
        k_pos = torch.arange(keys.shape[2], device=keys.device)
        q_chunk = (q_pos // self.chunk_len)[:, None, :, None]  # [B, 1, Q, 1]
        k_chunk = (k_pos // self.chunk_len)[None, None, None, :]  # [1, 1, 1, K]
        intra, successive, inter = (q.float() @ keys.float().transpose(-1, -2) for q in queries)
        scores = torch.where(
            k_chunk == q_chunk, intra, torch.where(k_chunk == q_chunk - 1, successive, inter)
        )
        future = k_pos[None, None, None, :] > q_pos[:, None, :, None]
        scores = (scores * scale).masked_fill(future, float("-inf"))
        return (scores.softmax(-1) @ values.float()).to(values.dtype)
