"""What `upcycle pipeline` runs: step counts, sizes and where it writes. Its own module because
both the pipeline (upcycle.jobs.pipeline) and its stages (upcycle.jobs.pipeline_stages) read it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PipelineConfig:
    out: Path = Path("runs/pipeline")
    workers: int = 2
    heldout_files: int = 8  # the last stdlib modules, never trained on
    seq_length: int = 128
    dense_steps: int = 100
    moe_steps: int = 40
    sft_steps: int = 30
    dpo_steps: int = 16
    dpo_pairs: int = 32  # 4 passes over them in 16 steps of 8 pairs: the margin visibly grows
    reward_steps: int = 8
    rlhf_iterations: int = 4
    lr: float = 3e-3
    post_lr: float = 1e-3  # SFT and DPO
    needle_lengths: tuple[int, ...] = (128, 256, 512)  # trained at seq_length: DCA beyond
    synth_prompts: int = 8  # arithmetic prompts for rejection sampling
    synth_samples: int = 4  # samples per prompt
    prompt: str = "Write a Python function that reverses a string."
    tracking_uri: str = ""
