"""What a conversion rank reads: slices of a transformers folder, or its shard of our dense
checkpoint.

`SafetensorsFolder` opens the files lazily and reads through safetensors' `get_slice`, so a rank
reads the rows or columns of its TP slice and only its experts' tensors (packed expert tensors
[E, ...] are sliced on the expert dimension too); it logs every read (name, slice, bytes), which
the tests and `bench/upcycle_memory.py` report. `read_shard` maps one planned piece of our
model (`upcycle.conversion.shards.Shard`) onto those reads.

A dense source for upcycling gives the pieces of attention, norms and embeddings the MoE keeps,
and each layer's whole FFN (the qwen2 method's permutations span all of it):
- `HFDense`: a transformers Qwen2 folder, through `SafetensorsFolder`;
- `CheckpointDense`: our dense checkpoint, loaded by megatron-core's sharded load into a dense
  chunk at the conversion's tp/pp (each rank reads its own shards), the FFN gathered within the
  TP group a layer at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from safetensors import safe_open

from upcycle.config import Layout, ModelConfig
from upcycle.conversion.shards import VOCAB_KEYS, Shard, check_chunk, join, plan, this_rank
from upcycle.dense import hf_io
from upcycle.dense.hf_weights import (
    HF_LAYER_NAMES,
    HF_TOP_NAMES,
    CheckpointError,
    fuse_qkv,
    to_megatron,
)


@dataclass
class Read:
    name: str
    index: tuple[tuple[int, int], ...]  # [start, stop) per leading dimension read
    nbytes: int


@dataclass
class SafetensorsFolder:
    """Lazy, sliced reads of a transformers folder (single file or sharded), each logged."""

    folder: Path
    log: list[Read] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        index = self.folder / hf_io.INDEX_FILE
        if index.is_file():
            self._where = json.loads(index.read_text())["weight_map"]
        elif (self.folder / hf_io.SINGLE_FILE).is_file():
            with safe_open(str(self.folder / hf_io.SINGLE_FILE), "pt") as f:
                self._where = dict.fromkeys(f.keys(), hf_io.SINGLE_FILE)
        else:
            hf_io.raise_no_safetensors(self.folder)  # and refuses pickle-based files by name
        self._open: dict[str, object] = {}

    def names(self) -> list[str]:
        return list(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def _slice(self, name: str):
        if name not in self._where:
            raise CheckpointError(f"{self.folder}: tensor {name} is missing")
        file = self._where[name]
        if file not in self._open:
            path = self.folder / file
            if not path.is_file():
                raise CheckpointError(f"{self.folder}: shard {file} named in the index is missing")
            self._open[file] = safe_open(str(path), "pt")
        return self._open[file].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, *index: tuple[int, int]) -> torch.Tensor:
        """Tensor `name` restricted to [start, stop) on its leading dimensions (fp32)."""
        sl = self._slice(name)
        t = sl[tuple(slice(a, b) for a, b in index)] if index else sl[:]
        self.log.append(Read(name, tuple(index), t.numel() * t.element_size()))
        return t.float()

    @property
    def bytes_read(self) -> int:
        return sum(r.nbytes for r in self.log)

    def meta_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor as a meta tensor of its shape (for checks before anything is read)."""
        return {n: torch.empty(self.shape(n), device="meta") for n in self.names()}


def check_folder(folder: SafetensorsFolder, cfg: ModelConfig) -> None:
    """Raise a `CheckpointError` listing what `folder` lacks (or has wrong) for `cfg`."""
    try:
        to_megatron(cfg, folder.meta_tensors())
    except CheckpointError as e:
        raise CheckpointError(f"{folder.folder}: {e}") from None


def read_shard(folder: SafetensorsFolder, cfg: ModelConfig, s: Shard) -> torch.Tensor:
    """Piece `s` of our model's tensor `s.key`, read from a transformers folder of `cfg`."""
    key, full = s.key, s.full_shape
    whole = [(0, n) for n in full]

    def span(dim: int) -> list[tuple[int, int]]:  # the leading dims up to `dim`, dim split
        return [*whole[:dim], s.bounds(full[dim]) if s.dim == dim else whole[dim]]

    if key in VOCAB_KEYS:
        name = "model.embed_tokens.weight"
        if key == "output_layer.weight":
            name = "score.weight" if cfg.is_reward_model else "lm_head.weight"
        return folder.read(name, *span(0))
    if key in HF_TOP_NAMES:
        return folder.read(HF_TOP_NAMES[key])
    layer, rest = key.removeprefix("decoder.layers.").split(".", 1)
    p = f"model.layers.{layer}."
    if rest == "self_attention.linear_proj.weight":  # row-parallel: columns split
        return folder.read(p + "self_attn.o_proj.weight", *span(1))
    if rest in HF_LAYER_NAMES:
        return folder.read(p + HF_LAYER_NAMES[rest])
    if rest.startswith("self_attention.linear_qkv."):
        kind = rest.rsplit(".", 1)[1]
        groups = cfg.num_kv_heads // s.parts
        g0 = s.index * groups
        q_rows = cfg.num_attention_heads // cfg.num_kv_heads * cfg.head_dim
        d = cfg.head_dim
        q = folder.read(f"{p}self_attn.q_proj.{kind}", (g0 * q_rows, (g0 + groups) * q_rows))
        k = folder.read(f"{p}self_attn.k_proj.{kind}", (g0 * d, (g0 + groups) * d))
        v = folder.read(f"{p}self_attn.v_proj.{kind}", (g0 * d, (g0 + groups) * d))
        return fuse_qkv(q, k, v, groups)
    return _read_fc(folder, s, p, rest)


