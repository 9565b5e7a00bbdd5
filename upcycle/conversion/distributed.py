"""Conversions on a group of ranks, as the driver sees them: check, stage, run, publish.

Each entry point checks everything it can before any actor starts (the layout against the
target model, the source's tensors and shapes, the output folder), then stages the output in a
hidden sibling of OUT that every rank writes into (so OUT must be on storage all ranks see: one
machine, or a shared file system on a cluster), runs the rank function on the group, writes
model.json / config.json, lineage and the manifest (from the hashes the ranks computed of their
own files), and renames the staging folder onto OUT. A failed rank (`RankFailed`) removes the
staging folder: nothing appears at OUT.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from upcycle.atomic import atomic_directory
from upcycle.config import Layout, ModelConfig
from upcycle.conversion import ranks
from upcycle.conversion.group import RankGroup
from upcycle.conversion.ranks import RankReport
from upcycle.conversion.reading import SafetensorsFolder, check_folder
from upcycle.conversion.shards import check_layout
from upcycle.dense import hf_io
from upcycle.moe.upcycling import UpcycleSettings
from upcycle.platform.checkpoint import MODEL_CONFIG, WEIGHTS, read_model_config, weights_dtype


def _on_group(group: RankGroup | None, layout: Layout, fn, *args) -> list[RankReport]:
    if group is not None:
        return group.run(layout, fn, *args)
    with RankGroup(layout.world_size) as own:
        return own.run(layout, fn, *args)


def _checkpoint_out(out: Path, cfg: ModelConfig, extra: dict[str, dict], run) -> list[RankReport]:
    """Stage our checkpoint at `out`: the ranks write `weights/`, then the config and `extra`."""
    described: dict = {}
    with atomic_directory(out, described=described) as tmp:
        (tmp / WEIGHTS).mkdir()
        reports = run(str(tmp))
        for r in reports:
            described |= r.files
        cfg.save(tmp / MODEL_CONFIG)
        for name, content in extra.items():
            (tmp / name).write_text(json.dumps(content, indent=1) + "\n")
    return reports


def check_hf_source(hf_dir: Path, cfg: ModelConfig) -> None:
    """A transformers folder has every tensor of `cfg` at its shape (else the list)."""
    check_folder(SafetensorsFolder(Path(hf_dir)), cfg)


def upcycle_on_ranks(
    src: Path,
    dense: ModelConfig,
    moe: ModelConfig,
    out: Path,
    settings: UpcycleSettings,
    layout: Layout,
    workers: int,
    *,
    lineage: dict,
    group: RankGroup | None = None,
) -> list[RankReport]:
    """Upcycle `src` (our dense checkpoint or a transformers folder) into our MoE checkpoint at
    `out`, every rank building and writing its own shard."""
    layout = check_layout(moe, layout, workers)
    if not (Path(src) / MODEL_CONFIG).is_file():
        check_hf_source(src, dense)

    def run(staging: str) -> list[RankReport]:
        args = (str(src), dense, moe, layout, settings, staging)
        return _on_group(group, layout, ranks.upcycle_rank, *args)

    return _checkpoint_out(out, moe, {"lineage.json": lineage}, run)


def import_on_ranks(
    hf_dir: Path, out: Path, layout: Layout, workers: int, *, group: RankGroup | None = None
) -> tuple[ModelConfig, list[RankReport]]:
    """A transformers folder -> our checkpoint, every rank reading only its pieces."""
    cfg = hf_io.read_hf_config(hf_dir)
    layout = check_layout(cfg, layout, workers)
    check_hf_source(hf_dir, cfg)

    def run(staging: str) -> list[RankReport]:
        return _on_group(group, layout, ranks.import_rank, str(hf_dir), cfg, layout, staging)

    return cfg, _checkpoint_out(out, cfg, {}, run)


def export_on_ranks(
    ckpt: Path,
    out: Path,
    layout: Layout,
    workers: int,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    group: RankGroup | None = None,
) -> tuple[ModelConfig, torch.dtype, list[RankReport]]:
    """Our checkpoint -> a transformers folder in `dtype` (default: the checkpoint's own):
    every rank loads its shards, TP pieces are gathered in their group, each tensor is written
    once, one index over all ranks' files."""
    cfg = read_model_config(ckpt)
    dtype = dtype or weights_dtype(ckpt)
    layout = check_layout(cfg, layout, workers)
    described: dict = {}
    with atomic_directory(out, described=described) as tmp:
        args = (str(ckpt), cfg, layout, str(tmp), dtype, max_shard_bytes)
        reports = _on_group(group, layout, ranks.export_rank, *args)
        renamed = hf_io.name_shards(tmp, [p for r in reports for p in r.parts])
        for r in reports:
            described |= {renamed[name]: entry for name, entry in r.files.items()}
        hf_io.write_hf_config(tmp, cfg, dtype)
    return cfg, dtype, reports
