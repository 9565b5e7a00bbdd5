"""What the paged KV cache and prefix caching buy: concurrency at one KV budget, the samples of
one prompt, and a chat's later turns, on one engine in this process.

    .venv/bin/python bench/serve_paging.py [--preset moe-bench] [--threads 2] [--dtype bf16|fp32]
        [--max-model-len 4096] [--budget-seqs 4] [--requests 32] [--repeats 3]
        [--compile on|auto|off] [--sections 1 2 3]

1. Mixed lengths at one KV budget: `--requests` requests at once, prompts of 32-1024 random
   tokens, 16-256 new tokens each (seeded), through a KV pool of `--budget-seqs` x
   `--max-model-len` tokens. The slot cache this engine had before reserved max_model_len tokens
   per sequence, so that budget held `--budget-seqs` sequences: its peer here is the same engine
   with max_num_seqs = `--budget-seqs` (admission by slots, exactly what the slot cache did).
   Paged, max_num_seqs is 64 and admission is by free blocks, with `engine.reserve_tokens` 256
   (the default) and 0 (admission on the prompt alone, as vLLM). Printed: mean and peak
   sequences per forward, preemptions per run, generated tokens/s (median of `--repeats`).
2. Eight samples of a 512-token prompt (32 new tokens each, temperature 1): sent at once, the
   prompt tokens computed over one sample's 512, with prefix caching off and on; then the first
   sample alone on a cold cache and samples 2-8 after it: their TTFT over the first's.
3. A three-turn chat (a 200-token first turn, 100-token user turns, 64-token answers): the third
   turn's TTFT with the conversation's blocks cached over the same prompt on a cold cache.

Ours only: what is measured is the engine against itself with the feature off (the peers'
figures are in bench/serve_throughput.py). TTFTs are medians of `--repeats`; each section runs
once first to compile its batch sizes.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from upcycle.runtime import ENGINE_THREAD_ENV

if any(os.environ.get(k) != v for k, v in ENGINE_THREAD_ENV.items()):  # as serve_throughput.py
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ENGINE_THREAD_ENV})

warnings.filterwarnings("ignore")

from forward_throughput import MOE_BENCH  # noqa: E402

from upcycle.config import from_name  # noqa: E402
from upcycle.deploy.engine.batching import Engine  # noqa: E402
from upcycle.deploy.engine.runner import ModelRunner, RunnerConfig  # noqa: E402
from upcycle.deploy.engine.sampling import SamplingParams  # noqa: E402
from upcycle.moe.model import build_model  # noqa: E402
from upcycle.platform.checkpoint import save_checkpoint  # noqa: E402
from upcycle.platform.distributed import single_process  # noqa: E402

MAX_SEQS, BLOCK = 64, 16


def drive(engine: Engine, requests: list[tuple[list[int], SamplingParams]]) -> dict:
    """Send `requests` at once and run to the end: seconds, generated tokens, TTFT per request
    (in order), sequences in each forward."""
    start = time.perf_counter()
    ids = [engine.add(p, s) for p, s in requests]
    first: dict[str, float] = {}
    produced, batch = 0, engine.forward.sizes
    batch.clear()
    while engine.has_work:
        for out in engine.step():
            first.setdefault(out.request_id, time.perf_counter() - start)
            produced += 1
    return {"seconds": time.perf_counter() - start, "tokens": produced,
            "ttft": [first[i] for i in ids], "batch": list(batch)}  # fmt: skip


class Counted:
    """A runner's forward that notes how many sequences each step holds."""

    def __init__(self, runner: ModelRunner):
        self.runner, self.sizes = runner, []

    def __call__(self, plan):
        self.sizes.append(len(plan.tables))
        return self.runner.forward(plan)


def engine_over(runner: ModelRunner, vocab: int, *, seqs=MAX_SEQS, blocks=None, prefix=True,
                reserve=256) -> Engine:  # fmt: skip
    """An engine over `runner`'s first `blocks` KV blocks (default: all of them)."""
    return Engine(Counted(runner), max_num_seqs=seqs, max_model_len=runner.rc.max_model_len,
                  max_step_tokens=512, eos_ids=(), vocab_limit=vocab, decode=lambda ids: "",
                  block_size=BLOCK, num_blocks=blocks or runner.num_blocks, prefix_caching=prefix,
                  reserve_tokens=reserve)  # fmt: skip


def tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


