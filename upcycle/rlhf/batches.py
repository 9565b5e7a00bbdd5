"""An iteration's rollouts as the trainer's micro-batches.

A group is one prompt's rollouts: {"index", "ids" (prompt tokens), "responses" (K token lists),
"scores" (K floats)}. Rows are the prompt followed by a response, right-padded to `seq_length`
with token 0 (padding is never attended to by real tokens under the causal mask, and never in
the loss); `loss_mask` marks the labels that are response tokens. Data-parallel rank d trains on
its contiguous share of the groups, `micro_batch_size` groups per micro-batch.
"""

from __future__ import annotations

from functools import partial

import torch

from upcycle.rlhf.objectives import RolloutBatch, best_and_worst, grpo_advantages
from upcycle.training.chat_data import response_rows

PAD = 0


def grpo_batch(groups: list[dict], seq_length: int) -> RolloutBatch:
    """Every response of every group, with its group-normalised advantage."""
    pairs = [(g["ids"], r) for g in groups for r in g["responses"]]
    advantages = grpo_advantages(torch.tensor([g["scores"] for g in groups])).flatten()
    return RolloutBatch(**response_rows(pairs, seq_length, PAD), advantages=advantages)


def _untied(group: dict) -> bool:
    return max(group["scores"]) != min(group["scores"])


def online_dpo_batch(groups: list[dict], seq_length: int, scale: float = 1.0) -> RolloutBatch:
    """Rows [best of each group..., worst of each group...]; a pair weighs `scale`, or 0 on a
    tie."""
    chosen, rejected, weights = [], [], []
    for g in groups:
        best, worst = best_and_worst(g["scores"])
        chosen.append((g["ids"], g["responses"][best]))
        rejected.append((g["ids"], g["responses"][worst]))
        weights.append(scale * _untied(g))
    return RolloutBatch(
        **response_rows(chosen + rejected, seq_length, PAD), weights=torch.tensor(weights)
    )


def micro_batches(
    groups: list[dict],
    objective: str,
    seq_length: int,
    *,
    dp_rank: int,
    dp_size: int,
    micro_batch_size: int,
) -> list[RolloutBatch]:
    """This data-parallel rank's micro-batches of an iteration's groups.

    Online DPO's pair weights are len(groups) / (untied pairs in the whole iteration): the
    schedule averages micro-batches and DDP averages ranks, so the step minimises (and logs) the
    mean over the iteration's untied pairs, wherever they fell."""
    share = len(groups) // dp_size
    mine = groups[dp_rank * share : (dp_rank + 1) * share]
    if objective == "grpo":
        build = grpo_batch
    else:
        untied = sum(map(_untied, groups))
        build = partial(online_dpo_batch, scale=len(groups) / untied if untied else 0.0)
    return [
        build(mine[i : i + micro_batch_size], seq_length)
        for i in range(0, len(mine), micro_batch_size)
    ]
