"""Read and write transformers-format checkpoint folders (config.json + safetensors).

Only safetensors are read: pickle-based files (`pytorch_model.bin`, `*.pt`) can run code when
loaded, so they are refused with a message saying how to convert them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from upcycle.atomic import atomic_directory
from upcycle.config import ConfigError, ModelConfig
from upcycle.dense.hf_weights import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
ENDOFTEXT_ID = 151643


def read_hf_config(hf_dir: Path) -> ModelConfig:
    """Our `ModelConfig` from a transformers `config.json` (model_type qwen2 or qwen2_moe)."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{hf_dir}: no config.json; is this a transformers checkpoint folder?"
        )
    hf = json.loads(path.read_text())
    kind = hf.get("model_type")
    reward = any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or [])
    if reward and len(hf.get("id2label") or {"0": ""}) != 1:
        raise ConfigError(
            "id2label",
            f"{len(hf['id2label'])} labels; a reward model scores with one (num_labels=1)",
        )
    if kind not in ("qwen2", "qwen2_moe"):
        raise ConfigError(
            "model_type", f"{kind!r} is not supported; expected 'qwen2' or 'qwen2_moe'"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError("hidden_act", f"{hf['hidden_act']!r}: Qwen2 uses 'silu'")
    if hf.get("use_sliding_window"):
        raise ConfigError(
            "use_sliding_window", "sliding-window attention is not supported; set false"
        )
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    common = dict(
        name=Path(hf_dir).name,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        tie_embeddings=hf.get("tie_word_embeddings", False) and not reward,  # reward: no LM head
        qkv_bias=hf.get("qkv_bias", True),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 1_000_000.0))),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        init_std=hf.get("initializer_range", 0.02),
        head="score" if reward else "lm",
        **_read_rope_scaling(rope),
    )
    if kind == "qwen2":
        return ModelConfig(ffn_hidden_size=hf["intermediate_size"], **common)
    if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
        raise ConfigError(
            "mlp_only_layers",
            "every layer must be sparse (mlp_only_layers [] and decoder_sparse_step 1)",
        )
    return ModelConfig(
        num_experts=hf["num_experts"],
        moe_top_k=hf["num_experts_per_tok"],
        moe_ffn_hidden_size=hf["moe_intermediate_size"],
        shared_expert_ffn_hidden_size=hf.get("shared_expert_intermediate_size", 0),
        norm_topk_prob=hf.get("norm_topk_prob", False),
        router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
        **common,
    )


