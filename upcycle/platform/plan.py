"""`upcycle plan`: which TP/PP/EP/ETP/DP layouts of a model fit N GPUs of M GiB, on paper.

Written here because no library estimates megatron-core memory for a Qwen2-MoE layout; every
number comes from the formulas below, so a test can check them by hand.

Memory of the most loaded GPU, bf16 mixed-precision training as `upcycle train` runs it:
- parameters held: non-expert ones (attention, norms, router, shared expert, embeddings, LM
  head) / (tp * pp) + routed-expert ones / (ep * etp * pp). Stages are taken as equal: the
  embedding and LM head are spread like the layers (the real first/last stage is heavier by up
  to one vocab x hidden matrix / tp).
- weights 2 B (bf16), gradients 4 B (fp32 main grads, megatron-core's grad_reduce_in_fp32),
  optimizer 12 B (fp32 master copy, Adam m and v) per parameter; the distributed optimizer
  divides the 12 B over the data-parallel group (dense: dp; experts: expert dp = tp*dp/(ep*etp)).
- activations (Korthikanti et al. 2022, for this architecture; bf16; sequence parallelism on
  whenever tp > 1, so everything divides by tp; flash/SDPA attention, so no s x s scores), per
  token and layer, in values: attention 4h + 2*g*d (norm input, QKV input, Q, K and V, context);
  dense SwiGLU 2h + 3F (norm input, fc1 input, fc1 output 2F, fc2 input F); MoE 2h + k*(h + 3F_e)
  + 3F_s (norm input, router input, per routed copy its input and both fc outputs, shared
  expert's fc outputs). With full recompute a layer keeps only its input (h). The 1F1B schedule
  keeps pp micro-batches in flight on the first stage, each holding its num_layers/pp layers:
  num_layers layers' worth in all. Plus the logits of one micro-batch on the last stage: bf16
  and their fp32 copy for the loss (6 B x vocab / tp per token).
- usable memory: 90% of the GPU minus 1 GiB (CUDA context, NCCL buffers, fragmentation).

Cost model (relative; ranks layouts, it does not promise a speed). Step time of the slowest
pipeline stage under 1F1B: (m + pp - 1) micro-batch slots (m micro-batches per step; the pp - 1
are the bubble), each slot = that stage's training compute for one micro-batch + its
communication. Communication is not overlapped with compute (pessimistic; megatron can overlap
the DP and EP traffic). Non-GEMM work (norms, activations, permutation, the optimizer step) and
pipeline point-to-point traffic are not modelled.

Compute is a sum of GEMMs, each timed by its shape, so splitting a GEMM is not free:
    t(b, m, n, k) = T0 + ((F / P)^3 + (B / W)^3)^(1/3)
F = 2bmnk FLOPs, B = 2b(mk + kn + mn) bytes of bf16 operands (a batch of b GEMMs in one
kernel, as megatron's grouped GEMM runs a rank's local experts). T0 = 6 us per kernel,
P = 820 TFLOP/s sustained, W = 3.0 TB/s, a smooth maximum of the compute and the memory time.
Source: fitted (in log space, grid search) to OpenXLA's measured H100 (sm_90) bf16 matmul table,
xla/service/gpu/model/matmul_interpolator_data.h, 86 of its entries, b in {1, 2, 4} and m, n, k in
256..4096: RMS error 10%, worst 35% (a 256-row GEMM at k 4096); tests/test_plan.py checks the
curve against a sample of the table. A 4096^3 GEMM runs at 79% of the 989 TFLOP/s peak, a
512 x 640 x 3584 one (one expert of Qwen2-57B at tp 4, etp 4) at 25%, 64 of them batched at 63%.
Backward = 2x forward (dgrad and wgrad are the forward GEMM's shape permuted: same F and B).
Per micro-batch of s tokens (tp > 1 means sequence parallelism: a rank holds s/tp tokens and
gathers them around the attention and dense MLP GEMMs):
- attention: QKV (s x h -> (q + 2kv)/tp), output projection (s x q/tp -> h); the core (QK^T and
  AV, 4 s^2 q / tp FLOPs) at 50% of peak, between FlashAttention-2's ~35% and FlashAttention-3's
  ~75% on H100 (Dao 2023; Shah et al. 2024), the same for every layout.
- dense SwiGLU and the shared expert: fc1 (s x h -> 2F/tp), fc2 (s x F/tp -> h); router
  (s/tp x h -> E).
- routed experts: E/ep local experts in one batched GEMM of m_e = ep * etp * (s/tp) * k / E rows
  (the rows the EP group sends a rank's expert, gathered over expert TP; the router taken as
  balanced) and width F_e/etp: fc1 (m_e x h -> 2F_e/etp), fc2 (m_e x F_e/etp -> h).
- LM head on the last stage: s x h -> vocab/tp. Full recompute adds one forward of the layers.
Communication per micro-batch and layer (act = s * h * 2 B, one micro-batch's hidden states):
- TP: all-gather + reduce-scatter around attention and around the dense MLP or shared expert,
  forward and backward: 4 (tp-1)/tp act each, over NVLink (450 GB/s; tp <= 8, one node).
- EP all-to-all, dispatch + combine, forward + backward, of a rank's k routed copies:
  4 k (ep-1)/ep act/tp; expert TP gathers those copies and reduce-scatters the outputs:
  4 k (etp-1) act/tp (k times the dense TP traffic: it moves routed copies, not tokens). An EP
  group is ep ranks etp apart (megatron-core's expert rank order etp-ep-dp-pp): the share of
  the all-to-all sent to peers in the same node of 8 goes over NVLink, the rest over
  InfiniBand (50 GB/s per GPU), one copy per routed token (megatron's alltoall dispatcher,
  which upcycle runs; DeepEP/HybridEP send one copy per destination node instead).
- DP, once per step: all-reduce (or reduce-scatter + all-gather: the same volume) of fp32
  gradients, 2 (n-1)/n * 4 B per parameter held, dense over dp and experts over expert dp,
  over InfiniBand.
"""

