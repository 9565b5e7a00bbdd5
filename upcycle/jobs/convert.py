"""`upcycle convert`: a dense Qwen2 checkpoint -> a Qwen2-MoE checkpoint by an upcycling method.

Input: our checkpoint or a transformers Qwen2 folder; output: our checkpoint (export it with
`upcycle checkpoint export-hf`), with `lineage.json` naming the method, its settings and the
SHA-256 of the source's manifest (or config.json). Every shape and setting is checked before
anything is written; `--dry-run` checks a full-size pair on the meta device without weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch

from upcycle.atomic import MANIFEST
from upcycle.config import ConfigError, ModelConfig, from_name
from upcycle.dense.megatron_config import to_transformer_config
from upcycle.moe.model import build_model, build_on_meta
from upcycle.moe.params import ParamCounts, count_parameters
from upcycle.moe.upcycling import UpcycleSettings, check_pair, upcycle_state
from upcycle.platform.checkpoint import (
    LINEAGE,
    load_checkpoint,
    load_state,
    read_model_config,
    save_checkpoint,
)
from upcycle.platform.distributed import single_process
from upcycle.platform.hf_interop import model_from_hf


def target_config(target: str) -> ModelConfig:
    """A preset name or a model JSON file."""
    path = Path(target)
    return (
        ModelConfig.load(path) if path.suffix == ".json" and path.is_file() else from_name(target)
    )


def _source(src: str) -> tuple[ModelConfig, Path | None]:
    path = Path(src)
    if (path / "model.json").is_file():
        return read_model_config(path), path
    if (path / "config.json").is_file():
        from upcycle.dense.hf_io import read_hf_config

        return read_hf_config(path), path
    if path.exists():
        raise ConfigError(
            "from",
            f"{src} is neither our checkpoint (model.json) nor a transformers folder (config.json)",
        )
    return from_name(src), None  # a preset: dry runs only


def dry_run(src: str, target: str, settings: UpcycleSettings) -> tuple[ModelConfig, ParamCounts]:
    """Check every shape of the conversion on the meta device; the target's parameter counts."""
    dense, _ = _source(src)
    moe = target_config(target)
    check_pair(dense, moe, settings)
    with single_process():
        dense_model, moe_model = build_on_meta(dense), build_on_meta(moe)
        want = {
            k: v.shape for k, v in moe_model.state_dict().items() if not k.endswith("_extra_state")
        }
        # Re-initialisation changes values, not shapes: skip it on the meta device.
        shapes_only = dataclasses.replace(settings, reinit_fraction=0.0)
        got = {}
        dense_state = {
            k: v for k, v in dense_model.state_dict().items() if not k.endswith("_extra_state")
        }
        for name, value in upcycle_state(dense_state, dense, moe, shapes_only):
            got[name] = value.shape
        problems = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
        if problems:
            k = problems[0]
            raise ConfigError(
                "to", f"{k}: upcycling gives {got.get(k)}, the target has {want.get(k)}"
            )
        return moe, count_parameters(moe_model, moe)


def convert(src: str, target: str, out: Path, settings: UpcycleSettings) -> ModelConfig:
    """Upcycle the dense checkpoint `src` into a MoE checkpoint at `out`."""
    dense, path = _source(src)
    moe = target_config(target)
    check_pair(dense, moe, settings)
    if path is None:
        raise ConfigError(
            "from",
            f"{src} is a preset without weights; give a checkpoint folder (or use --dry-run)",
        )
    if Path(out).exists() and any(Path(out).iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new output folder")
    with single_process():
        if (path / "model.json").is_file():
            dense_model = build_model(dense)
            load_checkpoint(dense_model, path)
            source_hash = hashlib.sha256((path / MANIFEST).read_bytes()).hexdigest()
        else:
            _, dense_model = model_from_hf(path)
            source_hash = hashlib.sha256((path / "config.json").read_bytes()).hexdigest()
        moe_model = build_model(moe, to_transformer_config(moe, perform_initialization=False))
        with torch.no_grad():
            state = dict(upcycle_state(dense_model.state_dict(), dense, moe, settings))
        del dense_model
        load_state(moe_model, state)
        lineage = {
            "method": settings.method,
            "settings": settings.__dict__,
            "source": str(path.absolute()),
            "source_model": dense.name,
            "source_sha256": source_hash,
        }
        save_checkpoint(moe_model, moe, out, extra={LINEAGE: lineage})
    return moe
