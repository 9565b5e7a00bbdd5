"""Decode throughput and time to first token: upcycle's engine vs transformers' batched `generate`.

    .venv/bin/python bench/serve_throughput.py [--preset moe-bench|tiny-moe] [--streams 1 4 16]
        [--prompt 64] [--tokens 64] [--repeats 5] [--threads 2] [--dtype bf16|fp32]

Both run in this process on the same weights, prompts and thread count. For N streams, N
requests of `--prompt` random tokens each ask for `--tokens` tokens at once: ours goes through
the continuous-batching `Engine` over the megatron-core model (KV cache slots, one forward per
step), transformers through one `generate` call on the batch of N (its KV cache, greedy, no
early stop). Time to first token is, for ours, the median over requests of the time from
submission to the first token; for transformers the time of `generate(max_new_tokens=1)` on the
same batch (it cannot hand out tokens earlier). `--dtype` is both sides' weights and KV cache
(ours: `engine.dtype`; logits and sampling stay fp32). Printed: medians (TTFT also p90) over
`--repeats` runs, ratios ours/transformers, and ours at N streams over ours at 1 stream.
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

from forward_throughput import MOE_BENCH  # noqa: E402

from upcycle.config import from_name  # noqa: E402
from upcycle.conversion.hf_interop import transformers_twin  # noqa: E402
from upcycle.deploy.engine import Engine  # noqa: E402
from upcycle.deploy.runner import ModelRunner, RunnerConfig  # noqa: E402
from upcycle.deploy.sampling import SamplingParams  # noqa: E402
from upcycle.moe.model import build_model  # noqa: E402
from upcycle.platform.checkpoint import save_checkpoint  # noqa: E402
from upcycle.platform.distributed import single_process  # noqa: E402


def ours_once(engine: Engine, prompts: list[list[int]], tokens: int) -> tuple[float, float]:
    """(median time to first token s, generated tokens/s) for all prompts submitted at once."""
    params = SamplingParams(max_tokens=tokens, temperature=0.0)
    start = time.perf_counter()
    ids = [engine.add(p, params) for p in prompts]
    first: dict[str, float] = {}
    produced = 0
    while engine.has_work:
        for out in engine.step():
            first.setdefault(out.request_id, time.perf_counter() - start)
            produced += len(out.token_ids)
    elapsed = time.perf_counter() - start
    assert produced == tokens * len(prompts) and len(first) == len(ids)
    return statistics.median(first.values()), produced / elapsed


def transformers_once(model, prompts: list[list[int]], tokens: int) -> tuple[float, float]:
    batch = torch.tensor(prompts)
    mask = torch.ones_like(batch)

    def generate(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                batch, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                pad_token_id=0, eos_token_id=None,
            )  # fmt: skip
        assert out.shape[1] == batch.shape[1] + n
        return time.perf_counter() - start

    ttft = generate(1)
    return ttft, tokens * len(prompts) / generate(tokens)


def summary(fn, repeats: int) -> tuple[float, float, float]:
    """(TTFT p50, TTFT p90, tokens/s p50) over `repeats` runs after a warm-up run."""
    fn()
    runs = [fn() for _ in range(repeats)]
    ttft = sorted(r[0] for r in runs)
    p90 = ttft[min(len(ttft) - 1, round(0.9 * (len(ttft) - 1)))]
    return statistics.median(ttft), p90, statistics.median(r[1] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="moe-bench")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    args = parser.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    torch.set_num_threads(args.threads)
    cfg = MOE_BENCH if args.preset == "moe-bench" else from_name(args.preset)
    context = args.prompt + args.tokens
    with tempfile.TemporaryDirectory() as tmp:
        with single_process():
            model = build_model(cfg).eval()
            save_checkpoint(model, cfg, Path(tmp) / "ckpt")
            theirs = transformers_twin(cfg, model, Path(tmp) / "hf").to(dtype)
            del model
        slots = max(args.streams)
        rc = RunnerConfig(
            max_num_seqs=slots, max_model_len=context, max_step_tokens=4096,
            dtype="bfloat16" if args.dtype == "bf16" else "float32",
        )  # fmt: skip
        engine = Engine(
            ModelRunner(Path(tmp) / "ckpt", rc).forward,
            max_num_seqs=slots,
            max_model_len=context,
            max_step_tokens=rc.max_step_tokens,
            eos_ids=(),
            vocab_limit=cfg.vocab_size,
            decode=lambda ids: "",  # throughput of the model, not of the tokenizer
        )
        g = torch.Generator().manual_seed(0)
        rows = []
        for n in args.streams:
            prompts = torch.randint(0, cfg.vocab_size, (n, args.prompt), generator=g).tolist()
            ours = summary(lambda p=prompts: ours_once(engine, p, args.tokens), args.repeats)
            hf = summary(lambda p=prompts: transformers_once(theirs, p, args.tokens), args.repeats)
            rows.append((n, ours, hf))
    print(
        f"{cfg.name} {args.dtype}: prompt {args.prompt} + {args.tokens} new tokens per stream, "
        f"greedy, {args.threads} threads, medians of {args.repeats}"
    )
    print(f"{'streams':>7} {'ours tok/s':>11} {'hf tok/s':>9} {'ratio':>6} "
          f"{'ours TTFT p50/p90 ms':>21} {'hf TTFT p50/p90 ms':>19} {'vs 1 stream':>12}")  # fmt: skip
    base = rows[0][1][2]
    for n, (o_ttft, o_p90, o_tps), (h_ttft, h_p90, h_tps) in rows:
        ours_ttft, hf_ttft = (
            f"{o_ttft * 1e3:.0f}/{o_p90 * 1e3:.0f}",
            f"{h_ttft * 1e3:.0f}/{h_p90 * 1e3:.0f}",
        )
        print(
            f"{n:>7} {o_tps:>11.0f} {h_tps:>9.0f} {o_tps / h_tps:>5.2f}x "
            f"{ours_ttft:>21} {hf_ttft:>19} {o_tps / base:>11.2f}x"
        )


if __name__ == "__main__":
    main()
