"""Programs per second through the execution sandbox: bwrap (the boundary) vs the process sandbox
(no boundary), on HumanEval's 164 canonical solutions with their tests.

    .venv/bin/python bench/sandbox_throughput.py [--repeats 5] [--workers N]

Both run the same verifier (`verify_execution`) side by side on N threads (default: the CPUs
this process may use), one sandboxed run per program, in the same process, alternating kinds
each repeat. Prints each kind's median programs/s, the median seconds of one program alone
(sequential, for the per-program cost), and the bwrap / process ratios. Name the CPU with the
figures (`lscpu | grep "Model name"`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from upcycle.synthesis import humaneval
from upcycle.synthesis.sandbox import Sandbox
from upcycle.synthesis.verifiers import side_by_side, verify_execution


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.workers])
    tasks = humaneval.tasks()
    kinds = {"bwrap": Sandbox(kind="bwrap"), "process": Sandbox(kind="process")}
    kinds["bwrap"].require()
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    alone: dict[str, list[float]] = {k: [] for k in kinds}
    for repeat in range(args.repeats):
        for kind, box in kinds.items():
            start = time.perf_counter()
            verdicts = side_by_side(lambda t, box=box: verify_execution(t["canonical_solution"],
                                                                        t, box), tasks)  # fmt: skip
            seconds = time.perf_counter() - start
            if sum(v.accepted for v in verdicts) != len(tasks):
                raise SystemExit(f"{kind}: not every canonical solution passed")
            rates[kind].append(len(tasks) / seconds)
            for t in tasks[repeat :: args.repeats][:8]:
                start = time.perf_counter()
                verify_execution(t["canonical_solution"], t, box)
                alone[kind].append(time.perf_counter() - start)
    print(f"HumanEval canonical solutions: {len(tasks)} programs, {args.workers} worker(s), "
          f"{args.repeats} repeats (medians)")  # fmt: skip
    print(f"{'sandbox':<10}{'programs/s':>12}{'ms per program alone':>24}")
    for kind in kinds:
        print(f"{kind:<10}{statistics.median(rates[kind]):>12.1f}"
              f"{1000 * statistics.median(alone[kind]):>24.1f}")  # fmt: skip
    ratio = statistics.median(rates["bwrap"]) / statistics.median(rates["process"])
    cost = statistics.median(alone["bwrap"]) / statistics.median(alone["process"])
    print(f"bwrap / process: {ratio:.2f}x the programs/s, {cost:.2f}x the seconds per program")


if __name__ == "__main__":
    main()