def _read_fc(folder: SafetensorsFolder, s: Shard, p: str, rest: str) -> torch.Tensor:
    """A (dense, shared or routed expert) SwiGLU weight piece."""
    module, _, weight = rest.rpartition(".linear_")
    if module.startswith("mlp.experts.local_experts."):
        e = int(module.rsplit(".", 1)[1])
        if folder.has(p + "mlp.experts.gate_up_proj"):  # packed: [E, 2I, H] and [E, H, I]
            if weight == "fc2.weight":
                h, i = s.full_shape
                cols = s.bounds(i) if s.dim == 1 else (0, i)
                return folder.read(p + "mlp.experts.down_proj", (e, e + 1), (0, h), cols)[0]
            i = s.full_shape[0] // 2
            a, b = s.bounds(i) if s.dim == 0 else (0, i)
            both = [folder.read(p + "mlp.experts.gate_up_proj", (e, e + 1), (o + a, o + b))[0]
                    for o in (0, i)]  # fmt: skip
            return torch.cat(both)
        hf = f"{p}mlp.experts.{e}."
    else:
        hf = p + ("mlp.shared_expert." if module == "mlp.shared_experts" else "mlp.")
    if weight == "fc2.weight":
        h, i = s.full_shape
        return folder.read(hf + "down_proj.weight", (0, h), s.bounds(i) if s.dim == 1 else (0, i))
    i = s.full_shape[0] // 2
    rows = s.bounds(i) if s.dim == 0 else (0, i)
    return torch.cat([folder.read(hf + "gate_proj.weight", rows),
                      folder.read(hf + "up_proj.weight", rows)])  # fmt: skip


class HFDense:
    """A dense transformers folder as an upcycling source."""

    def __init__(self, folder: Path, cfg: ModelConfig):
        self.files, self.cfg = SafetensorsFolder(folder), cfg

    def piece(self, s: Shard) -> torch.Tensor:
        return read_shard(self.files, self.cfg, s)

    def ffn(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s whole dense FFN in megatron-core's layout: fc1 [gate; up], fc2."""
        p = f"model.layers.{layer}.mlp."
        fc1 = torch.cat([self.files.read(p + "gate_proj.weight"),
                         self.files.read(p + "up_proj.weight")])  # fmt: skip
        return fc1, self.files.read(p + "down_proj.weight")

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the embedding (or the LM head: `output_layer.weight`)."""
        lm_head = key == "output_layer.weight" and not self.cfg.tie_embeddings
        return self.files.read("lm_head.weight" if lm_head else "model.embed_tokens.weight",
                               (start, stop))  # fmt: skip

    @property
    def bytes_read(self) -> int:
        return self.files.bytes_read


class CheckpointDense:
    """Our dense checkpoint as an upcycling source: a dense chunk at this rank's tp/pp, loaded
    by megatron-core's sharded load (only this rank's shards are read)."""

    def __init__(self, path: Path, cfg: ModelConfig, layout: Layout):
        from upcycle.dense.megatron_config import to_transformer_config
        from upcycle.moe.model import build_model
        from upcycle.platform.checkpoint import load_checkpoint

        self.cfg, self.layout = cfg, layout
        dense_layout = Layout(tp=layout.tp, pp=layout.pp).resolve(layout.world_size)
        chunk = build_model(
            cfg,
            to_transformer_config(cfg, dense_layout, perform_initialization=False),
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
        )
        load_checkpoint(chunk, path)
        self._shards = {s.key: s for s in plan(cfg, dense_layout, this_rank(layout))}
        self._tensors = check_chunk(chunk, list(self._shards.values()))
        self.bytes_read = sum(t.numel() * t.element_size() for t in self._tensors.values())

    def piece(self, s: Shard) -> torch.Tensor:
        mine = self._shards[s.key]
        if (mine.dim, mine.parts, mine.index) != (s.dim, s.parts, s.index):
            raise RuntimeError(f"{s.key}: the dense chunk holds another piece than asked")
        return self._tensors[mine.local].detach()

    def _full(self, key: str) -> torch.Tensor:
        mine = self._shards[key]
        t = self._tensors[mine.local].detach()
        if mine.parts == 1:
            return t
        pieces = [torch.empty_like(t) for _ in range(mine.parts)]
        dist.all_gather(
            pieces, t.contiguous(), group=parallel_state.get_tensor_model_parallel_group()
        )
        return join(pieces, mine)

    def ffn(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        p = f"decoder.layers.{layer}.mlp."
        return self._full(p + "linear_fc1.weight"), self._full(p + "linear_fc2.weight")

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        tied = self.cfg.tie_embeddings or key not in self._shards
        return self._full("embedding.word_embeddings.weight" if tied else key)[start:stop]
