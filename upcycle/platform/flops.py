"""Model FLOPs and device peak FLOP/s: the model-FLOPs-utilisation (MFU) estimate that the
training loop logs and the layout planner predicts."""

from __future__ import annotations

import statistics
import time

import torch

from upcycle import runtime
from upcycle.config import ModelConfig

# Dense bf16 peak FLOP/s of accelerators we know (vendor datasheets, without sparsity).
GPU_BF16_PEAK = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "B200": 2250e12}


def train_flops_per_token(cfg: ModelConfig, seq_length: int) -> float:
    """Model FLOPs of one training token (forward + backward = 3x forward).

    Forward: 2 FLOPs per weight that multiplies the token (attention projections, the active
    experts' and shared expert's SwiGLU, router, LM head; not the embedding lookup) plus
    attention's QK^T and AV (2 * 2 * seq * q_width per layer, causal masking not discounted).
    """
    h, q, kv = (
        cfg.hidden_size,
        cfg.num_attention_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
    )
    attention_weights = h * q + 2 * h * kv + q * h
    if cfg.is_moe:
        ffn_width = cfg.moe_top_k * cfg.moe_ffn_hidden_size + cfg.shared_expert_ffn_hidden_size
        router = h * cfg.num_experts + (h if cfg.shared_expert_ffn_hidden_size else 0)
    else:
        ffn_width, router = cfg.ffn_hidden_size, 0
    per_layer = attention_weights + 3 * h * ffn_width + router
    weights = cfg.num_layers * per_layer + h * cfg.vocab_size
    attention = 4 * seq_length * q * cfg.num_layers
    return 3.0 * (2.0 * weights + attention)


def peak_flops() -> float:
    """Per-device peak FLOP/s: the datasheet bf16 figure on a known GPU; on CPU a measured
    fp32 GEMM (the best this machine does, so CPU "MFU" reads as the fraction of that)."""
    if runtime.has_cuda():
        name = runtime.device_name()
        for key, value in GPU_BF16_PEAK.items():
            if key in name:
                return value
        return 0.0
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)
