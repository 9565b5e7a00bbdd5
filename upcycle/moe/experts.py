"""Routed experts without megatron-core's per-expert module calls: `FusedSequentialMLP`.

Where Transformer Engine's grouped GEMM is absent (every CPU), megatron-core runs the routed
experts as `SequentialMLP`: a Python loop that calls each local expert's `MLP` (two parallel
linears through megatron's autograd function, GLU activation, probability scale), every expert
even when it received no tokens, then concatenates the outputs; in backward autograd adds the
concatenation's and the GLU chunk's copies. On moe-bench (64 experts of width 128) those calls
and copies cost more than the expert GEMMs themselves.

`FusedSequentialMLP` keeps `SequentialMLP`'s parameters, state dict and dist-checkpoint layout
(`local_experts.N.linear_fc{1,2}.weight`: checkpoints, transformers import/export and layouts
are unchanged) and replaces only its forward with one autograd function over all local experts
with a hand-written backward (the SwiGLU derivative is one fused op). The experts, sorted by
token count, go through batched GEMMs (`bmm`) a bucket of 8 at a time with their tokens padded
to the bucket's largest count: in bf16 on these AMX CPUs a `bmm` over experts runs at ~1,900
GFLOP/s where one `mm` per expert reaches ~600 and `torch._grouped_mm` ~470 (fp32: all ~250-300).
Experts without tokens cost nothing, in training as in serving; a serving step with a few tokens
per expert runs each used expert alone (no padding, only its weights read). The expert linears
hold local shards and do no communication of their own (megatron's dispatcher gathers and
reduces around them), so expert tensor parallelism works unchanged.

Configurations outside what this covers (FP8/FP4 padding, probabilities applied on the input,
expert biases, an activation other than SwiGLU) run `SequentialMLP.forward` itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP

# GEMM shapes come from a small fixed set, because oneDNN (torch's bf16 matmul on CPU) compiles a
# kernel for every new shape: ~1.7 ms per call of a shape it has not seen, more than the GEMM
# itself at these sizes. Experts sorted by token count go in buckets of EXPERTS_PER_GEMM; a
# bucket's capacity is its largest count rounded up to ROW_QUANTUM rows.
EXPERTS_PER_GEMM = 8
ROW_QUANTUM = 32


@dataclass(frozen=True)
class GroupPlan:
    """Experts sorted by token count (most first) and cut into buckets of similar counts; each
    bucket is one batched GEMM with its experts' tokens padded to the bucket's capacity.

    `order[i]` is the expert at sorted position i; bucket (first, n, capacity, row) covers sorted
    positions first..first+n-1, padded rows row..row+n*capacity-1; `dest[r]` is the padded row of
    expert-sorted token row r; sorted positions from `covered` on received no tokens and are in
    no bucket (they cost nothing)."""

    order: list[int]
    buckets: list[tuple[int, int, int, int]]
    dest: torch.Tensor
    rows: int
    covered: int

    @staticmethod
    def of(counts: list[int], device) -> GroupPlan:
        order = sorted(range(len(counts)), key=lambda e: -counts[e])
        buckets, row, start_of = [], 0, [0] * len(counts)
        for first in range(0, len(order), EXPERTS_PER_GEMM):
            members = order[first : first + EXPERTS_PER_GEMM]
            capacity = -(-counts[members[0]] // ROW_QUANTUM) * ROW_QUANTUM
            if not capacity:
                break
            buckets.append((first, len(members), capacity, row))
            for k, e in enumerate(members):
                start_of[e] = row + k * capacity
            row += len(members) * capacity
        covered = sum(n for _, n, _, _ in buckets)
        sizes = torch.tensor(counts, device=device)
        expert = torch.repeat_interleave(torch.arange(len(counts), device=device), sizes)
        first_row = torch.cumsum(sizes, 0) - sizes
        within = torch.arange(int(sizes.sum()), device=device) - first_row[expert]
        dest = torch.tensor(start_of, device=device)[expert] + within
        return GroupPlan(order, buckets, dest, row, covered)


class _GroupedSwiGLU(torch.autograd.Function):
    """y = (silu(x W1g^T) * (x W1u^T) * p) W2^T per expert, one batched GEMM per bucket of the
    `GroupPlan`; w1 [E, 2f, h] ([gate; up] rows), w2 [E, h, f], both in the plan's order."""

    @staticmethod
    def forward(ctx, x, probs, plan: GroupPlan, w1, w2):
        width = w2.shape[2]
        xp = x.new_zeros(plan.rows, x.shape[1]).index_copy_(0, plan.dest, x)
        scale = x.new_zeros(plan.rows, 1)
        scale.index_copy_(0, plan.dest, probs.to(x.dtype).unsqueeze(-1))
        z = x.new_empty(plan.rows, 2 * width)
        act = x.new_empty(plan.rows, width)
        y = x.new_empty(plan.rows, x.shape[1])
        for first, n, cap, row in plan.buckets:
            rows, experts = slice(row, row + n * cap), slice(first, first + n)
            zb = z[rows].view(n, cap, -1)
            torch.bmm(xp[rows].view(n, cap, -1), w1[experts].transpose(1, 2), out=zb)
            ab = act[rows].view(n, cap, -1)
            torch.mul(F.silu(zb[..., :width]), zb[..., width:], out=ab)
            torch.bmm(ab * scale[rows].view(n, cap, 1), w2[experts].transpose(1, 2),
                      out=y[rows].view(n, cap, -1))  # fmt: skip
        ctx.save_for_backward(xp, z, act, scale, w1, w2)
        ctx.plan, ctx.probs_dtype = plan, probs.dtype
        return y.index_select(0, plan.dest)

    @staticmethod
    def backward(ctx, dy):
        xp, z, act, scale, w1, w2 = ctx.saved_tensors
        plan: GroupPlan = ctx.plan
        width = w2.shape[2]
        dyp = dy.new_zeros(plan.rows, dy.shape[1]).index_copy_(0, plan.dest, dy)
        gate, up = z[:, :width], z[:, width:]
        dz, dxp = torch.empty_like(z), torch.empty_like(xp)
        d_scaled = torch.empty_like(act)  # d(act * p)
        dw1, dw2 = torch.empty_like(w1), torch.empty_like(w2)
        dw1[plan.covered :], dw2[plan.covered :] = 0, 0
        for first, n, cap, row in plan.buckets:
            rows, experts = slice(row, row + n * cap), slice(first, first + n)
            dyb = dyp[rows].view(n, cap, -1)
            torch.bmm(dyb, w2[experts], out=d_scaled[rows].view(n, cap, -1))
            scaled_act = (act[rows] * scale[rows]).view(n, cap, -1)
            torch.bmm(dyb.transpose(1, 2), scaled_act, out=dw2[experts])
        dprobs = (d_scaled * act).sum(-1).index_select(0, plan.dest)
        d_act = d_scaled * scale
        # element-wise work is slow in bf16 on CPU: one fused op for silu's derivative
        dz[:, :width] = torch.ops.aten.silu_backward(d_act * up, gate)
        torch.mul(d_act, F.silu(gate), out=dz[:, width:])
        for first, n, cap, row in plan.buckets:
            rows, experts = slice(row, row + n * cap), slice(first, first + n)
            dzb = dz[rows].view(n, cap, -1)
            torch.bmm(dzb.transpose(1, 2), xp[rows].view(n, cap, -1), out=dw1[experts])
            torch.bmm(dzb, w1[experts], out=dxp[rows].view(n, cap, -1))
        return dxp.index_select(0, plan.dest), dprobs.to(ctx.probs_dtype), None, dw1, dw2


