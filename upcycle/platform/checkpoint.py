"""Our checkpoint: a megatron-core dist checkpoint plus our model config and a manifest.

Layout of a checkpoint folder:
    model.json      the `ModelConfig` it was saved with
    weights/        megatron-core dist checkpoint (torch_dist): sharded, reshardable on load
    manifest.json   size and SHA-256 of every file (upcycle.atomic)

A training checkpoint is the same folder plus the optimizer state (in the same dist checkpoint,
under "optimizer") and `train_state.json` (step, LR scheduler, layout); every rank writes the
files of its shards into a folder of its own with a manifest part (`upcycle.atomic`), and Ray
Train merges the folders in its storage. Either kind loads as a model with `load_checkpoint`.

Loading verifies the manifest first, then reads the torch.distributed.checkpoint metadata pickle
with an allow-list unpickler (it holds only shapes, dtypes and offsets), so a checkpoint folder
handed in by someone else cannot run code when loaded.
"""

from __future__ import annotations

import json
import pickle
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.models.gpt import GPTModel

from upcycle.atomic import IntegrityError, atomic_directory, verify_manifest, write_manifest_part
from upcycle.config import ModelConfig
from upcycle.dense.hf_weights import CheckpointError
from upcycle.dense.score_head import ScoreHead

MODEL_CONFIG = "model.json"
WEIGHTS = "weights"
TRAIN_STATE = "train_state.json"
HEAD = "output_layer.weight"  # the LM head, or a reward model's score head
LINEAGE = "lineage.json"  # how an upcycled checkpoint was made (upcycle.jobs.convert)
# Optimizer state keyed like the model's, whether or not megatron-core chains a dense and an
# expert optimizer (it does when EP > 1), so it reshards between any layouts.
_OPTIMIZER_METADATA = {"chained_optim_avoid_prefix": True}
_DCP_METADATA = ".metadata"
_SAFE_MODULE_PREFIXES = ("torch.distributed.checkpoint.", "megatron.core.dist_checkpointing.")
_SAFE_GLOBALS = {
    ("torch", "Size"),
    ("torch", "device"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles only torch.distributed.checkpoint metadata classes, dtypes and containers."""

    def find_class(self, module: str, name: str):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if dtype or (module, name) in _SAFE_GLOBALS or module.startswith(_SAFE_MODULE_PREFIXES):
            if "." in name:  # no attribute paths into modules
                raise pickle.UnpicklingError(f"refusing {module}.{name}")
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from checkpoint metadata")


def check_metadata(weights_dir: Path) -> None:
    """Refuse a dist checkpoint whose metadata pickle names anything but metadata classes."""
    path = Path(weights_dir) / _DCP_METADATA
    if not path.is_file():
        raise CheckpointError(
            f"{weights_dir}: no {_DCP_METADATA}; not a megatron-core dist checkpoint"
        )
    with open(path, "rb") as f:
        try:
            _MetadataUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{path}: unsafe or corrupt checkpoint metadata ({e})") from e


def weights_dtype(ckpt_dir: Path) -> torch.dtype:
    """The dtype the checkpoint's model weights are stored in (from the dist-checkpoint metadata,
    read with the allow-list unpickler; optimizer state, fp32 in mixed precision, not counted)."""
    weights = Path(ckpt_dir) / WEIGHTS
    check_metadata(weights)
    with open(weights / _DCP_METADATA, "rb") as f:
        entries = _MetadataUnpickler(f).load().state_dict_metadata
    counts: dict[torch.dtype, int] = {}
    for key, entry in entries.items():
        dtype = getattr(getattr(entry, "properties", None), "dtype", None)
        if dtype is not None and dtype.is_floating_point and not key.startswith("optimizer."):
            counts[dtype] = counts.get(dtype, 0) + 1
    if not counts:
        raise CheckpointError(f"{ckpt_dir}: no floating-point model weights in its metadata")
    return max(counts, key=counts.get)


def save_checkpoint(
    model: GPTModel, cfg: ModelConfig, out_dir: Path, *, extra: dict[str, dict] | None = None
) -> Path:
    """Write `model` (any layout) as our checkpoint, atomically; `extra` JSON files beside it
    (e.g. an upcycled model's lineage)."""
    with atomic_directory(out_dir) as tmp:
        cfg.save(tmp / MODEL_CONFIG)
        for name, content in (extra or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=1) + "\n")
        (tmp / WEIGHTS).mkdir()
        dist_checkpointing.save(model.sharded_state_dict(), str(tmp / WEIGHTS))
    return Path(out_dir)


def read_model_config(ckpt_dir: Path) -> ModelConfig:
    path = Path(ckpt_dir) / MODEL_CONFIG
    if not path.is_file():
        raise CheckpointError(
            f"{ckpt_dir}: no {MODEL_CONFIG}; is this an upcycle checkpoint folder?"
        )
    return ModelConfig.load(path)


def load_checkpoint(model: GPTModel | Sequence[torch.nn.Module], ckpt_dir: Path) -> None:
    """Verify `ckpt_dir` and load it into `model`, or into all of a rank's pipeline chunks at
    once (megatron-core checks the access pattern over one whole load), resharding to the
    model's layout.

    A reward model loads a language model's backbone and keeps its own (initialised) score
    head: that is how reward training starts from an SFT checkpoint. A language model cannot
    load a reward model (it has no LM head to load)."""
    ckpt_dir = Path(ckpt_dir)
    verify_manifest(ckpt_dir)
    check_metadata(ckpt_dir / WEIGHTS)
    chunks = [model] if isinstance(model, torch.nn.Module) else list(model)
    request = _model_state(chunks)
    # the last pipeline stage's head says which kind this rank holds (other stages have none)
    heads = [_unwrap(c).output_layer for c in chunks if getattr(_unwrap(c), "post_process", 0)]
    scores = any(isinstance(h, ScoreHead) for h in heads)
    saved_scores = read_model_config(ckpt_dir).is_reward_model
    if saved_scores and heads and not scores:
        raise CheckpointError(
            f"{ckpt_dir} is a reward model (head 'score'): it has no LM head to load into a "
            "language model; score text with it (`upcycle reward score`)"
        )
    fresh_head = (HEAD,) if scores and not saved_scores else ()
    for state in request.values():
        for key in fresh_head:
            state.pop(key, None)
    loaded = dist_checkpointing.load(request, str(ckpt_dir / WEIGHTS))
    _load_chunks(chunks, loaded, missing_ok=fresh_head)


def _load_chunks(
    chunks: Sequence[torch.nn.Module], loaded: dict, missing_ok: tuple[str, ...] = ()
) -> None:
    for i, chunk in enumerate(chunks):
        state = loaded["model" if len(chunks) == 1 else f"model{i}"]
        load_state(_unwrap(chunk), state, missing_ok=missing_ok)


def load_state(model: torch.nn.Module, state: dict, *, missing_ok: tuple[str, ...] = ()) -> None:
    """`load_state_dict` that tolerates only megatron-core's empty `_extra_state` entries (and
    the `missing_ok` keys, which keep their initial values)."""
    result = model.load_state_dict(state, strict=False)
    missing = [
        k for k in result.missing_keys if not k.endswith("_extra_state") and k not in missing_ok
    ]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(
            f"state does not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    return getattr(chunk, "module", chunk)  # megatron-core DDP wraps the GPTModel


def _model_state(chunks: Sequence[torch.nn.Module]) -> dict:
    if len(chunks) == 1:
        return {"model": _unwrap(chunks[0]).sharded_state_dict()}
    return {f"model{i}": _unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def save_training_state(
    out_dir: Path,
    *,
    chunks: Sequence[torch.nn.Module],
    optimizer,
    cfg: ModelConfig,
    train_state: dict,
) -> None:
    """Every rank: write this rank's shards of model + optimizer into its own `out_dir`."""
    rank, world = dist.get_rank(), dist.get_world_size()
    weights = Path(out_dir) / WEIGHTS
    weights.mkdir(parents=True, exist_ok=True)
    state = _model_state(chunks)
    state["optimizer"] = optimizer.sharded_state_dict(state, metadata=_OPTIMIZER_METADATA)
    dist_checkpointing.save(state, str(weights))
    if rank == 0:
        cfg.save(Path(out_dir) / MODEL_CONFIG)
        (Path(out_dir) / TRAIN_STATE).write_text(json.dumps(train_state, indent=1) + "\n")
    write_manifest_part(Path(out_dir), rank, world)


def load_training_state(ckpt_dir: Path, *, chunks: Sequence[torch.nn.Module], optimizer) -> dict:
    """Load model and optimizer shards (any layout) from a verified checkpoint; its train state."""
    ckpt_dir = Path(ckpt_dir)
    check_metadata(ckpt_dir / WEIGHTS)
    request = _model_state(chunks)
    request["optimizer"] = optimizer.sharded_state_dict(
        request, is_loading=True, metadata=_OPTIMIZER_METADATA
    )
    loaded = dist_checkpointing.load(request, str(ckpt_dir / WEIGHTS))
    _load_chunks(chunks, loaded)
    template = optimizer.sharded_state_dict(
        _model_state(chunks), is_loading=True, metadata=_OPTIMIZER_METADATA
    )
    optimizer.load_state_dict(_fit_optimizer_state(loaded["optimizer"], template))
    return json.loads((ckpt_dir / TRAIN_STATE).read_text())


def _fit_optimizer_state(loaded: dict, template: dict) -> dict:
    """Shape loaded optimizer state like this layout's optimizer expects it.

    megatron-core chains a dense and an expert optimizer when EP > 1 and uses one otherwise; the
    per-parameter tensors reshard by key either way, but the small common part (param groups,
    the shared Adam step) keeps the structure of the layout that saved it. Param groups are
    rebuilt from this optimizer (the LR scheduler sets lr on resume), the step is carried over.
    """
    subs = {None: loaded} if "state" in template else {k: loaded[k] for k in sorted(template)}
    steps = [
        d["state"]["common_step"]
        for d in [loaded, *(v for k, v in loaded.items() if isinstance(k, int))]
        if isinstance(d, dict) and "common_step" in d.get("state", {})
    ]

    def fit(sub: dict, tmpl: dict) -> dict:
        state = {k: v for k, v in sub["state"].items() if k != "common_step"}
        if steps:
            state["common_step"] = steps[0]
        groups = [{**g, "params": g["params"].unwrap()} for g in tmpl["param_groups"]]
        return {"state": state, "param_groups": groups}

    if None in subs:
        return fit(loaded, template)
    return {k: fit(sub, template[k]) for k, sub in subs.items()}


def newest_valid(candidates: Sequence[Path], *, set_aside: bool = False) -> Path | None:
    """The newest of `candidates` (ordered oldest first) whose manifest verifies.

    A partial or corrupted checkpoint is skipped with a warning naming what is wrong, so a job
    resumes from the one before it instead of failing or loading damaged state. With
    `set_aside`, skipped ones are renamed to `NAME.damaged` (kept for inspection, out of the way
    of the run that re-saves that step).
    """
    for path in reversed(list(candidates)):
        try:
            verify_manifest(path)
            if not (Path(path) / TRAIN_STATE).is_file():
                raise IntegrityError(f"{path}: no {TRAIN_STATE}; not a training checkpoint")
            return Path(path)
        except IntegrityError as e:
            warnings.warn(f"skipping checkpoint {path}: {e}; trying the one before", stacklevel=2)
            if set_aside:
                Path(path).rename(Path(path).with_name(f"{Path(path).name}.damaged"))
    return None
