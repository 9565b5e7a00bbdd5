"""Forward-pass tokens/s of our megatron-core model vs transformers on the same weights.

    .venv/bin/python bench/forward_throughput.py [--preset moe-bench|tiny-moe] [--steps 5]
        [--reward]   (the reward model: score head vs transformers' *ForSequenceClassification)

Both models run in this process, on the same config, batch and thread count; the script prints the
median of each and their ratio. (The training-step benchmark belongs to the training issue.)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")

from upcycle.config import ModelConfig, from_name  # noqa: E402
from upcycle.conversion.hf_interop import transformers_twin  # noqa: E402
from upcycle.moe.model import build_model  # noqa: E402
from upcycle.platform.distributed import single_process  # noqa: E402

# The team's shared benchmark configuration (reference/qwen2.md).
MOE_BENCH = ModelConfig(
    "moe-bench", vocab_size=8192, hidden_size=512, num_layers=4, num_attention_heads=8,
    num_kv_heads=2, num_experts=64, moe_top_k=8, moe_ffn_hidden_size=128,
    shared_expert_ffn_hidden_size=1024, norm_topk_prob=False,
)  # fmt: skip


def median_seconds(fn, steps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="moe-bench")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reward", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = MOE_BENCH if args.preset == "moe-bench" else from_name(args.preset)
    if args.reward:
        cfg = cfg.as_reward_model().replace(name=cfg.name + "-reward")
    tokens = torch.randint(0, cfg.vocab_size - 1, (args.batch, args.seq))
    positions = torch.arange(args.seq).expand_as(tokens)
    with single_process(), tempfile.TemporaryDirectory() as tmp:
        ours = build_model(cfg).eval()
        theirs = transformers_twin(cfg, ours, Path(tmp) / "hf")
        if args.reward and theirs.config.pad_token_id is None:
            # a small vocabulary has no <|endoftext|> to pad with; an id the batch never holds
            # lets transformers pool each row's last token, as it does with real padding
            theirs.config.pad_token_id = cfg.vocab_size - 1
        with torch.no_grad():
            t_ours = median_seconds(lambda: ours(tokens, positions, None), args.steps)
            t_theirs = median_seconds(lambda: theirs(tokens), args.steps)
    n = tokens.numel()
    print(
        f"{cfg.name}: batch {args.batch}x{args.seq}, {args.threads} threads, median of {args.steps}"
    )
    print(f"  upcycle (megatron-core) forward: {n / t_ours:10.0f} tokens/s")
    print(f"  transformers forward:            {n / t_theirs:10.0f} tokens/s")
    print(f"  ratio ours/transformers:         {t_theirs / t_ours:10.2f}x")


if __name__ == "__main__":
    main()
