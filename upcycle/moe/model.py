"""Build the megatron-core `GPTModel` for any preset, dense or MoE, from one config."""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from upcycle.config import ModelConfig
from upcycle.dense import spec as dense_spec
from upcycle.dense.megatron_config import to_transformer_config
from upcycle.dense.score_head import ScoreHead
from upcycle.moe import spec as moe_spec


def build_model(
    cfg: ModelConfig,
    tconfig: TransformerConfig | None = None,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
) -> GPTModel:
    """A GPTModel for `cfg` (parallel state must be initialised, see upcycle.platform.distributed).

    Pass `tconfig` to choose dtype, layout or FP8; the default is fp32 on one process.
    A reward model (`cfg.head == "score"`) returns one score per position instead of logits.
    """
    tconfig = tconfig or to_transformer_config(cfg)
    spec = (moe_spec if cfg.is_moe else dense_spec).layer_spec(cfg)
    model = GPTModel(
        config=tconfig,
        transformer_layer_spec=spec,
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type="yarn" if cfg.yarn_factor > 1 else "rope",
        rotary_base=int(cfg.rope_theta),
        vp_stage=vp_stage,
    )
    if cfg.is_reward_model and post_process:
        model.output_layer = ScoreHead(tconfig)
    # megatron-core's torch norms (the local spec) make fp32 weights whatever params_dtype says;
    # one dtype for every parameter is what its mixed-precision optimizer's checkpoint expects
    return model.to(dtype=tconfig.params_dtype)


def build_on_meta(cfg: ModelConfig) -> GPTModel:
    """Every parameter of `cfg` with no memory behind it: for counting and shape checks."""
    tconfig = to_transformer_config(cfg, perform_initialization=False)
    with torch.device("meta"):
        return build_model(cfg, tconfig)
