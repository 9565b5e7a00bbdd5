"""Serving throughput and time to first token: upcycle's engine vs transformers, vLLM's CPU engine
and llama.cpp, on the same weights, prompts and thread count, in one run.

    .venv/bin/python bench/serve_throughput.py [--preset moe-bench|tiny-moe] [--streams 1 4 16]
        [--prompt 64] [--tokens 64] [--repeats 5] [--threads 2] [--dtype bf16|fp32]
        [--compile on|auto|off]

Ours and transformers run in this process. vLLM and llama.cpp run in subprocesses from their own
venvs (bench/peers/setup.sh puts them in .peers/; bench/peers/*_peer.py) on the transformers
folder of the same weights and the same prompt token ids; a peer not installed is left out.
Ours runs with the thread settings of an engine process (`upcycle.runtime.ENGINE_THREAD_ENV`:
this script restarts itself with them; the peers run with their own defaults) and with
`engine.compile` on by default: the steady state of a busy replica (with `auto`
a batch size compiles after 256 decode steps); each batch size's compile happens in the warm-up
run and its time is printed. For N streams, N
requests of `--prompt` random tokens each ask for `--tokens` tokens at once: ours goes through
the continuous-batching `Engine` over the megatron-core model (paged KV cache, one forward per
step), transformers through one `generate` call on the batch of N (its KV cache, greedy, no
early stop). Time to first token is, for ours, the median over requests of the time from
submission to the first token; for transformers the time of `generate(max_new_tokens=1)` on the
same batch (it cannot hand out tokens earlier). `--dtype` is both sides' weights and KV cache
(ours: `engine.dtype`; logits and sampling stay fp32). Printed: medians (TTFT also p90) over
`--repeats` runs, ratios ours/peer, and the decode bandwidth bound measured in the same run:
the machine's read bandwidth (a sum over 1 GiB, `--threads` threads) over the weight bytes one
decode step reads per token (every weight but the experts, the token's k experts per layer, one
embedding row; at N streams each layer's experts some token picked, in expectation).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from upcycle.runtime import ENGINE_THREAD_ENV

if any(os.environ.get(k) != v for k, v in ENGINE_THREAD_ENV.items()):
    # libgomp has loaded (with torch) without an engine's thread settings: start again with them,
    # as a serving replica starts (upcycle.runtime)
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ENGINE_THREAD_ENV})

warnings.filterwarnings("ignore")

from forward_throughput import MOE_BENCH  # noqa: E402

from upcycle.config import from_name  # noqa: E402
from upcycle.conversion.hf_interop import transformers_twin  # noqa: E402
from upcycle.deploy.engine.batching import Engine  # noqa: E402
from upcycle.deploy.engine.runner import ModelRunner, RunnerConfig  # noqa: E402
from upcycle.deploy.engine.sampling import SamplingParams  # noqa: E402
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


def summary(fn, repeats: int) -> tuple[float, float, float, float]:
    """(TTFT p50, TTFT p90, tokens/s p50, warm-up seconds) over `repeats` runs after a warm-up
    run."""
    start = time.perf_counter()
    fn()
    warm_up = time.perf_counter() - start
    return (*_medians([fn() for _ in range(repeats)]), warm_up)


def _medians(runs: list[tuple[float, float]]) -> tuple[float, float, float]:
    ttft = sorted(r[0] for r in runs)
    p90 = ttft[min(len(ttft) - 1, round(0.9 * (len(ttft) - 1)))]
    return statistics.median(ttft), p90, statistics.median(r[1] for r in runs)


PEERS = Path(__file__).resolve().parent.parent / ".peers"


def peer(name: str, hf_dir: Path, prompts: Path, args) -> dict[int, tuple] | None:
    """{streams: (TTFT p50, p90, tokens/s p50)} from bench/peers/{name}_peer.py in its venv, or
    None where bench/peers/setup.sh has not installed it."""
    python = PEERS / name / "bin" / "python"
    if not python.exists():
        print(f"({name}: not installed; bench/peers/setup.sh {name})")
        return None
    dtype = {"llamacpp": {"bf16": "bf16", "fp32": "f32"}}.get(name, {}).get(args.dtype, args.dtype)
    cmd = [str(python), str(Path(__file__).parent / "peers" / f"{name}_peer.py"), str(hf_dir),
           str(prompts), "--tokens", str(args.tokens), "--threads", str(args.threads),
           "--repeats", str(args.repeats), "--dtype", dtype]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ENGINE_THREAD_ENV}  # its own defaults
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode or "\nRESULT " not in "\n" + done.stdout:
        print(f"({name} failed: {done.stderr.strip().splitlines()[-1:]})")
        return None
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))["streams"]
    return {int(n): _medians(list(zip(r["ttft"], r["tps"], strict=True)))
            for n, r in result.items()}  # fmt: skip


def read_bandwidth() -> float:
    """Bytes/s a sum over 1 GiB reads (median of 5) with torch's threads."""
    x = torch.ones(2**28)
    times = []
    for _ in range(6):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return x.numel() * 4 / statistics.median(times[1:])


