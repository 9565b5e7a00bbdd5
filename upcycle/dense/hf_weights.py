"""Hugging Face Qwen2 / Qwen2-MoE tensors <-> megatron-core GPTModel tensors (unsharded, TP=1).

Pure functions over state dicts, driven by `ModelConfig`. The only layout changes are:
- q/k/v: transformers keeps three matrices; megatron-core one `linear_qkv` grouped per KV head
  ([q heads of group g, k_g, v_g] for each group g), weight and bias alike;
- SwiGLU: transformers' gate_proj and up_proj are megatron-core's `linear_fc1` = [gate; up];
- a reward model's `score` (Qwen2ForSequenceClassification) is our `output_layer` (a ScoreHead);
- routed experts: transformers writes them per expert (`experts.N.gate_proj`, what
  `save_pretrained` of transformers 5 emits and what `export` writes) or packed
  (`experts.gate_up_proj` [E, 2I, H] and `experts.down_proj` [E, H, I]); both are read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from upcycle.config import ModelConfig

Tensors = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: the message names the tensors and the shapes."""


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a transformers checkpoint of `cfg` holds (per-expert layout), with its shape."""
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_kv_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
        }
        if cfg.qkv_bias:
            shapes |= {
                p + "self_attn.q_proj.bias": (q,),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.bias": (kv,),
            }
        if not cfg.is_moe:
            shapes |= _swiglu_shapes(p + "mlp.", h, cfg.ffn_hidden_size)
            continue
        shapes[p + "mlp.gate.weight"] = (cfg.num_experts, h)
        for e in range(cfg.num_experts):
            shapes |= _swiglu_shapes(f"{p}mlp.experts.{e}.", h, cfg.moe_ffn_hidden_size)
        if cfg.shared_expert_ffn_hidden_size:
            shapes |= _swiglu_shapes(p + "mlp.shared_expert.", h, cfg.shared_expert_ffn_hidden_size)
            if cfg.shared_expert_gate:
                shapes[p + "mlp.shared_expert_gate.weight"] = (1, h)
    shapes["model.norm.weight"] = (h,)
    if cfg.is_reward_model:
        shapes["score.weight"] = (1, h)
    elif not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def _swiglu_shapes(prefix: str, h: int, f: int) -> dict[str, tuple[int, ...]]:
    return {
        prefix + "gate_proj.weight": (f, h),
        prefix + "up_proj.weight": (f, h),
        prefix + "down_proj.weight": (h, f),
    }


def unpack_experts(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor]) -> Tensors:
    """Rewrite packed `experts.gate_up_proj` / `experts.down_proj` tensors per expert."""
    out: Tensors = {}
    for name, t in tensors.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            _check_shape(name, t, (cfg.num_experts, 2 * cfg.moe_ffn_hidden_size, cfg.hidden_size))
            for e in range(cfg.num_experts):
                gate, up = t[e].chunk(2, dim=0)
                out[f"{prefix}{e}.gate_proj.weight"] = gate
                out[f"{prefix}{e}.up_proj.weight"] = up
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            _check_shape(name, t, (cfg.num_experts, cfg.hidden_size, cfg.moe_ffn_hidden_size))
            for e in range(cfg.num_experts):
                out[f"{prefix}{e}.down_proj.weight"] = t[e]
        else:
            out[name] = t
    return out


def _check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise CheckpointError(
            f"tensor {name!r} has shape {tuple(t.shape)} but the model config expects {tuple(expected)}"
        )


def check_hf_tensors(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor]) -> None:
    """Raise a `CheckpointError` listing missing tensors, or naming the first shape mismatch."""
    shapes = hf_shapes(cfg)
    missing = sorted(set(shapes) - set(tensors))
    if missing:
        head = ", ".join(missing[:8]) + (
            f" ... ({len(missing)} in all)" if len(missing) > 8 else ""
        )
        raise CheckpointError(
            f"checkpoint is missing {len(missing)} tensor(s) for {cfg.name}: {head}"
        )
    for name, shape in shapes.items():
        _check_shape(name, tensors[name], shape)


def _ignorable(cfg: ModelConfig, name: str) -> bool:
    # Some writers store the tied lm_head, or the RoPE inverse frequencies; neither is a parameter.
    return name.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and name == "lm_head.weight")


def to_megatron(cfg: ModelConfig, hf: Mapping[str, torch.Tensor]) -> Tensors:
    """transformers tensors (either expert layout) -> the state dict of our GPTModel."""
    hf = unpack_experts(cfg, hf)
    unexpected = sorted(n for n in set(hf) - set(hf_shapes(cfg)) if not _ignorable(cfg, n))
    if unexpected:
        raise CheckpointError(
            f"checkpoint has {len(unexpected)} tensor(s) a {cfg.name} model does not: "
            + ", ".join(unexpected[:8])
        )
    check_hf_tensors(cfg, hf)
    out: Tensors = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"]}
    for i in range(cfg.num_layers):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[m + "input_layernorm.weight"] = hf[p + "input_layernorm.weight"]
        out[m + "pre_mlp_layernorm.weight"] = hf[p + "post_attention_layernorm.weight"]
        out[m + "self_attention.linear_qkv.weight"] = _fuse_qkv(cfg, hf, p + "self_attn.", "weight")
        if cfg.qkv_bias:
            out[m + "self_attention.linear_qkv.bias"] = _fuse_qkv(cfg, hf, p + "self_attn.", "bias")
        out[m + "self_attention.linear_proj.weight"] = hf[p + "self_attn.o_proj.weight"]
        if not cfg.is_moe:
            out |= _fc_to_megatron(hf, p + "mlp.", m + "mlp.")
            continue
        out[m + "mlp.router.weight"] = hf[p + "mlp.gate.weight"]
        for e in range(cfg.num_experts):
            out |= _fc_to_megatron(hf, f"{p}mlp.experts.{e}.", f"{m}mlp.experts.local_experts.{e}.")
        if cfg.shared_expert_ffn_hidden_size:
            out |= _fc_to_megatron(hf, p + "mlp.shared_expert.", m + "mlp.shared_experts.")
            if cfg.shared_expert_gate:
                out[m + "mlp.shared_experts.gate_weight"] = hf[p + "mlp.shared_expert_gate.weight"]
    out["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
    if cfg.is_reward_model:
        out["output_layer.weight"] = hf["score.weight"]
    elif not cfg.tie_embeddings:
        out["output_layer.weight"] = hf["lm_head.weight"]
    return out


def to_hf(cfg: ModelConfig, sd: Mapping[str, torch.Tensor]) -> Tensors:
    """The state dict of our GPTModel -> transformers tensors (per-expert layout)."""
    out: Tensors = {}
    for key, t in sd.items():
        if not key.endswith("_extra_state"):
            out |= hf_of(cfg, key, t)
    return {k: v.contiguous() for k, v in out.items()}


# megatron-core name -> transformers name, for tensors that map one to one (outside the layers,
# and within a layer)
HF_TOP_NAMES = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
HF_LAYER_NAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.router.weight": "mlp.gate.weight",
    "mlp.shared_experts.gate_weight": "mlp.shared_expert_gate.weight",
}
_FC_PREFIXES = (  # megatron-core MLP prefix -> transformers', within a layer
    (re.compile(r"mlp\.experts\.local_experts\.(\d+)\."), r"mlp.experts.\1."),
    (re.compile(r"mlp\.shared_experts\."), "mlp.shared_expert."),
    (re.compile(r"mlp\."), "mlp."),
)


def hf_of(cfg: ModelConfig, key: str, t: torch.Tensor) -> Tensors:
    """One full (unsharded) tensor of our GPTModel -> its transformers tensor(s): q/k/v split,
    [gate; up] split, names mapped. A tied model's `output_layer.weight` (a pipeline's last
    stage holds a copy) maps to nothing; a reward model's is `score.weight`."""
    if key == "output_layer.weight" and cfg.is_reward_model:
        return {"score.weight": t}
    if key in HF_TOP_NAMES:
        tied_copy = key == "output_layer.weight" and cfg.tie_embeddings
        return {} if tied_copy else {HF_TOP_NAMES[key]: t}
    layer, rest = key.removeprefix("decoder.layers.").split(".", 1)
    p = f"model.layers.{layer}."
    if rest in HF_LAYER_NAMES:
        return {p + HF_LAYER_NAMES[rest]: t}
    if rest.startswith("self_attention.linear_qkv."):
        return _split_qkv(cfg, t, p + "self_attn.", rest.rsplit(".", 1)[1])
    for pattern, hf_prefix in _FC_PREFIXES:
        if m := pattern.match(rest):
            src = rest[: m.end()]
            if rest[m.end() :] in ("linear_fc1.weight", "linear_fc2.weight"):
                return fc_to_hf({rest: t}, src, p + m.expand(hf_prefix), only=rest[m.end() :])
    raise CheckpointError(f"{key}: not a tensor of a Qwen2 / Qwen2-MoE model")


