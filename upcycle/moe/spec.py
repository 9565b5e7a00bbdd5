"""The Qwen2-MoE decoder layer as a megatron-core `ModuleSpec`.

megatron-core's MoE layer holds the router (`TopKRouter`), the routed experts and the shared
expert (`SharedExpertMLP`, sigmoid-gated when `moe_shared_expert_gate`). With Transformer Engine
the routed experts are one grouped GEMM (`TEGroupedMLP`); elsewhere (0.16.1's grouped GEMM needs
CUDA) they are `FusedSequentialMLP` (upcycle.moe.experts: `SequentialMLP`'s parameters with one
fused autograd function over the experts), and attention is the dense spec's SDPA.
"""

from __future__ import annotations

from megatron.core.transformer.spec_utils import ModuleSpec

from upcycle import runtime
from upcycle.config import ModelConfig
from upcycle.dense.spec import local_layer_spec
from upcycle.moe.experts import FusedSequentialMLP


def layer_spec(cfg: ModelConfig) -> ModuleSpec:
    if not cfg.is_moe:
        raise ValueError(f"{cfg.name} is dense: use upcycle.dense.spec.layer_spec")
    if runtime.te_available():
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec(
            num_experts=cfg.num_experts, moe_grouped_gemm=True
        )
    spec = local_layer_spec(cfg.num_experts)
    spec.submodules.mlp.submodules.experts.module = FusedSequentialMLP
    return spec
