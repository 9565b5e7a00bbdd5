"""What each rank of a distributed conversion does, inside its process group and megatron-core
parallel state (set up by `upcycle.conversion.group`).

- `upcycle_rank`: build this rank's chunk of the MoE (its stage, TP slice, experts), fill it from
  the dense source (attention, norms and embeddings as pieces; each layer's FFN whole, upcycled
  into this rank's experts only, by the same `upcycle_mlp` the one-process conversion uses),
  then write it: one megatron-core dist checkpoint, every rank its shards.
- `import_rank`: the same from a transformers folder, every piece a sliced read.
- `export_rank`: load this rank's shards of our checkpoint, gather each TP-split tensor within
  its TP (experts: expert-TP) group, and have the group's first rank write it under
  transformers' names into safetensors files of this rank's own.
Every rank returns a `RankReport`: bytes read, held and written, the files it wrote (with
their hashes, for the manifest), its peak memory and its reads of expert tensors.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from megatron.core import dist_checkpointing, parallel_state

from upcycle.atomic import describe
from upcycle.config import Layout, ModelConfig
from upcycle.conversion.reading import CheckpointDense, HFDense, SafetensorsFolder, read_shard
from upcycle.conversion.shards import (
    VOCAB_KEYS,
    Coords,
    check_chunk,
    gather,
    plan,
    take,
    this_rank,
    writes,
)
from upcycle.dense import hf_io
from upcycle.dense.hf_weights import hf_of
from upcycle.moe.upcycling import UpcycleSettings, resized_rows, upcycle_mlp
from upcycle.platform.checkpoint import WEIGHTS, load_checkpoint


@dataclass
class RankReport:
    rank: int
    coords: Coords
    bytes_read: int = 0
    bytes_held: int = 0  # this rank's model chunk
    bytes_written: int = 0
    files: dict = field(default_factory=dict)  # manifest entries of the files it wrote
    parts: list = field(default_factory=list)  # export: the safetensors parts it wrote
    expert_reads: list = field(default_factory=list)  # (tensor name, slice) of expert weights
    peak_rss_bytes: int = 0  # the process's peak resident memory
    start_rss_bytes: int = 0  # its resident memory when the job started
    seconds: float = 0.0


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _report(layout: Layout) -> RankReport:
    c = this_rank(layout)
    return RankReport(rank=c.rank, coords=c, start_rss_bytes=_rss())


def _finish(report: RankReport, started: float) -> RankReport:
    report.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report.seconds = time.perf_counter() - started
    return report


def _chunk(cfg: ModelConfig, layout: Layout) -> torch.nn.Module:
    from upcycle.dense.megatron_config import to_transformer_config
    from upcycle.moe.model import build_model

    return build_model(
        cfg,
        to_transformer_config(cfg, layout, perform_initialization=False),
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )


def _save(chunk: torch.nn.Module, staging: Path, report: RankReport) -> None:
    """Every rank writes its shards of one dist checkpoint; it describes the files it wrote."""
    dist_checkpointing.save(chunk.sharded_state_dict(), str(staging / WEIGHTS))
    mine = sorted((staging / WEIGHTS).glob(f"__{report.rank}_*.distcp"))
    report.files = describe(staging, mine)
    report.bytes_written = sum(f["bytes"] for f in report.files.values())


@torch.no_grad()
def upcycle_rank(
    src: str,
    dense: ModelConfig,
    moe: ModelConfig,
    layout: Layout,
    settings: UpcycleSettings,
    staging: str,
) -> RankReport:
    started, report = time.perf_counter(), _report(layout)
    c = report.coords
    source = (
        CheckpointDense(Path(src), dense, layout)
        if (Path(src) / "model.json").is_file()
        else HFDense(Path(src), dense)
    )
    chunk = _chunk(moe, layout)
    shards = plan(moe, layout, c)
    tensors = check_chunk(chunk, shards)
    per_rank = moe.num_experts // layout.ep
    experts = range(c.ep_rank * per_rank, (c.ep_rank + 1) * per_rank)
    layer, mlp = None, {}
    for s in shards:
        if ".mlp." in s.key:
            if s.layer != layer:  # a layer's FFN once, in layer order on every rank
                mlp = upcycle_mlp(*source.ffn(s.layer), dense, moe, settings, s.layer, experts)
                layer = s.layer
            value = take(mlp[s.key.split(".mlp.", 1)[1]], s)
        elif s.key in VOCAB_KEYS and dense.vocab_size != moe.vocab_size:
            a, b = s.bounds(s.full_shape[0]) if s.dim == 0 else (0, s.full_shape[0])
            value = resized_rows(partial(source.rows, s.key), dense, moe, settings, a, b)
        else:
            value = source.piece(s)
        tensors[s.local].copy_(value)
    report.bytes_read = source.bytes_read
    del mlp, source  # before the save, which needs memory of its own (see budget.py)
    report.bytes_held = sum(t.numel() * t.element_size() for t in tensors.values())
    _save(chunk, Path(staging), report)
    return _finish(report, started)


@torch.no_grad()
def import_rank(hf_dir: str, cfg: ModelConfig, layout: Layout, staging: str) -> RankReport:
    started, report = time.perf_counter(), _report(layout)
    folder = SafetensorsFolder(Path(hf_dir))
    chunk = _chunk(cfg, layout)
    shards = plan(cfg, layout, report.coords)
    tensors = check_chunk(chunk, shards)
    for s in shards:
        tensors[s.local].copy_(read_shard(folder, cfg, s))
    report.bytes_read = folder.bytes_read
    report.bytes_held = sum(t.numel() * t.element_size() for t in tensors.values())
    report.expert_reads = [(r.name, r.index) for r in folder.log if ".mlp.experts." in r.name]
    _save(chunk, Path(staging), report)
    return _finish(report, started)


@torch.no_grad()
def export_rank(
    ckpt: str,
    cfg: ModelConfig,
    layout: Layout,
    staging: str,
    dtype: torch.dtype,
    max_shard_bytes: int,
) -> RankReport:
    started, report = time.perf_counter(), _report(layout)
    c = report.coords
    chunk = _chunk(cfg, layout)
    load_checkpoint(chunk, Path(ckpt))
    shards = plan(cfg, layout, c)
    tensors = check_chunk(chunk, shards)
    writer = hf_io.ShardWriter(Path(staging), f"rank-{c.rank:05d}-", dtype, max_shard_bytes)
    for s in shards:
        if not s.primary(c):  # a data-parallel copy (the whole TP group skips it together)
            continue
        full = gather(tensors[s.local].detach(), s)
        if writes(s, c):
            for name, t in hf_of(cfg, s.key, full).items():
                writer.add(name, t)
    report.parts = writer.close()
    report.files = describe(Path(staging), [p.path for p in report.parts])
    report.bytes_held = sum(t.numel() * t.element_size() for t in tensors.values())
    report.bytes_read = report.bytes_held
    report.bytes_written = sum(p.nbytes for p in report.parts)
    return _finish(report, started)