def megatron_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of our GPTModel for `cfg` at one process (TP 1, PP 1), with its shape."""
    meta = {n: torch.empty(s, device="meta") for n, s in hf_shapes(cfg).items()}
    return {k: tuple(v.shape) for k, v in to_megatron(cfg, meta).items()}


def _fuse_qkv(cfg: ModelConfig, hf: Mapping[str, torch.Tensor], prefix: str, kind: str):
    q, k, v = (hf[f"{prefix}{n}_proj.{kind}"] for n in "qkv")
    return fuse_qkv(q, k, v, cfg.num_kv_heads)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """megatron-core's `linear_qkv` rows from q/k/v rows of `groups` KV heads: per group, its
    query heads, then its key and its value head (a TP slice of it is whole groups)."""
    tail = q.shape[1:]
    parts = [x.reshape(groups, -1, *tail) for x in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *tail)


def _split_qkv(cfg: ModelConfig, fused: torch.Tensor, prefix: str, kind: str) -> Tensors:
    g, d = cfg.num_kv_heads, cfg.head_dim
    per_group = cfg.num_attention_heads // g
    tail = fused.shape[1:]
    q, k, v = fused.reshape(g, (per_group + 2) * d, *tail).split([per_group * d, d, d], dim=1)
    return {
        f"{prefix}q_proj.{kind}": q.reshape(-1, *tail),
        f"{prefix}k_proj.{kind}": k.reshape(-1, *tail),
        f"{prefix}v_proj.{kind}": v.reshape(-1, *tail),
    }


def _fc_to_megatron(hf: Mapping[str, torch.Tensor], src: str, dst: str) -> Tensors:
    return {
        dst + "linear_fc1.weight": torch.cat(
            [hf[src + "gate_proj.weight"], hf[src + "up_proj.weight"]]
        ),
        dst + "linear_fc2.weight": hf[src + "down_proj.weight"],
    }


def fc_to_hf(
    sd: Mapping[str, torch.Tensor], src: str, dst: str, *, only: str | None = None
) -> Tensors:
    """A SwiGLU MLP's `linear_fc1` ([gate; up]) and `linear_fc2` under `src` -> transformers'
    gate/up/down under `dst` (`only`: just one of the two)."""
    out: Tensors = {}
    if only in (None, "linear_fc1.weight"):
        gate, up = sd[src + "linear_fc1.weight"].chunk(2, dim=0)
        out |= {dst + "gate_proj.weight": gate, dst + "up_proj.weight": up}
    if only in (None, "linear_fc2.weight"):
        out[dst + "down_proj.weight"] = sd[src + "linear_fc2.weight"]
    return out
