"""Token shards: the on-disk form of a prepared corpus, and the batches training reads from them.

A prepared dataset is a folder written atomically (`upcycle.atomic`):
    dataset.json        tokenizer, end-of-text id, token count per shard, sources
    shard-00000.arrow   Arrow IPC file, one uint32 column `tokens` (documents end in <|endoftext|>)
    manifest.json       size and SHA-256 of every file

Arrow IPC (uncompressed) rather than Parquet so that training memory-maps the shards and reads
token windows without decoding or copying. The token stream is cut into samples of
`seq_length + 1` tokens (inputs and next-token labels) that overlap by one token (`TokenWindows`;
post-training jobs bring their own `Samples`, upcycle.training.chat_data), samples are
shuffled once per epoch with the job's seed, and global step `s` takes samples
`[s * global_batch, (s + 1) * global_batch)` of that order; data-parallel rank `r` of `d` takes
the r-th contiguous block of them. The batches of a step depend only on (seed, step, rank), so a
resumed run reads exactly what an uninterrupted one would, and any data-parallel split of the
same global batch covers the same samples.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import torch

from upcycle.atomic import MANIFEST, verify_manifest

DATASET_JSON = "dataset.json"
TOKEN_COLUMN = "tokens"
SCHEMA = pa.schema([(TOKEN_COLUMN, pa.uint32())])


class DataError(ValueError):
    """A prepared dataset is missing, corrupt or too small for the job."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


@dataclass(frozen=True)
class Batch:
    """One micro-batch of rows, all [rows, seq_length].

    `labels` are the next tokens. Post-training rows add `loss_mask` (which labels count: the
    assistant's tokens) and, when several examples are packed into one row, `segments` (the
    example each token belongs to: attention stays inside it and positions restart at 0).
    Preference pairs add `lengths`: each row's real tokens (the rest is padding)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor | None = None
    segments: torch.Tensor | None = None
    lengths: torch.Tensor | None = None

    @property
    def positions(self) -> torch.Tensor:
        b, s = self.tokens.shape
        if self.segments is None:
            return torch.arange(s).unsqueeze(0).expand(b, s)
        starts = torch.ones_like(self.segments, dtype=torch.bool)
        starts[:, 1:] = self.segments[:, 1:] != self.segments[:, :-1]
        index = torch.arange(s).expand(b, s)
        first = torch.cummax(torch.where(starts, index, 0), dim=1).values
        return index - first

    @property
    def attention_mask(self) -> torch.Tensor | None:
        """megatron-core's mask, [rows, 1, s, s], True where attention is blocked (None: causal)."""
        if self.segments is None:
            return None
        s = self.tokens.shape[1]
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        same = self.segments[:, :, None] == self.segments[:, None, :]
        return ~(same & causal).unsqueeze(1)


class Samples(Protocol):
    """What a training job reads: numbered samples, any subset of them as one `Batch`."""

    def __len__(self) -> int: ...

    def batch(self, indices: list[int]) -> Batch: ...

    def too_few(self, needed: int) -> str:
        """Why `needed` samples (one global batch) cannot be had, and the fix."""
        ...


class TokenDataset:
    """The memory-mapped token stream of a prepared dataset folder."""

    def __init__(self, path: Path, *, verify: bool = True):
        self.path = Path(path)
        meta_path = self.path / DATASET_JSON
        if not meta_path.is_file():
            raise DataError(
                f"{self.path}: no {DATASET_JSON}; prepare it first with `upcycle data prepare`"
            )
        if verify:
            verify_manifest(self.path)
        self.meta = json.loads(meta_path.read_text())
        arrays = []
        for shard in self.meta["shards"]:
            source = pa.memory_map(str(self.path / shard["file"]), "r")
            table = pa.ipc.open_file(source).read_all()
            arrays.extend(c.to_numpy(zero_copy_only=True) for c in table[TOKEN_COLUMN].chunks)
        self.tokens: np.ndarray = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)

    @property
    def manifest_sha256(self) -> str:
        """Identifies the exact data a run read (its manifest lists every shard's hash)."""
        return hashlib.sha256((self.path / MANIFEST).read_bytes()).hexdigest()

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def num_samples(self, seq_length: int) -> int:
        return max(0, (self.num_tokens - 1) // seq_length)

    def sample(self, index: int, seq_length: int) -> np.ndarray:
        start = index * seq_length
        return self.tokens[start : start + seq_length + 1]


class TokenWindows:
    """Pretraining samples: the token stream cut into windows of `seq_length + 1` tokens."""

    def __init__(self, dataset: TokenDataset, seq_length: int):
        self.dataset, self.seq_length = dataset, seq_length

    def __len__(self) -> int:
        return self.dataset.num_samples(self.seq_length)

    def batch(self, indices: list[int]) -> Batch:
        rows = [self.dataset.sample(i, self.seq_length).astype(np.int64) for i in indices]
        window = torch.from_numpy(np.stack(rows))
        return Batch(tokens=window[:, :-1].contiguous(), labels=window[:, 1:].contiguous())

    def too_few(self, needed: int) -> str:
        d = self.dataset
        return (
            f"{d.path}: {d.num_tokens:,} tokens make {len(self)} samples of seq_length "
            f"{self.seq_length}, fewer than one global batch ({needed}); prepare more text or "
            "lower train.seq_length / layout.global_batch_size"
        )


class StepBatches:
    """The micro-batches each data-parallel rank reads at each step (see the module docstring)."""

    def __init__(
        self,
        samples: Samples,
        *,
        micro_batch_size: int,
        global_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
    ):
        self.source = samples
        self.mbs = micro_batch_size
        self.gbs = global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = seed
        self.samples = len(samples)
        if self.samples < global_batch_size:
            raise DataError(samples.too_few(global_batch_size))
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    @property
    def num_microbatches(self) -> int:
        return self.gbs // (self.mbs * self.dp_size)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order, self._order_epoch = rng.permutation(self.samples), epoch
        return self._order

    def _global_index(self, i: int) -> int:
        epoch, within = divmod(i, self.samples)
        return int(self._epoch_order(epoch)[within])

    def step(self, step: int) -> list[Batch]:
        """This rank's micro-batches of global step `step` (0-based)."""
        per_rank = self.gbs // self.dp_size
        first = step * self.gbs + self.dp_rank * per_rank
        indices = [self._global_index(first + j) for j in range(per_rank)]
        return [self.source.batch(indices[i : i + self.mbs]) for i in range(0, per_rank, self.mbs)]
