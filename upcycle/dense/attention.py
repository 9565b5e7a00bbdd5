"""Core attention through torch's fused `scaled_dot_product_attention`: `SDPAttention`.

Where Transformer Engine is absent (every CPU), megatron-core's local spec computes attention
with `DotProductAttention`: GQA keys and values repeated to every query head, a materialised
[b, heads, s, s] score matrix (`baddbmm`), a separate masked softmax in fp32 and a `bmm`, each
saved for backward. torch's SDPA does the same product in one fused, blocked kernel (flash
attention on CPU, with GQA and bf16 inputs accumulated in fp32) that never holds the full score
matrix. `SDPAttention` is a drop-in for the module megatron's `SelfAttention` calls
(`core_attention`): same constructor, same [s, b, heads, d] inputs and [s, b, heads * d] output,
the same mask convention (True where attention is blocked; None is causal), so the packed-SFT
block mask works unchanged. The layer specs select it wherever TE's attention is not used
(upcycle.dense.spec).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    """megatron-core's `DotProductAttention` with its forward done by torch SDPA (module doc).

    Inherits the constructor (heads per TP rank, softmax scale, config checks) and the sharded
    state dict; settings SDPA cannot express (dropout, sliding windows, softmax offsets,
    query-key layer scaling, attention bias, packed-sequence params) run the parent's forward."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        plain = (
            self.config.softmax_type == "vanilla"
            and not self.config.apply_query_key_layer_scaling
            and self.scale_mask_softmax.window_size is None
            and attention_bias is None
            and packed_seq_params is None
            and not (self.training and self.attention_dropout.p > 0)
        )
        if not plain:
            return super().forward(
                query, key, value, attention_mask, attn_mask_type, attention_bias,
                packed_seq_params,
            )  # fmt: skip
        # [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        causal = attention_mask is None and self.attn_mask_type == AttnMaskType.causal
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=None if attention_mask is None else ~attention_mask,
            is_causal=causal and q.shape[2] > 1,
            scale=self.softmax_scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )
        return out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)
