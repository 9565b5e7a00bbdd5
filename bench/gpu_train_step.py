"""A bf16 training step of a ~1B-active-parameter MoE on one GPU: tokens/s and MFU.

    python3 bench/gpu_train_step.py [--preset moe-a1b] [--batch 4] [--seq 2048] [--steps 5]

Built exactly as `upcycle train` builds a rank (upcycle.training.step): megatron-core GPTModel with
its native (non-Transformer-Engine) layers, DDP, the distributed optimizer, the forward-backward
schedule. Only torch and megatron-core are needed (bench/gpu_check.sh carries megatron-core).
MFU is model FLOPs (upcycle.platform.flops.train_flops_per_token) over the GPU's dense bf16
peak. On a machine without CUDA it runs the same code in fp32 (use a tiny preset there).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

warnings.filterwarnings("ignore")

from megatron.core.distributed import finalize_model_grads  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402

from upcycle import runtime  # noqa: E402
from upcycle.config import ModelConfig, from_name  # noqa: E402
from upcycle.dense.megatron_config import to_transformer_config  # noqa: E402
from upcycle.moe.model import build_on_meta  # noqa: E402
from upcycle.moe.params import count_parameters  # noqa: E402
from upcycle.platform.distributed import single_process  # noqa: E402
from upcycle.platform.flops import peak_flops, train_flops_per_token  # noqa: E402
from upcycle.train_config import TrainConfig  # noqa: E402
from upcycle.training.data import Batch  # noqa: E402
from upcycle.training.objectives import lm_step  # noqa: E402
from upcycle.training.step import build_chunks, build_optimizer, param_dtype  # noqa: E402

# Qwen2-MoE shaped, ~1.1B active / 2.6B total parameters: fits one 80 GB GPU with Adam.
MOE_A1B = ModelConfig(
    "moe-a1b", vocab_size=151936, hidden_size=2048, num_layers=16, num_attention_heads=16,
    num_kv_heads=4, num_experts=16, moe_top_k=4, moe_ffn_hidden_size=1024,
    shared_expert_ffn_hidden_size=2048, max_position_embeddings=4096,
)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="moe-a1b")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    cfg = MOE_A1B if args.preset == "moe-a1b" else from_name(args.preset)
    train = TrainConfig(seq_length=args.seq, lr=1e-4)
    device = runtime.device()
    window = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    batch = Batch(tokens=window[:, :-1].contiguous(), labels=window[:, 1:].contiguous())
    with single_process() as layout:
        counts = count_parameters(build_on_meta(cfg), cfg)
        tconfig = to_transformer_config(cfg, layout, params_dtype=param_dtype(train))
        tconfig.finalize_model_grads_func = finalize_model_grads
        chunks = build_chunks(cfg, layout, tconfig)
        optimizer = build_optimizer(chunks, train, tconfig)
        schedule = get_forward_backward_func()
        times = []
        for i in range(args.steps + 1):  # the first is warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            began = time.perf_counter()
            chunks[0].zero_grad_buffer()
            optimizer.zero_grad()
            losses = schedule(
                forward_step_func=lm_step, data_iterator=iter([batch]), model=chunks,
                num_microbatches=1, seq_length=args.seq, micro_batch_size=args.batch,
            )  # fmt: skip
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - began)
        memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    step = statistics.median(times)
    tokens = batch.tokens.numel()
    flops = train_flops_per_token(cfg, args.seq) * tokens
    peak = peak_flops()
    print(
        f"device: {runtime.device_name()}; dtype {tconfig.params_dtype}; megatron-core native layers"
    )
    print(f"model {cfg.name}: {counts.total_params:,} params, {counts.active_params:,} active")
    print(
        f"batch {args.batch}x{args.seq}; loss {float(losses[0]['lm loss']):.3f}; peak memory {memory:.1f} GiB"
    )
    print(
        f"training step: median {step * 1e3:.0f} ms over {args.steps} -> {tokens / step:,.0f} tokens/s"
    )
    print(
        f"model FLOP/s {flops / step / 1e12:.1f} T; MFU {flops / step / peak:.1%} of {peak / 1e12:.0f} TFLOP/s peak"
    )


if __name__ == "__main__":
    main()
