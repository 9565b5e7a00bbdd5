"""The dense Qwen2 decoder layer as a megatron-core `ModuleSpec`: TE modules on a GPU with
Transformer Engine, megatron-core's pure-torch modules elsewhere, with core attention through
torch SDPA (`upcycle.dense.attention`) instead of megatron's unfused `DotProductAttention`."""

from __future__ import annotations

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec

from upcycle import runtime
from upcycle.config import ModelConfig
from upcycle.dense.attention import SDPAttention


def layer_spec(cfg: ModelConfig) -> ModuleSpec:
    if cfg.is_moe:
        raise ValueError(f"{cfg.name} is a MoE model: use upcycle.moe.spec.layer_spec")
    if runtime.te_available():
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec()
    return local_layer_spec()


def local_layer_spec(num_experts: int | None = None) -> ModuleSpec:
    """megatron-core's local (pure torch) layer spec with SDPA core attention: the one place
    the attention of every layer without Transformer Engine is chosen (dense and MoE)."""
    spec = get_gpt_layer_local_spec(
        num_experts=num_experts, moe_grouped_gemm=False, normalization="RMSNorm"
    )
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec
