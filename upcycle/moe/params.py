"""Total and active (per-token) parameter counts of a built model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from upcycle.config import ModelConfig

_ROUTED_EXPERTS = ".mlp.experts."


@dataclass(frozen=True)
class ParamCounts:
    total_params: int
    active_params: int  # what one token passes through: top-k of the routed experts, all else
    bf16_bytes: int


def count_parameters(model: torch.nn.Module, cfg: ModelConfig) -> ParamCounts:
    """Count the parameters `model` holds (use a meta-device model for full-size presets)."""
    total = routed = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if _ROUTED_EXPERTS in name:
            routed += p.numel()
    active = total
    if cfg.is_moe:
        if routed % cfg.num_experts:
            raise ValueError(
                f"routed expert parameters ({routed}) do not split into {cfg.num_experts}"
            )
        active = total - routed + routed // cfg.num_experts * cfg.moe_top_k
    return ParamCounts(total_params=total, active_params=active, bf16_bytes=2 * total)
