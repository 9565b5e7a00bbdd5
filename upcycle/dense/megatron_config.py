"""The one translation from our `ModelConfig` (+ `Layout`) to megatron-core's `TransformerConfig`.

Qwen2 in megatron-core terms: GQA (`num_query_groups`), bias on q/k/v only, SwiGLU
(`gated_linear_unit` + silu), RMSNorm, RoPE. Qwen2-MoE: pre-softmax top-k routing when
`norm_topk_prob` is false (softmax over all experts, then top-k), top-k-then-softmax when it is
true (the same renormalised weights), a sigmoid-gated shared expert and the Switch aux loss.
Long context: YaRN scaling of the RoPE frequencies when `yarn_factor > 1`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from upcycle import runtime
from upcycle.config import Layout, ModelConfig


def aux_loss_coeff(cfg: ModelConfig) -> float:
    """megatron-core's per-layer coefficient that reproduces transformers' Qwen2-MoE aux loss.

    megatron-core's Switch loss divides the expert counts by top-k (f_i = count_i / (T * k));
    transformers' `load_balancing_loss_func` does not, so the coefficient is multiplied by k.
    megatron-core adds one loss per layer; dividing by the layer count makes the total the mean of
    the per-layer losses (transformers pools all layers' tokens before the product instead: the
    two agree exactly per layer and for one layer, and differ slightly in how layers are combined).
    """
    return cfg.router_aux_loss_coef * cfg.moe_top_k / cfg.num_layers


def to_transformer_config(
    cfg: ModelConfig,
    layout: Layout | None = None,
    *,
    params_dtype: torch.dtype = torch.float32,
    fp8: str | None = None,
    fp8_recipe: str = "delayed",
    perform_initialization: bool = True,
    token_dispatcher: str = "alltoall",
) -> TransformerConfig:
    """Build the megatron-core config for `cfg` under `layout` (default: one process)."""
    layout = layout or Layout()
    if fp8 is not None:
        runtime.require_te(f"fp8={fp8!r}")
    moe: dict = {}
    if cfg.is_moe:
        moe = dict(
            num_moe_experts=cfg.num_experts,
            moe_router_topk=cfg.moe_top_k,
            moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=cfg.shared_expert_ffn_hidden_size or None,
            moe_shared_expert_gate=bool(cfg.shared_expert_ffn_hidden_size)
            and cfg.shared_expert_gate,
            moe_router_pre_softmax=not cfg.norm_topk_prob,
            moe_router_score_function="softmax",
            moe_router_dtype="fp32",
            moe_router_load_balancing_type="aux_loss" if cfg.router_aux_loss_coef else "none",
            moe_aux_loss_coeff=aux_loss_coeff(cfg),
            moe_token_dispatcher_type=token_dispatcher,
            moe_grouped_gemm=runtime.te_available(),
            moe_permute_fusion=False,
        )
    fp8_args = dict(fp8=fp8, fp8_recipe=fp8_recipe) if fp8 else {}
    tconfig = TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_kv_heads,
        kv_channels=cfg.head_dim,
        ffn_hidden_size=cfg.ffn_hidden_size or cfg.moe_ffn_hidden_size,
        add_qkv_bias=cfg.qkv_bias,
        add_bias_linear=False,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        init_method_std=cfg.init_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Fusions are CUDA kernels; the TE spec brings its own.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=not runtime.has_cuda(),
        perform_initialization=perform_initialization,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.expert_tp,
        sequence_parallel=layout.sequence_parallel,
        # With gloo, the interleaved (vpp > 1) schedule's batched isend/irecv delivered wrong
        # activations to later micro-batches (losses off by 1e-3 vs one process; forward-only
        # was exact); separate isend/irecv calls are exact. NCCL keeps the batched form.
        batch_p2p_comm=runtime.has_cuda(),
        # megatron-core 0.16.1's default "full" warns, on every config, that it is deprecated
        # in favour of [] (the same: CUDA graphs, if enabled, capture the whole layer)
        cuda_graph_scope=[],
        **moe,
        **fp8_args,
    )
    if cfg.yarn_factor > 1:
        _add_yarn(tconfig, cfg)
    return tconfig


def _add_yarn(tconfig: TransformerConfig, cfg: ModelConfig) -> None:
    """YaRN settings where megatron-core looks for them.

    megatron-core's `YarnRotaryEmbedding` (position_embedding_type "yarn") reads them from the
    config, and `Attention` multiplies cos/sin by the concentration factor whenever the config has
    `yarn_rotary_scaling_factor`; only the MLA config declares these fields, so they are set on
    the plain one. mscale 1 / mscale_all_dim 0 make that factor 0.1 ln(s) + 1, transformers'
    default `attention_factor` for Qwen2; beta 32/1 and integer correction bounds are its defaults.
    """
    tconfig.yarn_rotary_scaling_factor = cfg.yarn_factor
    tconfig.yarn_original_max_position_embeddings = cfg.yarn_original_max_position_embeddings
    tconfig.yarn_beta_fast = 32.0
    tconfig.yarn_beta_slow = 1.0
    tconfig.yarn_mscale = 1.0
    tconfig.yarn_mscale_all_dim = 0.0
    tconfig.yarn_correction_range_round_to_int = True