def mixed_lengths(runner, vocab, args) -> None:
    rng = random.Random(0)
    work = [(tokens(rng, rng.randint(32, 1024), vocab),
             SamplingParams(max_tokens=rng.randint(16, 256), temperature=0.0, ignore_eos=True))
            for _ in range(args.requests)]  # fmt: skip
    blocks = args.budget_seqs * args.max_model_len // BLOCK
    print(
        f"1. {args.requests} requests, prompts 32-1024, 16-256 new tokens, KV budget "
        f"{args.budget_seqs} x {args.max_model_len} tokens ({blocks} blocks of {BLOCK})"
    )
    print(f"{'sequences per forward:':>34} {'mean':>5} {'peak':>5} {'preempt':>7} {'tokens/s':>9}")
    rows = {}
    for name, seqs, reserve in ((f"slots (max_num_seqs {args.budget_seqs})", args.budget_seqs, 0),
                                ("paged (64 seqs, reserve 256)", MAX_SEQS, 256),
                                ("paged (64 seqs, reserve 0)", MAX_SEQS, 0)):  # fmt: skip
        engine = engine_over(runner, vocab, seqs=seqs, blocks=blocks, prefix=False,
                             reserve=reserve)  # fmt: skip
        drive(engine, work)  # compiles its batch sizes
        runs = [drive(engine, work) for _ in range(args.repeats)]
        batch = [b for run in runs for b in run["batch"]]
        tps = statistics.median(r["tokens"] / r["seconds"] for r in runs)
        rows[name] = (statistics.mean(batch), tps)
        preempted = engine.scheduler.preemptions / (args.repeats + 1)
        print(f"{name:>34} {statistics.mean(batch):>5.1f} {max(batch):>5} {preempted:>7.0f} "
              f"{tps:>9.0f}")  # fmt: skip
    (slot_seqs, slot_tps), (paged_seqs, paged_tps), _ = rows.values()
    print(f"   paged (reserve 256) / slots: {paged_seqs / slot_seqs:.1f}x the sequences, "
          f"{paged_tps / slot_tps:.2f}x tokens/s")  # fmt: skip


def samples_of_one_prompt(runner, vocab, args) -> None:
    rng = random.Random(1)
    print("2. 8 samples of a 512-token prompt, 32 new tokens each, temperature 1")
    for prefix in (False, True):
        engine = engine_over(runner, vocab, prefix=prefix)
        computed, ttft = [], []
        for repeat in range(args.repeats + 1):
            prompt = tokens(rng, 512, vocab)
            work = [(prompt, SamplingParams(max_tokens=32, seed=k)) for k in range(8)]
            before = engine.scheduler.prefill_tokens
            run = drive(engine, work)
            if repeat:  # the first compiles
                computed.append((engine.scheduler.prefill_tokens - before) / 512)
                ttft.append(statistics.median(run["ttft"]))
        print(f"   at once, prefix caching {'on ' if prefix else 'off'}: prompt tokens computed "
              f"{statistics.median(computed):.2f}x one sample's, median TTFT "
              f"{statistics.median(ttft) * 1e3:.0f} ms")  # fmt: skip
    first, rest = [], []
    for _ in range(args.repeats + 1):
        prompt = tokens(rng, 512, vocab)
        engine.scheduler.pool.forget()  # cold
        first.append(drive(engine, [(prompt, SamplingParams(max_tokens=32, seed=0))])["ttft"][0])
        run = drive(engine, [(prompt, SamplingParams(max_tokens=32, seed=k)) for k in range(1, 8)])
        rest.append(statistics.median(run["ttft"]))
    first, rest = statistics.median(first[1:]), statistics.median(rest[1:])
    print(f"   one after the other: the first's TTFT {first * 1e3:.0f} ms (cold), samples 2-8 "
          f"{rest * 1e3:.0f} ms: {rest / first:.0%} of the first's")  # fmt: skip


def chat_turns(runner, vocab, args) -> None:
    rng = random.Random(2)
    engine = engine_over(runner, vocab)
    answer = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    warm, cold = [], []
    for _ in range(args.repeats + 1):
        history = tokens(rng, 200, vocab)
        for _turn in range(2):
            out = []
            engine.add(history, answer, request_id="turn")
            while engine.has_work:
                out += [t for o in engine.step() for t in o.token_ids]
            history = history + out + tokens(rng, 100, vocab)
        warm.append(drive(engine, [(history, answer)])["ttft"][0])
        engine.scheduler.pool.forget()
        cold.append(drive(engine, [(history, answer)])["ttft"][0])
    warm, cold = statistics.median(warm[1:]), statistics.median(cold[1:])
    print(f"3. a chat's third turn ({len(history)} prompt tokens): TTFT {warm * 1e3:.0f} ms with "
          f"its history cached, {cold * 1e3:.0f} ms cold: {warm / cold:.0%}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="moe-bench")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--budget-seqs", type=int, default=4)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", default="on", choices=["on", "auto", "off"])
    parser.add_argument("--sections", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = MOE_BENCH if args.preset == "moe-bench" else from_name(args.preset)
    rc = RunnerConfig(max_num_seqs=MAX_SEQS, max_model_len=args.max_model_len,
                      max_step_tokens=512, block_size=BLOCK, compile=args.compile,
                      dtype="bfloat16" if args.dtype == "bf16" else "float32")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        with single_process():
            save_checkpoint(build_model(cfg).eval(), cfg, Path(tmp) / "ckpt")
        runner = ModelRunner(Path(tmp) / "ckpt", rc)
    print(f"{cfg.name} {args.dtype}, {args.threads} threads, engine.compile {args.compile}")
    sections = {1: mixed_lengths, 2: samples_of_one_prompt, 3: chat_turns}
    for n in args.sections:
        sections[n](runner, cfg.vocab_size, args)


if __name__ == "__main__":
    main()
