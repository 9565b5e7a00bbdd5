"""Decode throughput of the serving engine on one GPU: tokens/s and time to first token.

    python3 bench/gpu_decode.py [--preset moe-a1b] [--streams 1 16] [--prompt 128] [--tokens 128]

The same `Engine` + `ModelRunner` that `upcycle serve` replicas run (KV-cache slots, continuous
batching, megatron-core model in bf16 with its native layers), on freshly initialised weights
(no checkpoint to write first). Only torch and megatron-core are needed (bench/gpu_check.sh
carries megatron-core). On a machine without CUDA it runs in fp32 (use a tiny preset there).
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch

warnings.filterwarnings("ignore")

from gpu_train_step import MOE_A1B  # noqa: E402
from serve_throughput import ours_once  # noqa: E402

from upcycle import runtime  # noqa: E402
from upcycle.config import from_name  # noqa: E402
from upcycle.deploy.engine.batching import Engine  # noqa: E402
from upcycle.deploy.engine.runner import ModelRunner, RunnerConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="moe-a1b")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = MOE_A1B if args.preset == "moe-a1b" else from_name(args.preset)
    slots, context = max(args.streams), args.prompt + args.tokens
    rc = RunnerConfig(max_num_seqs=slots, max_model_len=context, max_step_tokens=8192)
    engine = Engine(
        ModelRunner(cfg, rc).forward,
        max_num_seqs=slots,
        max_model_len=context,
        max_step_tokens=rc.max_step_tokens,
        eos_ids=(),
        vocab_limit=cfg.vocab_size,
        decode=lambda ids: "",
    )
    print(f"{cfg.name} on {runtime.device_name()}: prompt {args.prompt} + {args.tokens} tokens")
    g = torch.Generator().manual_seed(0)
    base = None
    for n in args.streams:
        prompts = torch.randint(0, cfg.vocab_size, (n, args.prompt), generator=g).tolist()
        ours_once(engine, prompts, args.tokens)  # warm-up
        runs = [ours_once(engine, prompts, args.tokens) for _ in range(args.repeats)]
        ttft, tps = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        base = base or tps
        print(
            f"  {n:>3} streams: {tps:8.0f} tokens/s  TTFT {ttft * 1e3:6.0f} ms  "
            f"({tps / base:.2f}x one stream)"
        )


if __name__ == "__main__":
    main()
