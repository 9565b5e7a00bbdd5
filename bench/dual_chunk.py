"""What Dual Chunk Attention costs: our engine with DCA vs the same engine with plain attention.

    .venv/bin/python bench/dual_chunk.py [--prompt 2048] [--tokens 32] [--streams 1 4]
        [--trained 1024] [--repeats 3] [--threads 2]

moe-bench weights (fresh), one process. For N streams, N requests of `--prompt` random tokens ask
for `--tokens` tokens each; DCA runs with `dual_chunk_length = --trained` (so the prompt spans
several chunks), plain attention over the whole context. DCA scores every query three times
(intra / successive / inter chunk positions) and selects per key, so attention costs about 3x;
printed is how much of that reaches time to first token (prefill) and decode tokens/s.
Medians over `--repeats` runs.
"""

from __future__ import annotations

import argparse
import warnings

import torch

warnings.filterwarnings("ignore")

from forward_throughput import MOE_BENCH  # noqa: E402
from serve_throughput import median_pair, ours_once  # noqa: E402

from upcycle.deploy.engine.batching import Engine  # noqa: E402
from upcycle.deploy.engine.runner import ModelRunner, RunnerConfig  # noqa: E402


def engine(rc: RunnerConfig) -> Engine:
    return Engine(
        ModelRunner(MOE_BENCH, rc).forward,
        max_num_seqs=rc.max_num_seqs,
        max_model_len=rc.max_model_len,
        max_step_tokens=rc.max_step_tokens,
        eos_ids=(),
        vocab_limit=MOE_BENCH.vocab_size,
        decode=lambda ids: "",  # throughput of the model, not of the tokenizer
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--trained", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from upcycle.platform.cpu import apply_cpu_patches

    apply_cpu_patches()
    rc = RunnerConfig(
        max_num_seqs=max(args.streams), max_model_len=args.prompt + args.tokens,
        max_step_tokens=512,
    )  # fmt: skip
    rows = []
    plain = engine(rc)
    dca = engine(rc.model_copy(update={"dual_chunk_length": args.trained}))
    g = torch.Generator().manual_seed(0)
    for n in args.streams:
        prompts = torch.randint(0, MOE_BENCH.vocab_size, (n, args.prompt), generator=g).tolist()
        ours = [
            median_pair(lambda e=e, p=prompts: ours_once(e, p, args.tokens), args.repeats)
            for e in (plain, dca)
        ]
        rows.append((n, *ours))
    print(
        f"moe-bench: prompt {args.prompt} + {args.tokens} tokens per stream, DCA trained length "
        f"{args.trained} (chunk {3 * args.trained // 4}), {args.threads} threads, medians of "
        f"{args.repeats}"
    )
    print(f"{'streams':>7} {'plain TTFT ms':>14} {'DCA TTFT ms':>12} {'ratio':>6} "
          f"{'plain tok/s':>12} {'DCA tok/s':>10} {'ratio':>6}")  # fmt: skip
    for n, (p_ttft, p_tps), (d_ttft, d_tps) in rows:
        print(
            f"{n:>7} {p_ttft * 1e3:>14.0f} {d_ttft * 1e3:>12.0f} {d_ttft / p_ttft:>5.2f}x "
            f"{p_tps:>12.1f} {d_tps:>10.1f} {d_tps / p_tps:>5.2f}x"
        )


if __name__ == "__main__":
    main()
