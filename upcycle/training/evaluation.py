"""Perplexity of a checkpoint on held-out token shards, tracked in MLflow.

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
