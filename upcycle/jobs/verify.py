"""`upcycle verify`: prove our megatron-core model is Qwen2 by running transformers on the same
weights and tokens and comparing logits, greedy tokens and (MoE) the per-layer aux loss."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from upcycle.config import ModelConfig
from upcycle.conversion.hf_interop import transformers_twin
from upcycle.dense.tokenizer import get_tokenizer
from upcycle.moe import aux_loss
from upcycle.moe.model import build_model
from upcycle.moe.params import count_parameters
from upcycle.platform.distributed import single_process

TOLERANCE = 1e-4  # fp32


@dataclass(frozen=True)
class Report:
    model: str
    params: int
    active_params: int
    tokens: int
    max_logit_diff: float
    greedy_agreement: float
    aux_loss_diff: float | None  # max over layers, MoE only
    seconds_ours: float
    seconds_transformers: float

    @property
    def ok(self) -> bool:
        aux_ok = self.aux_loss_diff is None or self.aux_loss_diff <= TOLERANCE
        return self.max_logit_diff <= TOLERANCE and aux_ok


def sample_text() -> str:
    """Real English prose that ships with Python: the json module's documentation."""
    return json.__doc__


def _ours(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, float]:
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(tokens, positions, None)
    return logits, time.perf_counter() - start


def verify(cfg: ModelConfig, *, seq_len: int = 64, seed: int = 0) -> Report:
    """Random-initialise `cfg`, hand the same weights to transformers, compare on real text."""
    ids = get_tokenizer().encode(sample_text())[:seq_len]
    tokens = torch.tensor([ids]) % cfg.vocab_size
    with single_process(seed=seed), tempfile.TemporaryDirectory() as tmp:
        ours = build_model(cfg).eval()
        counts = count_parameters(ours, cfg)
        theirs = transformers_twin(cfg, ours, Path(tmp) / "hf")
        logits, t_ours = _ours(ours, tokens)
        start = time.perf_counter()
        with torch.no_grad():
            out = theirs(tokens, output_router_logits=cfg.is_moe)
        t_theirs = time.perf_counter() - start
        aux_diff = _aux_loss_diff(cfg, ours, tokens, out) if cfg.is_moe else None
    return Report(
        model=cfg.name,
        params=counts.total_params,
        active_params=counts.active_params,
        tokens=tokens.numel(),
        max_logit_diff=(logits - out.logits).abs().max().item(),
        greedy_agreement=(logits.argmax(-1) == out.logits.argmax(-1)).float().mean().item(),
        aux_loss_diff=aux_diff,
        seconds_ours=t_ours,
        seconds_transformers=t_theirs,
    )


def _aux_loss_diff(cfg: ModelConfig, ours, tokens, hf_out) -> float:
    """Per-layer aux loss: megatron-core (training mode computes it) vs transformers' function."""
    from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

    aux_loss.reset()
    ours.train()
    ours(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)
    ours.eval()
    mine = aux_loss.layer_aux_losses(cfg)
    theirs = torch.stack(
        [
            load_balancing_loss_func((layer,), cfg.num_experts, cfg.moe_top_k)
            for layer in hf_out.router_logits
        ]
    )
    aux_loss.reset()
    return (mine - theirs).abs().max().item()
