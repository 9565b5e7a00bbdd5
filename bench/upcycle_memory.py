"""Peak memory of a streamed upcycling: a random qwen2-0.5b-sized dense model -> 64 experts.

    .venv/bin/python bench/upcycle_memory.py [--shard-gib 0.5] [--keep DIR]

Writes a random dense transformers folder (bf16, one tensor at a time), then runs
`upcycle convert --hf` (method qwen2) in a child process and reads the child's peak RSS. A second
child that only imports the converter gives the baseline (torch + megatron-core). The figure of
merit: (peak - baseline) / (largest output shard + one MoE layer in fp32, the working precision);
target <= 1.5.
"""

from __future__ import annotations

import argparse
import resource
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


if __name__ == "__main__":
    main()
