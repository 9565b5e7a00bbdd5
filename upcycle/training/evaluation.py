"""Perplexity of a checkpoint on held-out token shards, tracked in MLflow; and per-sequence
scores of a model (mean next-token loss, a reward model's last-token score) for the jobs that
score records one by one (`data filter`'s model rules, `reward score`).

The shards are cut into consecutive, non-overlapping windows of `seq_length + 1` tokens (the same
windows training reads, in file order, unshuffled); the loss is the mean next-token cross
entropy over every predicted token, perplexity its exponential. One process, fp32 on CPU and
bf16 on GPU; `upcycle eval` runs it as a Ray task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from upcycle import runtime
from upcycle.config import ConfigError
from upcycle.platform.checkpoint import load_checkpoint, read_model_config
from upcycle.training.data import TokenDataset

BATCH_ROWS = 8  # sequences per forward when scoring sequences


@dataclass(frozen=True)
class Perplexity:
    model: str
    checkpoint: str
    data: str
    loss: float
    perplexity: float
    tokens: int
    seq_length: int

    def metrics(self) -> dict[str, float]:
        return {"eval_loss": self.loss, "perplexity": self.perplexity, "eval_tokens": self.tokens}


def perplexity(
    ckpt: Path, data: Path, *, seq_length: int = 128, max_windows: int = 64, batch_size: int = 8
) -> Perplexity:
    """Mean next-token loss and perplexity of `ckpt` on the first `max_windows` windows of
    `data` (all of them if there are fewer)."""
    from upcycle.dense.megatron_config import to_transformer_config
    from upcycle.moe.model import build_model
    from upcycle.platform.distributed import single_process

    dataset = TokenDataset(Path(data))
    windows = min(dataset.num_samples(seq_length), max_windows)
    if windows < 1:
        raise ConfigError(
            "data", f"{data} has {dataset.num_tokens} tokens: fewer than one window of {seq_length}"
        )
    cfg = read_model_config(Path(ckpt))
    if seq_length > cfg.max_position_embeddings:
        raise ConfigError("seq_length", f"exceeds the model's {cfg.max_position_embeddings}")
    dtype = torch.bfloat16 if runtime.has_cuda() else torch.float32
    total, count = 0.0, 0
    with single_process(), torch.no_grad():
        model = build_model(cfg, to_transformer_config(cfg, params_dtype=dtype))
        model = model.to(runtime.device()).eval()
        load_checkpoint(model, Path(ckpt))
        for start in range(0, windows, batch_size):
            rows = [
                dataset.sample(i, seq_length)
                for i in range(start, min(windows, start + batch_size))
            ]
            tokens = torch.from_numpy(np.stack(rows).astype(np.int64)).to(runtime.device())
            inputs, labels = tokens[:, :-1], tokens[:, 1:]
            positions = torch.arange(seq_length, device=tokens.device).expand_as(inputs)
            logits = model(inputs, positions, None)
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"
            )
            total += loss.item()
            count += labels.numel()
    mean = total / count
    return Perplexity(cfg.name, str(ckpt), str(data), mean, math.exp(mean), count, seq_length)


def _padded_batches(seqs: list[list[int]], pad_id: int):
    """(row indices, tokens, positions, lengths) on the device: right-padded batches (causal
    attention: padding after a sequence does not change it) of similar lengths."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    device = runtime.device()
    for at in range(0, len(order), BATCH_ROWS):
        rows = order[at : at + BATCH_ROWS]
        longest = max(len(seqs[i]) for i in rows)
        tokens = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        for r, i in enumerate(rows):
            tokens[r, : len(seqs[i])] = torch.tensor(seqs[i])
        lengths = torch.tensor([len(seqs[i]) for i in rows])
        positions = torch.arange(longest).expand(len(rows), longest)
        yield rows, tokens.to(device), positions.to(device), lengths


def _per_sequence(model, seqs: list[list[int]], pad_id: int, value) -> list[float]:
    """`value(model output, tokens, lengths)` -> one float per row, over every sequence."""
    out = [0.0] * len(seqs)
    for rows, tokens, positions, lengths in _padded_batches(seqs, pad_id):
        with torch.no_grad():
            values = value(model(tokens, positions, None).float(), tokens, lengths).tolist()
        for i, v in zip(rows, values, strict=True):
            out[i] = v
    return out


def score_sequences(model, seqs: list[list[int]], pad_id: int) -> list[float]:
    """A reward model's score at each sequence's last token."""
    from upcycle.training.objectives import last_token_scores

    return _per_sequence(model, seqs, pad_id, lambda scores, _, n: last_token_scores(scores, n))


def mean_token_losses(model, seqs: list[list[int]], pad_id: int) -> list[float]:
    """A language model's mean next-token loss over each sequence (of >= 2 tokens)."""

    def loss(logits: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
        mask = torch.arange(tokens.shape[1] - 1) < (lengths[:, None] - 1)
        return (nll.cpu() * mask).sum(1) / mask.sum(1)

    return _per_sequence(model, seqs, pad_id, loss)