def _read_rope_scaling(rope: dict) -> dict:
    """Our YaRN fields from transformers' `rope_parameters` (or legacy `rope_scaling`)."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return {}
    if rope_type != "yarn":
        raise ConfigError(
            "rope_parameters.rope_type", f"{rope_type!r}: supported are 'default' and 'yarn'"
        )
    for key, default in (("beta_fast", 32), ("beta_slow", 1), ("truncate", True)):
        if rope.get(key) not in (None, default):
            raise ConfigError(f"rope_parameters.{key}", f"only the default {default} is supported")
    for key in ("attention_factor", "mscale", "mscale_all_dim"):
        if rope.get(key) is not None:
            raise ConfigError(f"rope_parameters.{key}", "not supported; remove it (Qwen2 has none)")
    if not rope.get("factor") or not rope.get("original_max_position_embeddings"):
        raise ConfigError(
            "rope_parameters", "yarn needs 'factor' and 'original_max_position_embeddings'"
        )
    return {
        "yarn_factor": float(rope["factor"]),
        "yarn_original_max_position_embeddings": int(rope["original_max_position_embeddings"]),
    }


def _rope_parameters(cfg: ModelConfig) -> dict:
    if cfg.yarn_factor == 1:
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return {
        "rope_type": "yarn",
        "rope_theta": cfg.rope_theta,
        "factor": cfg.yarn_factor,
        "original_max_position_embeddings": cfg.yarn_original_max_position_embeddings,
    }


def hf_config(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """The transformers `config.json` for `cfg` (a reward model: *ForSequenceClassification
    with one label, padding = <|endoftext|> so transformers scores each row's last real token)."""
    family = "Qwen2Moe" if cfg.is_moe else "Qwen2"
    task = "ForSequenceClassification" if cfg.is_reward_model else "ForCausalLM"
    out = {
        "architectures": [family + task],
        "model_type": "qwen2_moe" if cfg.is_moe else "qwen2",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": _rope_parameters(cfg),
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if cfg.vocab_size > ENDOFTEXT_ID:
        out |= {"bos_token_id": ENDOFTEXT_ID, "eos_token_id": ENDOFTEXT_ID}
    if cfg.is_reward_model:
        out |= {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
        if cfg.vocab_size > ENDOFTEXT_ID:
            out["pad_token_id"] = ENDOFTEXT_ID
    if cfg.is_moe:
        out |= {
            "intermediate_size": cfg.shared_expert_ffn_hidden_size or cfg.moe_ffn_hidden_size,
            "num_experts": cfg.num_experts,
            "num_experts_per_tok": cfg.moe_top_k,
            "moe_intermediate_size": cfg.moe_ffn_hidden_size,
            "shared_expert_intermediate_size": cfg.shared_expert_ffn_hidden_size,
            "norm_topk_prob": cfg.norm_topk_prob,
            "router_aux_loss_coef": cfg.router_aux_loss_coef,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "qkv_bias": cfg.qkv_bias,
        }
    else:
        out["intermediate_size"] = cfg.ffn_hidden_size
    return out


def raise_no_safetensors(hf_dir: Path) -> None:
    pickles = sorted(p.name for p in hf_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    raise CheckpointError(
        f"{hf_dir}: no safetensors weights"
        + (f"; found pickle-based {', '.join(pickles)}, which is refused because loading it can run "
           "code. Convert it to safetensors first (transformers: model.save_pretrained(out, "
           "safe_serialization=True))" if pickles else "")
    )  # fmt: skip


def read_hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a single-file or sharded safetensors checkpoint."""
    hf_dir = Path(hf_dir)
    if (hf_dir / INDEX_FILE).is_file():
        index = json.loads((hf_dir / INDEX_FILE).read_text())
        files = sorted(set(index["weight_map"].values()))
    elif (hf_dir / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise_no_safetensors(hf_dir)
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        if not (hf_dir / name).is_file():
            raise CheckpointError(f"{hf_dir}: shard {name} named in {INDEX_FILE} is missing")
        with safe_open(hf_dir / name, framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def write_hf_dir(
    cfg: ModelConfig,
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    out_dir: Path,
    *,
    max_shard_bytes: int = 2 * 1024**3,
    dtype: torch.dtype = torch.bfloat16,
    extra: Mapping[str, dict] | None = None,
) -> Path:
    """Write config.json and safetensors (sharded above `max_shard_bytes`) atomically; `extra`
    JSON files beside them. Tensors may come from a generator: each shard is written as soon as
    it is full, so at most one shard is held in memory."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    with atomic_directory(out_dir) as tmp:
        write_hf_config(tmp, cfg, dtype, extra)
        writer = ShardWriter(tmp, "part-", dtype, max_shard_bytes)
        for name, t in items:
            writer.add(name, t)
        name_shards(tmp, writer.close())
    return Path(out_dir)


def write_hf_config(
    folder: Path, cfg: ModelConfig, dtype: torch.dtype, extra: Mapping[str, dict] | None = None
) -> None:
    (folder / "config.json").write_text(json.dumps(hf_config(cfg, dtype), indent=2) + "\n")
    for name, content in (extra or {}).items():
        (folder / name).write_text(json.dumps(content, indent=1) + "\n")


@dataclass
class Part:
    """One written safetensors file (named `part-...` until `name_shards` knows the count)."""

    path: Path
    names: list[str]
    nbytes: int


class ShardWriter:
    """Safetensors files of at most `max_shard_bytes` each (a larger tensor gets a file of its
    own), each written as soon as it is full."""

    def __init__(self, folder: Path, prefix: str, dtype: torch.dtype, max_shard_bytes: int):
        self.folder, self.prefix, self.dtype, self.limit = (
            Path(folder),
            prefix,
            dtype,
            max_shard_bytes,
        )
        self.parts: list[Part] = []
        self._shard: dict[str, torch.Tensor] = {}
        self._size = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        t = t.detach().to(self.dtype).contiguous()
        nbytes = t.numel() * t.element_size()
        if self._shard and self._size + nbytes > self.limit:
            self._flush()
        self._shard[name] = t
        self._size += nbytes

    def _flush(self) -> None:
        path = self.folder / f"{self.prefix}{len(self.parts):05d}.safetensors"
        save_file(self._shard, path, metadata={"format": "pt"})
        self.parts.append(Part(path, list(self._shard), self._size))
        self._shard, self._size = {}, 0

    def close(self) -> list[Part]:
        if self._shard:
            self._flush()
        return self.parts


def name_shards(folder: Path, parts: list[Part]) -> dict[str, str]:
    """Rename written parts to transformers' names (`model.safetensors`, or
    `model-0000i-of-0000n.safetensors` + the index); the old name -> new name of each."""
    if len(parts) == 1:
        parts[0].path.rename(folder / SINGLE_FILE)
        return {parts[0].path.name: SINGLE_FILE}
    renamed, weight_map = {}, {}
    for i, part in enumerate(parts, 1):
        fname = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
        part.path.rename(folder / fname)
        renamed[part.path.name] = fname
        weight_map |= dict.fromkeys(part.names, fname)
    total = sum(p.nbytes for p in parts)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return renamed
