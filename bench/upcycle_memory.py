"""Peak memory of upcycling a random qwen2-0.5b-sized dense model -> 64 experts: streamed
into a transformers folder in one process, and into our format on 1, 2 and 4 ranks.

    .venv/bin/python bench/upcycle_memory.py [--shard-gib 0.5] [--runs "1:;4:ep=4,etp=1"] [--keep DIR]

Writes a random dense transformers folder (bf16, one tensor at a time), then runs
`upcycle convert --hf` (method qwen2) in a child process and reads the child's peak RSS. A second
child that only imports the converter gives the baseline (torch + megatron-core). The figure of
merit: (peak - baseline) / (largest output shard + one MoE layer in fp32, the working precision);
target <= 1.5.

Then the distributed conversion (`upcycle convert --workers N --layout ...`, our format, fp32)
on a fresh group of N Ray actors per run (1 rank; 2 at EP2; 4 at EP4 and at TP2 x PP2 x EP2):
per rank, its peak RSS above its RSS when the job started (after imports) beside the dry run's
figure for it, the bytes it read; the job's wall time. Targets: per-rank peak at 4 ranks
<= 0.35x the 1-rank peak; wall time at 4 ranks <= 1.3x 1 rank (on 2 cores the ranks share
them: the point is memory per process).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from upcycle.config import from_name
from upcycle.dense.hf_io import write_hf_dir
from upcycle.dense.hf_weights import hf_shapes

DENSE = from_name("qwen2-0.5b")  # hidden 896, 24 layers, FFN 4864
MOE = DENSE.replace(
    name="qwen2-0.5b-64e", ffn_hidden_size=0, num_experts=64, moe_top_k=8,
    moe_ffn_hidden_size=DENSE.ffn_hidden_size // 8, shared_expert_ffn_hidden_size=DENSE.ffn_hidden_size,
)  # fmt: skip
# For the runs on ranks: experts half as wide, so that all ranks of a run fit this machine
# (23 GiB) at once: megatron-core's save copies every view on CPU, and a SwiGLU fc1 is saved as
# two views, so a rank peaks at ~1.7x its fp32 chunk (the full-width MoE is 11 GiB in fp32).
MOE_RANKS = MOE.replace(name="qwen2-0.5b-64e-304", moe_ffn_hidden_size=DENSE.ffn_hidden_size // 16)

CONVERT = """
import sys, torch
from upcycle.jobs.convert import convert
from upcycle.moe.upcycling import UpcycleSettings
{body}
"""


def child_peak_rss(code: str) -> int:
    """Peak RSS in bytes of a child Python process running `code`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run([sys.executable, "-c", code], check=True, stderr=subprocess.DEVNULL)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        raise RuntimeError("the child did not exceed an earlier child's peak; run it first")
    return peak * 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shard-gib", type=float, default=0.5)
    parser.add_argument("--keep", type=Path, default=None, help="work here instead of a temp dir")
    parser.add_argument(
        "--runs", default="1:;2:ep=2,etp=1;4:ep=4,etp=1;4:tp=2,pp=2,ep=2,etp=1",
        help="distributed runs, RANKS:LAYOUT separated by ';' (the first is the reference)",
    )  # fmt: skip
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="upcycle-memory-"))
    dense_dir, moe_dir, moe_json = work / "dense", work / "moe", work / "moe.json"
    MOE.save(moe_json)
    g = torch.Generator().manual_seed(0)
    shapes = hf_shapes(DENSE)
    write_hf_dir(DENSE, ((n, torch.randn(s, generator=g) * 0.02) for n, s in shapes.items()),
                 dense_dir, dtype=torch.bfloat16)  # fmt: skip
    shard_bytes = int(args.shard_gib * 2**30)
    # The bigger child first: RUSAGE_CHILDREN keeps the maximum over all children.
    began = time.perf_counter()
    peak = child_peak_rss(CONVERT.format(body=(
        f"convert({str(dense_dir)!r}, {str(moe_json)!r}, {str(moe_dir)!r}, UpcycleSettings('qwen2'),"
        f" hf_dtype=torch.bfloat16, max_shard_bytes={shard_bytes})"
    )))  # fmt: skip
    seconds = time.perf_counter() - began
    baseline = subprocess.run(
        [sys.executable, "-c", CONVERT.format(body="import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    base = int(baseline.stdout.split()[-1]) * 1024
    largest = max(p.stat().st_size for p in moe_dir.glob("*.safetensors"))
    total = sum(p.stat().st_size for p in moe_dir.glob("*.safetensors"))
    moe_shapes = hf_shapes(MOE)
    layer = (
        sum(torch.Size(s).numel() for n, s in moe_shapes.items() if n.startswith("model.layers.0."))
        * 4
    )
    gib = 2**30
    print(
        f"{DENSE.name} (random, bf16) -> {MOE.name}: 64 experts of {MOE.moe_ffn_hidden_size}, method qwen2, {seconds:.0f} s"
    )
    print(
        f"  output: {total / gib:.2f} GiB in {len(list(moe_dir.glob('*.safetensors')))} shards, largest {largest / gib:.2f} GiB"
    )
    print(f"  one MoE layer in fp32: {layer / gib:.2f} GiB")
    print(f"  peak RSS {peak / gib:.2f} GiB, baseline (imports) {base / gib:.2f} GiB")
    ratio = (peak - base) / (largest + layer)
    print(f"  (peak - baseline) / (largest shard + one layer) = {ratio:.2f}   (target <= 1.5)")
    runs = [(int(n), layout) for n, _, layout in (r.partition(":") for r in args.runs.split(";"))]
    on_ranks(dense_dir, work, runs)


def on_ranks(dense_dir: Path, work: Path, runs: list[tuple[int, str]]) -> None:
    """Our format on ranks, one (ranks, layout) run at a time, each on a fresh group of actors
    (peak RSS is per process lifetime); the dry run's figure for the same layout beside it."""
    import ray

    from upcycle.conversion.budget import upcycle_budget
    from upcycle.conversion.group import RankGroup
    from upcycle.conversion.shards import check_layout, parse_layout
    from upcycle.jobs.convert import on_ranks as convert_on_ranks
    from upcycle.moe.upcycling import UpcycleSettings
    from upcycle.platform.cluster import ensure_ray

    ensure_ray(num_cpus=max(n for n, _ in runs))
    moe_json = work / "moe-ranks.json"
    MOE_RANKS.save(moe_json)
    gib, rows = 2**30, []
    for i, (n, text) in enumerate(runs):
        layout = check_layout(MOE_RANKS, parse_layout(text), n)
        with RankGroup(n) as group:
            pids = ray.get([a.pid.remote() for a in group.actors])  # started before the clock
            began = time.perf_counter()
            _, reports = convert_on_ranks(str(dense_dir), str(moe_json), work / f"ours-{i}",
                                          UpcycleSettings("qwen2"), layout, n, group=group)  # fmt: skip
            rows.append((n, layout, time.perf_counter() - began, reports))
        while any(Path(f"/proc/{pid}").exists() for pid in pids):  # memory back before the next
            time.sleep(0.2)
        shutil.rmtree(work / f"ours-{i}")
    print(f"our format (fp32) on ranks; {MOE_RANKS.name}: 64 experts of "
          f"{MOE_RANKS.moe_ffn_hidden_size} + shared {MOE_RANKS.shared_expert_ffn_hidden_size}")  # fmt: skip
    print("  ranks  layout         wall s  peak above start GiB (max of ranks)  dry run's holds GiB"
          "  read GiB (max)  vs 1 rank")  # fmt: skip
    one_peak = max(r.peak_rss_bytes - r.start_rss_bytes for r in rows[0][3])
    one_wall = rows[0][2]
    for n, layout, wall, reports in rows:
        peak = max(r.peak_rss_bytes - r.start_rss_bytes for r in reports)
        read = max(r.bytes_read for r in reports)
        holds = max(b.holds for b in upcycle_budget(DENSE, MOE_RANKS, layout))
        name = f"tp{layout.tp} pp{layout.pp} ep{layout.ep} etp{layout.expert_tp}"
        print(f"  {n:5d}  {name:14s} {wall:6.1f}  {peak / gib:6.2f}  {holds / gib:6.2f}  "
              f"{read / gib:6.2f}   peak {peak / one_peak:.2f}x (target <= 0.35 at 4), "
              f"wall {wall / one_wall:.2f}x (target <= 1.3)")  # fmt: skip


if __name__ == "__main__":
    main()
