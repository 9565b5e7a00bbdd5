"""`upcycle convert`: a dense Qwen2 checkpoint -> a Qwen2-MoE checkpoint by an upcycling method.

Input: our checkpoint or a transformers Qwen2 folder. Output: our checkpoint, or with `--hf` a
transformers Qwen2-MoE folder (safetensors, per-expert layout). Both carry `lineage.json`: the
method, its settings, and the SHA-256 of the source's manifest (or config.json).

Streaming: the dense tensors are read one at a time (safetensors' lazy `safe_open`; our checkpoint
is loaded whole, a dense model being small next to its MoE) and the MoE tensors are produced layer
by layer; with `--hf` each output shard is written as soon as it is full, so memory holds one
shard and one layer (bench/upcycle_memory.py measures it). Our own format is written with one
megatron-core dist-checkpoint save, which needs the whole MoE state in memory.
Every shape and setting is checked before anything is written; `--dry-run` checks a full-size pair
on the meta device without weights.

With `--workers N --layout ...` the conversion runs on N ranks instead (`on_ranks`,
upcycle.conversion): each rank builds, fills and writes only its shard of the MoE, so memory per
process is about 1/N of the model; `--dry-run` then sizes every rank's reads, memory and writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from upcycle.atomic import manifest_sha256
from upcycle.config import ConfigError, Layout, ModelConfig, from_name
from upcycle.conversion.budget import RankBudget, upcycle_budget
from upcycle.conversion.distributed import upcycle_on_ranks
from upcycle.conversion.group import RankGroup
from upcycle.conversion.ranks import RankReport
from upcycle.conversion.shards import check_layout
from upcycle.dense import hf_io
from upcycle.dense.hf_weights import CheckpointError, hf_shapes, to_hf, to_megatron
from upcycle.dense.megatron_config import to_transformer_config
from upcycle.moe.model import build_model, build_on_meta
from upcycle.moe.params import ParamCounts, count_parameters
from upcycle.moe.upcycling import UpcycleSettings, check_pair, upcycle_hf
from upcycle.platform.checkpoint import (
    LINEAGE,
    load_checkpoint,
    load_state,
    read_model_config,
    save_checkpoint,
)
from upcycle.platform.distributed import single_process

Getter = Callable[[str], torch.Tensor]


def target_config(target: str) -> ModelConfig:
    """A preset name or a model JSON file."""
    path = Path(target)
    return (
        ModelConfig.load(path) if path.suffix == ".json" and path.is_file() else from_name(target)
    )


def _describe(src: str) -> tuple[ModelConfig, Path | None]:
    path = Path(src)
    if (path / "model.json").is_file():
        return read_model_config(path), path
    if (path / "config.json").is_file():
        return hf_io.read_hf_config(path), path
    if path.exists():
        raise ConfigError(
            "from", f"{src} is neither our checkpoint (model.json) nor a transformers folder"
        )
    return from_name(src), None  # a preset: dry runs only


def _hf_getter(folder: Path, dense: ModelConfig) -> Getter:
    """Read one tensor at a time from a transformers folder (single file or sharded), checking
    each against the shape `dense` needs."""
    shapes = hf_shapes(dense)
    index = folder / hf_io.INDEX_FILE
    if index.is_file():
        where = json.loads(index.read_text())["weight_map"]
    elif (folder / hf_io.SINGLE_FILE).is_file():
        with safe_open(str(folder / hf_io.SINGLE_FILE), "pt") as f:
            where = dict.fromkeys(f.keys(), hf_io.SINGLE_FILE)
    else:
        hf_io.raise_no_safetensors(folder)  # and refuses pickle-based files by name

    def get(name: str) -> torch.Tensor:
        if name not in where:
            raise CheckpointError(f"{folder}: tensor {name} is missing")
        with safe_open(str(folder / where[name]), "pt") as f:
            t = f.get_tensor(name).float()
        if tuple(t.shape) != shapes[name]:
            raise CheckpointError(
                f"{folder}: {name} has shape {tuple(t.shape)}, expected {shapes[name]}"
            )
        return t

    return get


def _dense_source(dense: ModelConfig, path: Path) -> Getter:
    """A getter over the dense model's transformers-named tensors."""
    if (path / "model.json").is_file():
        model = build_model(dense)
        load_checkpoint(model, path)
        state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        return to_hf(dense, state).__getitem__
    return _hf_getter(path, dense)


def _lineage(settings: UpcycleSettings, dense: ModelConfig, path: Path, source_hash: str) -> dict:
    return {
        "method": settings.method,
        "settings": dataclasses.asdict(settings),
        "source": str(path.absolute()),
        "source_model": dense.name,
        "source_sha256": source_hash,
    }