from __future__ import annotations

from dataclasses import dataclass

from upcycle.config import ConfigError, Layout, ModelConfig

GIB = 1024**3
GPUS_PER_NODE = 8
NVLINK_BYTES_S = 450e9
IB_BYTES_S = 50e9
PEAK_BF16_FLOPS = 989e12  # H100/H200 SXM dense bf16
# The GEMM curve of the module docstring, fitted to OpenXLA's H100 bf16 matmul table
GEMM_KERNEL_SECONDS = 6e-6
GEMM_FLOPS = 820e12
GEMM_BYTES_S = 3.0e12
ATTENTION_CORE_EFFICIENCY = 0.5


@dataclass(frozen=True)
class Workload:
    seq_len: int = 4096
    micro_batch: int = 1
    global_batch: int = 512  # sequences per step


@dataclass(frozen=True)
class Memory:
    """Bytes on the most loaded GPU."""

    params: int  # parameters held (a count)
    weights: int
    grads: int
    optimizer: int
    optimizer_distributed: int
    activations: int
    activations_recompute: int
    logits: int

    def total(self, *, distributed_optimizer: bool, recompute: bool) -> int:
        opt = self.optimizer_distributed if distributed_optimizer else self.optimizer
        act = self.activations_recompute if recompute else self.activations
        return self.weights + self.grads + opt + act + self.logits


@dataclass(frozen=True)
class Plan:
    layout: Layout
    memory: Memory
    distributed_optimizer: bool
    recompute: bool
    step_seconds: float
    tokens_per_gpu_s: float
    mfu: float  # model FLOPs / (step time x GPUs x peak): what the cost model predicts
    expert_gemm: tuple[float, int] | None  # (rows per local expert per micro-batch, width)

    @property
    def bytes(self) -> int:
        return self.memory.total(
            distributed_optimizer=self.distributed_optimizer, recompute=self.recompute
        )


def parameter_split(cfg: ModelConfig) -> tuple[int, int]:
    """(non-expert, routed-expert) parameter counts of `cfg`, from its shapes.

    tests/test_plan.py checks the sum against the built model for every preset."""
    h, q, kv = (
        cfg.hidden_size,
        cfg.num_attention_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
    )
    attention = h * q + 2 * h * kv + q * h + (q + 2 * kv if cfg.qkv_bias else 0)
    per_layer = attention + 2 * h  # + the two RMSNorm weights
    experts = 0
    if cfg.is_moe:
        experts = cfg.num_layers * cfg.num_experts * 3 * h * cfg.moe_ffn_hidden_size
        per_layer += cfg.num_experts * h + 3 * h * cfg.shared_expert_ffn_hidden_size
        per_layer += h if cfg.shared_expert_ffn_hidden_size and cfg.shared_expert_gate else 0
    else:
        per_layer += 3 * h * cfg.ffn_hidden_size
    embeddings = cfg.vocab_size * h * (1 if cfg.tie_embeddings else 2)
    return cfg.num_layers * per_layer + embeddings + h, experts


