"""Read the per-layer load-balancing (aux) loss megatron-core computed in the last forward pass.

megatron-core records `aux_loss / coeff` per layer in its MoE logging tracker. Its Switch loss
counts tokens per expert divided by top-k; multiplying by top-k gives transformers'
`load_balancing_loss_func` for that layer (see `upcycle.dense.megatron_config.aux_loss_coeff`).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    get_moe_layer_wise_logging_tracker,
)

from upcycle.config import ModelConfig

_NAME = "load_balancing_loss"


def layer_aux_losses(cfg: ModelConfig) -> torch.Tensor:
    """Per-layer aux loss of the forward passes since the last `reset()` ([num_layers], summed
    over passes), in transformers' convention (E * sum_i f_i * P_i, f_i = count_i / tokens)."""
    tracker = get_moe_layer_wise_logging_tracker()
    if _NAME not in tracker:
        return torch.zeros(cfg.num_layers)
    return tracker[_NAME]["values"].detach().float().cpu() * cfg.moe_top_k


def reset() -> None:
    """Forget recorded values (dropping the entry, since its size is fixed by the first model)
    and the aux-loss gradient scale.

    megatron-core 0.16.1 creates that scale as a 0-d tensor when a backward pass runs outside its
    schedules (a plain `loss.backward()`), and later fails to copy its schedules' [1]-shaped scale
    into it; starting from None lets the schedule create it.
    """
    get_moe_layer_wise_logging_tracker().pop(_NAME, None)
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