def _source_hash(path: Path) -> str:
    if (path / "model.json").is_file():
        return manifest_sha256(path)
    return _sha256(path / "config.json")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_as_ray_task(
    src: str, target: str, out: Path, settings: UpcycleSettings, **kw
) -> ModelConfig:
    """`convert` in a Ray task (one CPU) on the connected cluster: the in-process default, or a
    remote one (`RAY_ADDRESS`), whose nodes must see `src` and `out`."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=0)(convert)
    absolute = [str(Path(p).absolute()) if Path(p).exists() else p for p in (src, target)]
    return ray.get(task.remote(*absolute, Path(out).absolute(), settings, **kw))


def dry_run(src: str, target: str, settings: UpcycleSettings) -> tuple[ModelConfig, ParamCounts]:
    """Check every shape of the conversion on the meta device; the target's parameter counts."""
    dense, _ = _describe(src)
    moe = target_config(target)
    # Re-initialisation changes values, not shapes: skip it on the meta device.
    shapes_only = dataclasses.replace(settings, reinit_fraction=0.0)
    dense_shapes = hf_shapes(dense)
    got = {
        name: tuple(t.shape)
        for name, t in upcycle_hf(
            lambda n: torch.empty(dense_shapes[n], device="meta"),
            dense_shapes,
            dense,
            moe,
            shapes_only,
        )
    }
    want = hf_shapes(moe)
    problems = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
    if problems:
        k = problems[0]
        raise ConfigError("to", f"{k}: upcycling gives {got.get(k)}, the target has {want.get(k)}")
    with single_process():
        return moe, count_parameters(build_on_meta(moe), moe)


def validate(src: str, target: str, out: Path | None, settings: UpcycleSettings) -> None:
    """Everything `convert` checks before reading weights: run it before submitting the job."""
    dense, path = _describe(src)
    check_pair(dense, target_config(target), settings)
    if path is None:
        raise ConfigError("from", f"{src} is a preset without weights; give a checkpoint folder")
    if out is not None and Path(out).exists() and any(Path(out).iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new output folder")


def convert(
    src: str,
    target: str,
    out: Path,
    settings: UpcycleSettings,
    *,
    hf_dtype: torch.dtype | None = None,
    max_shard_bytes: int = 2 * 1024**3,
) -> ModelConfig:
    """Upcycle the dense checkpoint `src` into a MoE checkpoint at `out` (our format, or a
    transformers Qwen2-MoE folder in `hf_dtype` when given)."""
    validate(src, target, out, settings)
    dense, path = _describe(src)
    moe = target_config(target)
    with single_process(), torch.no_grad():
        get = _dense_source(dense, path)
        lineage = _lineage(settings, dense, path, _source_hash(path))
        tensors = upcycle_hf(get, hf_shapes(dense), dense, moe, settings)
        if hf_dtype is not None:
            hf_io.write_hf_dir(
                moe, tensors, out, dtype=hf_dtype, max_shard_bytes=max_shard_bytes,
                extra={LINEAGE: lineage},
            )  # fmt: skip
            return moe
        moe_model = build_model(moe, to_transformer_config(moe, perform_initialization=False))
        load_state(moe_model, to_megatron(moe, dict(tensors)))
        save_checkpoint(moe_model, moe, out, extra={LINEAGE: lineage})
    return moe


def check_on_ranks(target: str, layout: Layout, workers: int) -> Layout:
    """The layout resolved for `workers` ranks, checked against the target (named errors)."""
    return check_layout(target_config(target), layout, workers)


def on_ranks(
    src: str,
    target: str,
    out: Path,
    settings: UpcycleSettings,
    layout: Layout,
    workers: int,
    *,
    group: RankGroup | None = None,
) -> tuple[ModelConfig, list[RankReport]]:
    """Upcycle on `workers` ranks (Ray actors) of `layout`: our checkpoint at `out`, every rank
    writing its shard; the ranks' reports (bytes read, held, written; peak memory)."""
    validate(src, target, out, settings)
    dense, path = _describe(src)
    moe = target_config(target)
    lineage = _lineage(settings, dense, path, _source_hash(path))
    reports = upcycle_on_ranks(
        path.absolute(), dense, moe, Path(out).absolute(), settings, layout, workers,
        lineage=lineage, group=group,
    )  # fmt: skip
    return moe, reports


def dry_run_on_ranks(
    src: str, target: str, settings: UpcycleSettings, layout: Layout, workers: int
) -> tuple[ModelConfig, list[RankBudget]]:
    """Every rank's bytes read, held and written for the conversion (shapes only)."""
    moe, _ = dry_run(src, target, settings)
    dense, path = _describe(src)
    ours = path is not None and (path / "model.json").is_file()
    resolved = check_layout(moe, layout, workers)
    return moe, upcycle_budget(dense, moe, resolved, source_is_ours=ours)
