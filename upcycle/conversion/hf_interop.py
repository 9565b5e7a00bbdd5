"""`upcycle checkpoint import-hf / export-hf`: transformers folders <-> our checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch

from upcycle.config import ModelConfig
from upcycle.dense import hf_io, hf_weights
from upcycle.moe.model import build_model
from upcycle.platform.checkpoint import (
    load_checkpoint,
    load_state,
    read_model_config,
    save_checkpoint,
    weights_dtype,
)
from upcycle.platform.distributed import single_process


def model_from_hf(hf_dir: Path) -> tuple[ModelConfig, torch.nn.Module]:
    """Our GPTModel (one process, fp32) with the weights of a transformers folder.

    Parallel state must be initialised (`single_process()`).
    """
    cfg = hf_io.read_hf_config(hf_dir)
    state = hf_weights.to_megatron(cfg, hf_io.read_hf_tensors(hf_dir))
    model = build_model(cfg)
    load_state(model, {k: v.float() for k, v in state.items()})
    return cfg, model


def hf_tensors(cfg: ModelConfig, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s weights under transformers' names (megatron-core's empty `_extra_state` dropped)."""
    state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    return hf_weights.to_hf(cfg, state)


def transformers_twin(cfg: ModelConfig, model: torch.nn.Module, folder: Path):
    """The transformers model holding `model`'s weights (written as fp32 safetensors to `folder`):
    *ForCausalLM, or *ForSequenceClassification for a reward model."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    hf_io.write_hf_dir(cfg, hf_tensors(cfg, model), folder, dtype=torch.float32)
    auto = AutoModelForSequenceClassification if cfg.is_reward_model else AutoModelForCausalLM
    return auto.from_pretrained(folder, dtype=torch.float32).eval()


def import_hf(hf_dir: Path, out_dir: Path) -> ModelConfig:
    """Convert a transformers Qwen2 / Qwen2-MoE folder into our checkpoint."""
    with single_process():
        cfg, model = model_from_hf(hf_dir)
        save_checkpoint(model, cfg, out_dir)
    return cfg


def export_hf(
    ckpt_dir: Path,
    out_dir: Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 2 * 1024**3,
) -> tuple[ModelConfig, torch.dtype]:
    """Write our checkpoint as a transformers folder (per-expert layout for MoE), in `dtype`
    (default: the checkpoint's own, as transformers' save_pretrained keeps the model's); the
    config and the dtype written."""
    cfg = read_model_config(ckpt_dir)
    dtype = dtype or weights_dtype(ckpt_dir)
    with single_process():
        model = build_model(cfg)
        load_checkpoint(model, ckpt_dir)
        tensors = hf_tensors(cfg, model)
    hf_io.write_hf_dir(cfg, tensors, out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes)
    return cfg, dtype