def decode_bytes(cfg, element: int, streams: int) -> float:
    """Weight bytes one decode step reads per token at `streams` streams (module doc)."""
    with single_process(), torch.device("meta"):
        model = build_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for n, p in model.named_parameters() if "local_experts" in n)
    table = cfg.vocab_size * cfg.hidden_size  # the embedding: one row per token
    if cfg.tie_embeddings:
        table = 0  # the output layer reads it whole
    share = 1.0
    if cfg.num_experts:  # the expected share of each layer's experts some stream picked
        share = 1 - (1 - cfg.moe_top_k / cfg.num_experts) ** streams
    per_step = (total - expert - table) + share * expert + streams * cfg.hidden_size
    return per_step * element / streams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="moe-bench")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--compile", default="on", choices=["on", "auto", "off"])
    args = parser.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    torch.set_num_threads(args.threads)
    cfg = MOE_BENCH if args.preset == "moe-bench" else from_name(args.preset)
    context = args.prompt + args.tokens
    g = torch.Generator().manual_seed(0)
    prompts = {n: torch.randint(0, cfg.vocab_size, (n, args.prompt), generator=g).tolist()
               for n in args.streams}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        with single_process():
            model = build_model(cfg).eval()
            save_checkpoint(model, cfg, Path(tmp) / "ckpt")
            theirs = transformers_twin(cfg, model, Path(tmp) / "hf").to(dtype)
            del model
        (Path(tmp) / "prompts.json").write_text(json.dumps(prompts))
        peers = {name: peer(name, Path(tmp) / "hf", Path(tmp) / "prompts.json", args)
                 for name in ("vllm", "llamacpp")}  # fmt: skip
        slots = max(args.streams)
        rc = RunnerConfig(
            max_num_seqs=slots, max_model_len=context, max_step_tokens=4096,
            dtype="bfloat16" if args.dtype == "bf16" else "float32", compile=args.compile,
        )  # fmt: skip
        engine = Engine(
            ModelRunner(Path(tmp) / "ckpt", rc).forward,
            max_num_seqs=slots,
            max_model_len=context,
            max_step_tokens=rc.max_step_tokens,
            eos_ids=(),
            vocab_limit=cfg.vocab_size,
            decode=lambda ids: "",  # throughput of the model, not of the tokenizer
            # every repeat sends the same prompts: each one's prefill is measured, not a cache
            prefix_caching=False,
        )
        rows = {}
        for n in args.streams:
            ours = summary(lambda p=prompts[n]: ours_once(engine, p, args.tokens), args.repeats)
            hf = summary(lambda p=prompts[n]: transformers_once(theirs, p, args.tokens),
                         args.repeats)  # fmt: skip
            rows[n] = {"ours": ours, "transformers": hf}
            rows[n].update({k: v[n] for k, v in peers.items() if v is not None})
    bandwidth = read_bandwidth()
    report(cfg, args, rows, bandwidth, dtype.itemsize)


def report(cfg, args, rows: dict, bandwidth: float, element: int) -> None:
    names = [k for k in ("ours", "transformers", "vllm", "llamacpp") if k in rows[args.streams[0]]]
    print(
        f"{cfg.name} {args.dtype}: prompt {args.prompt} + {args.tokens} new tokens per stream, "
        f"greedy, {args.threads} threads, medians of {args.repeats}; ours with engine.compile "
        f"{args.compile}; read bandwidth {bandwidth / 1e9:.1f} GB/s"
    )
    print("end-to-end tokens/s (ours / peer)")
    print(
        f"{'streams':>7} "
        + " ".join(f"{k:>16}" for k in names)
        + f" {'bound':>8} {'ours/bound':>10}"
    )
    for n, r in rows.items():
        ours = r["ours"][2]
        cells = [f"{ours:>16.0f}"] + [
            f"{r[k][2]:>8.0f} ({ours / r[k][2]:4.2f}x)" for k in names[1:]
        ]
        bound = bandwidth / decode_bytes(cfg, element, n)
        print(f"{n:>7} " + " ".join(cells) + f" {bound:>8.0f} {ours / bound:>9.0%}")
    print("time to first token p50/p90 ms (ours / peer at p50)")
    for n, r in rows.items():
        cells = [f"{r[k][0] * 1e3:.0f}/{r[k][1] * 1e3:.0f}" for k in names]
        ratios = [f"({r['ours'][0] / r[k][0]:4.2f}x)" for k in names[1:]]
        print(
            f"{n:>7} "
            + " ".join(f"{c:>16}" for c in cells[:1])
            + " ".join(f"{c + ' ' + q:>17}" for c, q in zip(cells[1:], ratios, strict=True))
        )
    warm = ", ".join(f"{n}: {r['ours'][3]:.0f} s" for n, r in rows.items())
    print(f"ours' warm-up run (compiling its batch sizes) per stream count: {warm}")


if __name__ == "__main__":
    main()
