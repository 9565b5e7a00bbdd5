"""Training-step tokens/s of our megatron-core stack vs transformers, on the same config and weights.

    .venv/bin/python bench/train_throughput.py [--preset moe-bench|tiny-moe] [--steps 5]
        [--dtypes fp32 bf16] [--ablation]

In one process, with the same batch and thread count, for each dtype:
1. a training step (forward + backward + Adam) of ours (megatron-core GPTModel, DDP, megatron
   optimizer, forward-backward schedule: what `upcycle train` runs per rank; bf16 is megatron's
   mixed precision: bf16 params and activations, fp32 main params, grads and Adam state) and of
   transformers' `Qwen2MoeForCausalLM` (+ torch AdamW; in bf16 its params, grads and Adam state
   are bf16) built from the same weights; medians and their ratio;
2. the MoE layer (router + routed + shared experts) forward + backward vs a dense SwiGLU layer of
   the same active FLOPs (width top_k * expert width + shared width); the ratio;
3. the achieved FLOP/s of both training steps vs a plain GEMM of the same dtype on this machine;
4. with --ablation, our step with megatron-core's attention, experts and optimizer loop put back,
   then each of our changes (CHANGES) added in turn: what each one buys.
Each timed function runs twice before timing: oneDNN (bf16 matmul on CPU) compiles a kernel per
new GEMM shape, which a long training run pays once.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).parent))

from forward_throughput import MOE_BENCH, median_seconds  # noqa: E402
from megatron.core.distributed import finalize_model_grads  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.transformer.dot_product_attention import DotProductAttention  # noqa: E402
from megatron.core.transformer.moe.experts import SequentialMLP  # noqa: E402

from upcycle.config import from_name  # noqa: E402
from upcycle.conversion.hf_interop import transformers_twin  # noqa: E402
from upcycle.dense.attention import SDPAttention  # noqa: E402
from upcycle.dense.megatron_config import to_transformer_config  # noqa: E402
from upcycle.moe.experts import FusedSequentialMLP  # noqa: E402
from upcycle.moe.model import build_model  # noqa: E402
from upcycle.platform.distributed import single_process  # noqa: E402
from upcycle.platform.flops import train_flops_per_token  # noqa: E402
from upcycle.train_config import TrainConfig  # noqa: E402
from upcycle.training.data import Batch  # noqa: E402
from upcycle.training.objectives import lm_step  # noqa: E402
from upcycle.training.step import build_chunks, build_optimizer  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# The ablation's steps, in the order they were added; each can be taken back out of our step.
CHANGES = {
    "sdpa": "SDPA core attention (dense/attention.py)",
    "experts": "fused, bucketed experts (moe/experts.py)",
    "adam": "torch's fused AdamW",
}


def our_step(cfg, layout, batch: Batch, dtype=torch.float32, without: frozenset[str] = frozenset()):
    """Our training step; `without` puts back megatron-core's module or optimizer loop for each
    named change (CHANGES), with the same weights and layout."""
    tconfig = to_transformer_config(cfg, layout, params_dtype=dtype)
    tconfig.finalize_model_grads_func = finalize_model_grads
    chunks = build_chunks(cfg, layout, tconfig)
    optimizer = build_optimizer(chunks, TrainConfig(lr=1e-4, clip_grad=1.0), tconfig)
    for module in chunks[0].modules():
        if "sdpa" in without and type(module) is SDPAttention:
            module.__class__ = DotProductAttention
        if "experts" in without and type(module) is FusedSequentialMLP:
            module.__class__ = SequentialMLP
    if "adam" in without:
        for inner in optimizer.chained_optimizers:
            for group in inner.optimizer.param_groups:
                group["fused"] = False
    schedule = get_forward_backward_func()
    b, s = batch.tokens.shape

    def step():
        chunks[0].zero_grad_buffer()
        optimizer.zero_grad()
        schedule(
            forward_step_func=lm_step,
            data_iterator=iter([batch]),
            model=chunks,
            num_microbatches=1,
            seq_length=s,
            micro_batch_size=b,
        )
        optimizer.step()

    return chunks[0].module, step


def their_step(model, batch: Batch):
    model.config.output_router_logits = True  # the aux loss, as ours computes it
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = model(input_ids=batch.tokens, labels=batch.tokens)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step


def layer_fwd_bwd(cfg, tokens: int, steps: int, dtype) -> tuple[float, float]:
    """Median seconds of the MoE layer and of a dense SwiGLU layer with its active FLOPs."""
    dense_width = cfg.moe_top_k * cfg.moe_ffn_hidden_size + cfg.shared_expert_ffn_hidden_size
    dense = cfg.replace(
        name="dense-equivalent", num_experts=0, moe_top_k=0, moe_ffn_hidden_size=0,
        shared_expert_ffn_hidden_size=0, ffn_hidden_size=dense_width,
    )  # fmt: skip
    timings = []
    for c in (cfg.replace(num_layers=1), dense.replace(num_layers=1)):
        mlp = build_model(c, to_transformer_config(c, params_dtype=dtype)).decoder.layers[0].mlp
        x = torch.randn(tokens, 1, c.hidden_size, dtype=dtype, requires_grad=True)

        def fwd_bwd(mlp=mlp, x=x):
            out, _bias = mlp(x)
            out.sum().backward()

        timings.append(median_seconds(fwd_bwd, steps))
    return timings[0], timings[1]


def gemm_flops(m: int, k: int, n: int, steps: int, dtype) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    return 2 * m * k * n / median_seconds(lambda: a @ b, steps)


def warm(fn):
    fn()  # median_seconds runs one more before timing
    return fn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="moe-bench")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=DTYPES)
    parser.add_argument(
        "--ablation", action="store_true", help="also our step with each change taken back out"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = MOE_BENCH if args.preset == "moe-bench" else from_name(args.preset)
    g = torch.Generator().manual_seed(0)
    window = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g)
    batch = Batch(tokens=window[:, :-1].contiguous(), labels=window[:, 1:].contiguous())
    n = batch.tokens.numel()
    flops = train_flops_per_token(cfg, args.seq) * n
    rows, ablation = {}, {}
    with single_process() as layout, tempfile.TemporaryDirectory() as tmp:
        for name in args.dtypes:
            dtype = DTYPES[name]
            model, ours = our_step(cfg, layout, batch, dtype)
            twin = transformers_twin(cfg, model, Path(tmp) / name).to(dtype)
            theirs = their_step(twin, batch)
            t_ours = median_seconds(warm(ours), args.steps)
            t_theirs = median_seconds(warm(theirs), args.steps)
            del model, ours, twin, theirs
            t_moe, t_dense = layer_fwd_bwd(cfg, n, args.steps, dtype)
            gemm = gemm_flops(n, cfg.hidden_size, 4 * cfg.hidden_size, args.steps, dtype)
            rows[name] = (t_ours, t_theirs, t_moe, t_dense, gemm)
            if args.ablation:
                for k in range(len(CHANGES)):  # none of the changes, then one more each time
                    without = frozenset(list(CHANGES)[k:])
                    _, step = our_step(cfg, layout, batch, dtype, without)
                    ablation.setdefault(k, {})[name] = median_seconds(warm(step), args.steps)
                    del step
    print(
        f"{cfg.name}: batch {args.batch}x{args.seq}, {args.threads} threads, median of {args.steps}"
    )
    for name, (t_ours, t_theirs, t_moe, t_dense, gemm) in rows.items():
        print(f"[{name}]")
        print(f"  training step, upcycle (megatron-core): {n / t_ours:9.0f} tokens/s")
        print(f"  training step, transformers:            {n / t_theirs:9.0f} tokens/s")
        target = "1.5" if name == "bf16" else "1.2"
        print(
            f"  ratio ours/transformers:                {t_theirs / t_ours:9.2f}x   (target >= {target})"
        )
        print(f"  MoE layer fwd+bwd:                      {t_moe * 1e3:9.1f} ms")
        print(f"  dense layer, same active FLOPs:         {t_dense * 1e3:9.1f} ms")
        print(
            f"  ratio MoE/dense:                        {t_moe / t_dense:9.2f}x   (target <= 1.3)"
        )
        print(f"  achieved, ours:                         {flops / t_ours / 1e9:9.1f} GFLOP/s")
        print(f"  achieved, transformers:                 {flops / t_theirs / 1e9:9.1f} GFLOP/s")
        print(
            f"  plain {name} GEMM {n}x{cfg.hidden_size}x{4 * cfg.hidden_size}: "
            f"{gemm / 1e9:9.1f} GFLOP/s (ours reach {flops / t_ours / gemm:.0%} of it)"
        )
    if {"fp32", "bf16"} <= rows.keys():
        speedup = rows["fp32"][0] / rows["bf16"][0]
        print(f"ours bf16 / ours fp32:                    {speedup:9.2f}x")
    if ablation:
        ablation[len(CHANGES)] = {name: row[0] for name, row in rows.items()}
        labels = ["megatron-core's attention, SequentialMLP, Adam loop"]
        labels += [f"+ {text}" for text in CHANGES.values()]
        print("ablation, our training step tokens/s: " + "  ".join(rows))
        for k, label in enumerate(labels):
            print(f"  {label:<56}" + "".join(f"{n / ablation[k][d]:>8.0f}" for d in rows))


if __name__ == "__main__":
    main()