def memory(cfg: ModelConfig, layout: Layout, work: Workload) -> Memory:
    """The memory model of the module docstring for one layout (dp resolved)."""
    dense, experts = parameter_split(cfg)
    etp = layout.expert_tp
    held_dense = dense // (layout.tp * layout.pp)
    held_experts = experts // (layout.ep * etp * layout.pp)
    held = held_dense + held_experts
    expert_dp = layout.tp * layout.dp // (layout.ep * etp)
    opt_dist = 12 * held_dense // layout.dp + 12 * held_experts // expert_dp
    h, g, d = cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim
    attention = 4 * h + 2 * g * d
    if cfg.is_moe:
        mlp = 2 * h + cfg.moe_top_k * (h + 3 * cfg.moe_ffn_hidden_size)
        mlp += 3 * cfg.shared_expert_ffn_hidden_size
    else:
        mlp = 2 * h + 3 * cfg.ffn_hidden_size
    tokens = work.seq_len * work.micro_batch
    per_layer = 2 * (attention + mlp) * tokens // layout.tp
    per_layer_recompute = 2 * h * tokens // layout.tp
    return Memory(
        params=held,
        weights=2 * held,
        grads=4 * held,
        optimizer=12 * held,
        optimizer_distributed=opt_dist,
        activations=per_layer * cfg.num_layers,
        activations_recompute=per_layer_recompute * cfg.num_layers,
        logits=6 * tokens * cfg.vocab_size // layout.tp,
    )


def gemm_seconds(m: float, n: float, k: float, batch: int = 1) -> float:
    """The GEMM curve of the module docstring: `batch` GEMMs of (m x k) @ (k x n) in one kernel."""
    flops = 2.0 * batch * m * n * k
    operand_bytes = 2.0 * batch * (m * k + k * n + m * n)
    return GEMM_KERNEL_SECONDS + (
        (flops / GEMM_FLOPS) ** 3 + (operand_bytes / GEMM_BYTES_S) ** 3
    ) ** (1 / 3)


def expert_gemm(cfg: ModelConfig, layout: Layout, work: Workload) -> tuple[float, int] | None:
    """(rows, width) of each local expert's GEMMs per micro-batch, or None for a dense model."""
    if not cfg.is_moe:
        return None
    tokens = work.seq_len * work.micro_batch
    rows = layout.ep * layout.expert_tp * tokens / layout.tp * cfg.moe_top_k / cfg.num_experts
    return rows, cfg.moe_ffn_hidden_size // layout.expert_tp


def _swiglu_seconds(rows: float, h: int, width: int, batch: int = 1) -> float:
    return gemm_seconds(rows, 2 * width, h, batch) + gemm_seconds(rows, h, width, batch)


