"""The dense Qwen2 decoder layer as a megatron-core `ModuleSpec`: TE modules on a GPU with
Transformer Engine, megatron-core's pure-torch modules elsewhere."""

from __future__ import annotations

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec

from upcycle import runtime
from upcycle.config import ModelConfig


def layer_spec(cfg: ModelConfig) -> ModuleSpec:
    if cfg.is_moe:
        raise ValueError(f"{cfg.name} is a MoE model: use upcycle.moe.spec.layer_spec")
    if runtime.te_available():
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec()
    return get_gpt_layer_local_spec(normalization="RMSNorm")
