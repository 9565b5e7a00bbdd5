"""The MoE layer for serving steps of a few tokens: `SelectedExperts`, with no host sync.

megatron-core's `MoELayer` routes, permutes the tokens by expert (the dispatcher's
index_select / scatter_add copies, `.cpu()` of the counts in the allgather dispatcher), then
runs the experts on a per-expert token count read back to the host (`.tolist()`). For a decode
step of 1 to ~32 tokens those copies and round trips cost more than the expert GEMMs, and the
host syncs stop torch.compile and CUDA graphs from capturing the step.

`SelectedExperts` replaces only the layer's forward (its modules, parameters and state dict
stay megatron's): megatron's router gives each token's top-k experts and probabilities, and each
(token, expert) pair is one matrix-vector product against that expert's weights gathered by
index: only the selected experts' weights are read, no permutation, no count on the host. Under
torch.compile (upcycle.deploy.engine.compiled_step) inductor fuses the gather into the product,
so the gathered weights are never copied. The shared expert is megatron's own module.

The expert weights are re-homed into two stacked tensors ([E, 2f, h] and [E, h, f]) that the
experts' parameters now view, so an in-place load (checkpoint, RLHF weight sync) updates both.
Eager steps with more tokens than `max_tokens` (prefill) run megatron's own forward, which is
fast for many tokens (upcycle.moe.experts); compiled steps always take this path (megatron's
cannot be compiled). Installed only on single-rank replicas: under TP or EP the dispatcher's
collectives stay megatron's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import router_gating_linear

# eager steps above this many tokens run megatron's MoE forward: there each used expert's
# weights are read once for all its tokens, where here each token's k experts' weights are
# gathered (measured on moe-bench, 2 AMD EPYC threads: 0.8 vs 1.8 ms per layer at 1 token, 2.8
# vs 3.6 at 4, 19 vs 7 at 16). Under torch.compile every step takes this path: inductor fuses
# the gather into the products (0.07 ms at 1 token, 0.7 at 16) and megatron's path, with its
# host syncs, cannot be compiled at all.
MAX_TOKENS = 4


def _stack(weights: list[torch.nn.Parameter]) -> torch.Tensor:
    """One [E, ...] tensor holding `weights`, each parameter rebound to a view of its row."""
    stacked = torch.stack([w.detach() for w in weights])
    for e, w in enumerate(weights):
        w.data = stacked[e]
    return stacked


class SelectedExperts:
    """The forward installed on one `MoELayer` (module doc)."""

    def __init__(self, layer: MoELayer, max_tokens: int = MAX_TOKENS):
        experts = layer.experts.local_experts
        self.layer, self.max_tokens = layer, max_tokens
        self.megatron_forward = layer.forward
        self.top_k = layer.router.topk
        self.w1 = _stack([e.linear_fc1.weight for e in experts])  # [E, 2f, h]: [gate; up]
        self.w2 = _stack([e.linear_fc2.weight for e in experts])  # [E, h, f]

    def __call__(self, hidden_states: torch.Tensor, *args, **kwargs):
        tokens = hidden_states.shape[0] * hidden_states.shape[1]
        # compiling first: with dynamic shapes a comparison of the token count is a guard
        small = torch.compiler.is_compiling() or tokens <= self.max_tokens
        if not small or torch.is_grad_enabled():
            return self.megatron_forward(hidden_states, *args, **kwargs)
        layer = self.layer
        shared = layer.shared_experts(hidden_states) if layer.use_shared_expert else None
        probs, routing_map = self.route(hidden_states)
        x = hidden_states.reshape(tokens, -1)
        out = routed_experts(x, probs, routing_map, self.w1, self.w2, self.top_k)
        out = out.view_as(hidden_states)
        return (out if shared is None else out + shared), None

    def route(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """megatron's `TopKRouter.forward` for serving: its gate GEMM and its `routing` (top-k,
        score function, scaling), without `gating`'s per-call move of the weights to the
        current CUDA device, which a compiled graph cannot hold (the weights are where the model
        is), and without input jitter and expert-bias upkeep, which are training-only."""
        router = self.layer.router
        dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(
            router.config.moe_router_dtype, hidden_states.dtype
        )
        logits = router_gating_linear(hidden_states, router.weight, router.bias, dtype)
        return router.routing(logits)


def routed_experts(
    x: torch.Tensor,
    probs: torch.Tensor,
    routing_map: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    top_k: int,
) -> torch.Tensor:
    """sum over each token's selected experts e of p_e * (silu(x W1g_e^T) * x W1u_e^T) W2_e^T.

    x [T, h]; probs and routing_map [T, E] (megatron's router: probabilities and the selection
    mask, exactly `top_k` per token); w1 [E, 2f, h]; w2 [E, h, f]."""
    # the indices of the selected experts, without reading the mask back to the host
    idx = routing_map.to(torch.int8).topk(top_k, dim=-1).indices  # [T, k]
    p = probs.gather(1, idx).to(x.dtype)  # [T, k]
    width, flat = w2.shape[2], idx.reshape(-1)
    z = torch.bmm(w1[flat], x.repeat_interleave(top_k, 0)[:, :, None])[..., 0]  # [T*k, 2f]
    act = (F.silu(z[:, :width]) * z[:, width:]) * p.reshape(-1, 1)
    y = torch.bmm(w2[flat], act[:, :, None])[..., 0]  # [T*k, h]
    return y.view(x.shape[0], top_k, -1).sum(1)


def install(model: torch.nn.Module, max_tokens: int = MAX_TOKENS) -> int:
    """Give every MoE layer of `model` the `SelectedExperts` forward; the layers changed."""
    count = 0
    for layer in model.decoder.layers:
        mlp = layer.mlp
        if isinstance(mlp, MoELayer) and not isinstance(mlp.forward, SelectedExperts):
            mlp.forward = SelectedExperts(mlp, max_tokens)
            count += 1
    return count