def layer_forward_seconds(cfg: ModelConfig, layout: Layout, work: Workload) -> float:
    """One transformer layer's forward GEMMs on one rank for one micro-batch."""
    s = work.seq_len * work.micro_batch
    h, tp = cfg.hidden_size, layout.tp
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    t = gemm_seconds(s, (q + 2 * kv) / tp, h) + gemm_seconds(s, h, q / tp)
    core_flops = 4 * work.seq_len**2 * work.micro_batch * q / tp  # QK^T and AV
    t += core_flops / (PEAK_BF16_FLOPS * ATTENTION_CORE_EFFICIENCY)
    if not cfg.is_moe:
        return t + _swiglu_seconds(s, h, cfg.ffn_hidden_size // tp)
    t += gemm_seconds(s / tp, cfg.num_experts, h)
    if cfg.shared_expert_ffn_hidden_size:
        t += _swiglu_seconds(s, h, cfg.shared_expert_ffn_hidden_size // tp)
    rows, width = expert_gemm(cfg, layout, work)
    return t + _swiglu_seconds(rows, h, width, batch=cfg.num_experts // layout.ep)


def layer_comm_seconds(cfg: ModelConfig, layout: Layout, work: Workload) -> float:
    """One layer's TP, EP and expert-TP traffic on one rank for one micro-batch, fwd + bwd."""
    act = work.seq_len * work.micro_batch * cfg.hidden_size * 2
    tp, ep, etp = layout.tp, layout.ep, layout.expert_tp
    gathers = 1 + (not cfg.is_moe or cfg.shared_expert_ffn_hidden_size > 0)
    t = gathers * 4 * (tp - 1) / tp * act / NVLINK_BYTES_S
    if cfg.is_moe:
        copies = cfg.moe_top_k * act / tp
        peers_in_node = min(ep, max(1, GPUS_PER_NODE // etp))
        t += 4 * copies * (peers_in_node - 1) / ep / NVLINK_BYTES_S
        t += 4 * copies * (ep - peers_in_node) / ep / IB_BYTES_S
        t += 4 * copies * (etp - 1) / NVLINK_BYTES_S
    return t


def step_seconds(
    cfg: ModelConfig, layout: Layout, work: Workload, *, recompute: bool = False
) -> float:
    """The module docstring's step time of `layout` (dp resolved)."""
    micro = work.global_batch // (work.micro_batch * layout.dp)
    layers = cfg.num_layers // layout.pp
    forward = layer_forward_seconds(cfg, layout, work)
    s = work.seq_len * work.micro_batch
    head = gemm_seconds(s, cfg.vocab_size / layout.tp, cfg.hidden_size)
    stage = layers * (forward * (4 if recompute else 3) + layer_comm_seconds(cfg, layout, work))
    stage += 3 * head
    dense, experts = parameter_split(cfg)
    expert_dp = layout.tp * layout.dp // (layout.ep * layout.expert_tp)
    held_dense = dense / (layout.tp * layout.pp)
    held_experts = experts / (layout.ep * layout.expert_tp * layout.pp)
    grads = 2 * (layout.dp - 1) / layout.dp * 4 * held_dense
    grads += 2 * (expert_dp - 1) / expert_dp * 4 * held_experts
    return (micro + layout.pp - 1) * stage + grads / IB_BYTES_S


def _divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


def plans(cfg: ModelConfig, *, gpus: int, gpu_memory_gib: float, work: Workload) -> list[Plan]:
    """Every layout that fits, with the cheapest memory options that make it fit (no recompute
    before recompute, no distributed optimizer before it), fastest first."""
    if gpus < 1 or gpu_memory_gib <= 0:
        raise ConfigError("gpus", "needs at least one GPU with some memory")
    usable = gpu_memory_gib * GIB * 0.9 - GIB
    found = []
    for tp in [t for t in _divisors(GPUS_PER_NODE) if cfg.num_kv_heads % t == 0]:
        for pp in _divisors(cfg.num_layers):
            if gpus % (tp * pp):
                continue
            dp = gpus // (tp * pp)
            if work.global_batch % (work.micro_batch * dp):
                continue
            eps = _divisors(cfg.num_experts) if cfg.is_moe else [1]
            for ep in eps:
                for etp in _divisors(tp) if cfg.is_moe else [tp]:
                    layout = Layout(tp=tp, pp=pp, ep=ep, etp=etp, dp=dp,
                                    sequence_parallel=tp > 1)  # fmt: skip
                    try:
                        layout.check_model(cfg)
                    except ConfigError:
                        continue
                    if (tp * dp) % (ep * etp):
                        continue
                    mem = memory(cfg, layout, work)
                    for dist_opt, recompute in ((False, False), (True, False), (True, True)):
                        if mem.total(distributed_optimizer=dist_opt, recompute=recompute) <= usable:
                            found.append(_plan(cfg, layout, work, mem, dist_opt, recompute, gpus))
                            break
    return sorted(found, key=lambda p: p.step_seconds)


def _plan(cfg, layout, work, mem, dist_opt, recompute, gpus) -> Plan:
    from upcycle.platform.flops import train_flops_per_token

    t = step_seconds(cfg, layout, work, recompute=recompute)
    tokens = work.global_batch * work.seq_len
    mfu = train_flops_per_token(cfg, work.seq_len) * tokens / (t * gpus * PEAK_BF16_FLOPS)
    return Plan(layout, mem, dist_opt, recompute, t, tokens / t / gpus, mfu,
                expert_gemm(cfg, layout, work))  # fmt: skip


def gib(n: int) -> str:
    return f"{n / GIB:.1f}"