def _each_expert(x, probs, counts: list[int], fc1, fc2) -> torch.Tensor:
    """The same function, forward only, one GEMM pair per expert that received tokens: cheaper
    than padding when a few tokens reach a few experts (a decode step reads only their weights)."""
    width = fc2[0].shape[1]
    y = x.new_empty(x.shape)
    scale = probs.to(x.dtype).unsqueeze(-1)
    start = 0
    for w1, w2, rows in zip(fc1, fc2, counts, strict=True):
        if rows:
            end = start + rows
            z = torch.mm(x[start:end], w1.t())
            act = F.silu(z[:, :width]) * z[:, width:]
            torch.mm(act * scale[start:end], w2.t(), out=y[start:end])
            start = end
    return y


class FusedSequentialMLP(SequentialMLP):
    """`SequentialMLP` with one fused autograd function over its local experts (module doc)."""

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        c = self.config
        covered = (
            c.gated_linear_unit
            and c.activation_func is F.silu
            and not (c.fp8 or c.fp4 or c.moe_apply_probs_on_input or c.add_bias_linear)
            and not c.use_te_activation_func
        )
        if not covered:
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        fc1 = [expert.linear_fc1.weight for expert in self.local_experts]
        fc2 = [expert.linear_fc2.weight for expert in self.local_experts]
        x = permuted_local_hidden_states
        flat, counts = x.reshape(-1, x.shape[-1]), tokens_per_expert.tolist()
        if not flat.shape[0]:
            # no token for any local expert: an empty output that still depends on the tokens
            # and on their probabilities, so that the backward of both of the dispatcher's
            # all-to-alls runs on this rank too (its peers wait in them; SequentialMLP keeps
            # both in the graph the same way)
            return (flat * permuted_probs.reshape(-1, 1).to(flat.dtype)).view_as(x), None
        plan = GroupPlan.of(counts, flat.device)
        if not torch.is_grad_enabled() and plan.rows > 2 * flat.shape[0]:
            # mostly padding (decode steps: a few tokens per expert): each used expert alone
            return _each_expert(flat, permuted_probs, counts, fc1, fc2).view_as(x), None
        w1 = torch.stack([fc1[e] for e in plan.order])
        w2 = torch.stack([fc2[e] for e in plan.order])
        out = _GroupedSwiGLU.apply(flat, permuted_probs, plan, w1, w2)
        return out.view_as(x), None
