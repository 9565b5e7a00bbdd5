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

Cost model (relative; ranks layouts, it does not promise a speed): step time =
compute * (1 + (pp - 1) / m) + communication, where compute is the model's training FLOPs at
40% of peak (the same for every layout), m the micro-batches per step and (pp-1)/m the 1F1B
bubble; communication: TP (sequence parallel) moves 8 * (tp-1)/tp * s*b*h * 2 B per layer and
micro-batch over NVLink (450 GB/s; tp <= 8, one node); EP moves 4 * k * (ep-1)/ep * s*b*h * 2 B
per MoE layer and micro-batch (dispatch + combine, forward + backward) over NVLink when the
tp*ep*etp GPUs fit in a node of 8, else over InfiniBand (50 GB/s per GPU); DP all-reduces the
gradients (2 * (dp-1)/dp * 4 B per held parameter) over InfiniBand without overlap, which is
pessimistic. Pipeline point-to-point traffic is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

from upcycle.config import ConfigError, Layout, ModelConfig

GIB = 1024**3
GPUS_PER_NODE = 8
NVLINK_BYTES_S = 450e9
IB_BYTES_S = 50e9
ASSUMED_MFU = 0.4
PEAK_BF16_FLOPS = 989e12  # H100/H200 SXM dense bf16


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


def step_seconds(cfg: ModelConfig, layout: Layout, work: Workload, gpus: int) -> float:
    from upcycle.platform.metrics import train_flops_per_token

    tokens = work.global_batch * work.seq_len
    compute = (
        train_flops_per_token(cfg, work.seq_len) * tokens / (gpus * PEAK_BF16_FLOPS * ASSUMED_MFU)
    )
    micro = work.global_batch // (work.micro_batch * layout.dp)
    bubble = (layout.pp - 1) / micro
    act = work.seq_len * work.micro_batch * cfg.hidden_size * 2  # one micro-batch's hidden, bytes
    layers = cfg.num_layers // layout.pp
    tp_bytes = 8 * (layout.tp - 1) / layout.tp * act * layers * micro
    comm = tp_bytes / NVLINK_BYTES_S
    if cfg.is_moe and layout.ep > 1:
        ep_bytes = 4 * cfg.moe_top_k * (layout.ep - 1) / layout.ep * act * layers * micro
        in_node = layout.tp * layout.ep * layout.expert_tp <= GPUS_PER_NODE
        comm += ep_bytes / (NVLINK_BYTES_S if in_node else IB_BYTES_S)
    held = memory(cfg, layout, work).params
    comm += 2 * (layout.dp - 1) / layout.dp * 4 * held / IB_BYTES_S
    return compute * (1 + bubble) + comm


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
                for etp in sorted({1, tp}) if cfg.is_moe else [tp]:
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
                            t = step_seconds(cfg, layout, work, gpus)
                            slowdown = 4 / 3 if recompute else 1.0  # one more forward
                            found.append(Plan(layout, mem, dist_opt, recompute, t * slowdown,
                                              work.global_batch * work.seq_len / (t * slowdown) / gpus))  # fmt: skip
                            break
    return sorted(found, key=lambda p: p.step_seconds)


def gib(n: int) -> str:
    return f"{n / GIB:.1f}"
