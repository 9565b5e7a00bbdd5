"""Where an online RLHF iteration's time goes, and the in-memory weight sync vs a checkpoint.

    .venv/bin/python bench/rlhf_iteration.py [--preset tiny-moe] [--iterations 6]
        [--objective online_dpo|grpo] [--samples 4] [--max-tokens 16] [--compile on|auto|off]
        [--prefix-caching on|off]

1. `upcycle rlhf`'s loop (upcycle.rlhf.loop) in this process as one trainer rank, with one
   rollout engine actor (tp 1) and the exact verifier, on the arithmetic prompts
   (examples/arithmetic-prompts.jsonl) from a fresh model of the preset: the median over
   iterations (the first, which pays oneDNN's kernel compilation and, with `--compile on`, the
   default, the engine's decode-step compile, left out) of rollout tokens/s,
   rollout, scoring, training and sync seconds, and each one's share of the iteration.
2. The peer of the weight sync: what a loop without it would do, writing the policy as our
   checkpoint and loading it into a fresh model (the engine's side). Median seconds and ratio.
3. The sync's bytes at Qwen2-57B-A14B scale (bf16, from the parameter counts on the meta device)
   and the seconds they take at the object store's bandwidth measured here and at InfiniBand's
   50 GB/s per GPU (the planner's figure, upcycle.platform.plan).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import ray  # noqa: E402
import torch  # noqa: E402

from upcycle.config import from_name  # noqa: E402
from upcycle.moe.model import build_model, build_on_meta  # noqa: E402
from upcycle.moe.params import count_parameters  # noqa: E402
from upcycle.platform.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from upcycle.platform.distributed import single_process  # noqa: E402
from upcycle.platform.tracking import spooled_metrics  # noqa: E402
from upcycle.rlhf.driver import run_local  # noqa: E402
from upcycle.rlhf.spec import RlhfJob, RolloutConfig  # noqa: E402
from upcycle.train_config import TrainConfig  # noqa: E402
from upcycle.training.loop import LocalSink  # noqa: E402

PROMPTS = Path(__file__).parents[1] / "examples" / "arithmetic-prompts.jsonl"
PARTS = ("rollout/seconds", "score/seconds", "train/step_time_s", "sync/seconds")
IB_BYTES_PER_S = 50e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny-moe")
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--objective", default="online_dpo", choices=("online_dpo", "grpo"))
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--compile", default="on", choices=("on", "auto", "off"))
    parser.add_argument("--prefix-caching", default="on", choices=("on", "off"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    cfg = from_name(args.preset)
    with tempfile.TemporaryDirectory() as tmp, single_process(seed=0):
        tmp = Path(tmp)
        policy = save_checkpoint(build_model(cfg).eval(), cfg, tmp / "policy")
        job = RlhfJob(
            policy=str(policy), prompts=str(PROMPTS), objective=args.objective, scorer="exact",
            iterations=args.iterations, prompts_per_iteration=8,
            rollout=RolloutConfig(samples=args.samples, max_tokens=args.max_tokens,
                                  compile=args.compile,
                                  prefix_caching=args.prefix_caching == "on"),
            train=TrainConfig(steps=args.iterations, lr=1e-4, min_lr=0.0, warmup_steps=0),
            tracking_dir=str(tmp / "run" / "tracking"), tracking_uri=f"sqlite:///{tmp}/mlflow.db",
        )  # fmt: skip
        run_local(job, LocalSink(tmp / "run"))
        per_iteration = list(spooled_metrics(tmp / "run" / "tracking").values())[1:]
        sync_bytes = per_iteration[0]["sync/bytes"]
        med = {k: statistics.median(m[k] for m in per_iteration)
               for k in (*PARTS, "iteration/seconds", "rollout/tokens_per_s")}  # fmt: skip
        print(f"{args.preset}, {args.objective}, 8 prompts x {args.samples} samples x <= "
              f"{args.max_tokens} tokens, 1 trainer rank, 1 engine (compile {args.compile}, "
              f"prefix caching {args.prefix_caching}); "
              "median of "
              f"{len(per_iteration)} iterations")  # fmt: skip
        print(f"  rollout {med['rollout/tokens_per_s']:,.0f} tokens/s")
        for k in PARTS:
            print(f"  {k:<20} {med[k]:7.3f} s  {med[k] / med['iteration/seconds']:5.1%}")
        print(
            f"  {'iteration':<20} {med['iteration/seconds']:7.3f} s (the rest: broadcast, "
            "probe, bookkeeping)"
        )

        sender, receiver = build_model(cfg).eval(), build_model(cfg).eval()

        def checkpoint_round_trip() -> None:
            out = tmp / "ckpt"
            save_checkpoint(sender, cfg, out)
            load_checkpoint(receiver, out)
            shutil.rmtree(out)

        times = []
        for _ in range(3):
            began = time.perf_counter()
            checkpoint_round_trip()
            times.append(time.perf_counter() - began)
        disk = statistics.median(times)
        big = from_name("qwen2-57b-a14b")
        total = count_parameters(build_on_meta(big), big).bf16_bytes
    sync = med["sync/seconds"]
    print(f"weight sync: in memory {sync:.3f} s ({sync_bytes / 1e6:,.1f} MB, "
          f"{sync_bytes / sync / 1e9:.2f} GB/s) vs checkpoint write + load {disk:.3f} s"
          f": in memory is {disk / sync:.1f}x faster")  # fmt: skip
    print(f"qwen2-57b-a14b: {total / 1e9:,.1f} GB of bf16 weights per sync per engine: "
          f"{total / (sync_bytes / sync):,.0f} s at this object store's rate, "
          f"{total / IB_BYTES_PER_S:,.1f} s at 50 GB/s (InfiniBand, one GPU's NIC)")  # fmt: skip


if __name__ == "__main__":
    main()
