"""Hugging Face Qwen2 / Qwen2-MoE tensors <-> megatron-core GPTModel tensors (unsharded, TP=1).

Pure functions over state dicts, driven by `ModelConfig`. The only layout changes are:
- q/k/v: transformers keeps three matrices; megatron-core one `linear_qkv` grouped per KV head
  ([q heads of group g, k_g, v_g] for each group g), weight and bias alike;
- SwiGLU: transformers' gate_proj and up_proj are megatron-core's `linear_fc1` = [gate; up];
- routed experts: transformers writes them per expert (`experts.N.gate_proj`, what
  `save_pretrained` of transformers 5 emits and what `export` writes) or packed
  (`experts.gate_up_proj` [E, 2I, H] and `experts.down_proj` [E, H, I]); both are read.
"""

from __future__ import annotations

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
    if not cfg.tie_embeddings:
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
    if not cfg.tie_embeddings:
        out["output_layer.weight"] = hf["lm_head.weight"]
    return out


def to_hf(cfg: ModelConfig, sd: Mapping[str, torch.Tensor]) -> Tensors:
    """The state dict of our GPTModel -> transformers tensors (per-expert layout)."""
    out: Tensors = {"model.embed_tokens.weight": sd["embedding.word_embeddings.weight"]}
    for i in range(cfg.num_layers):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[p + "input_layernorm.weight"] = sd[m + "input_layernorm.weight"]
        out[p + "post_attention_layernorm.weight"] = sd[m + "pre_mlp_layernorm.weight"]
        out |= _split_qkv(
            cfg, sd[m + "self_attention.linear_qkv.weight"], p + "self_attn.", "weight"
        )
        if cfg.qkv_bias:
            out |= _split_qkv(
                cfg, sd[m + "self_attention.linear_qkv.bias"], p + "self_attn.", "bias"
            )
        out[p + "self_attn.o_proj.weight"] = sd[m + "self_attention.linear_proj.weight"]
        if not cfg.is_moe:
            out |= fc_to_hf(sd, m + "mlp.", p + "mlp.")
            continue
        out[p + "mlp.gate.weight"] = sd[m + "mlp.router.weight"]
        for e in range(cfg.num_experts):
            out |= fc_to_hf(sd, f"{m}mlp.experts.local_experts.{e}.", f"{p}mlp.experts.{e}.")
        if cfg.shared_expert_ffn_hidden_size:
            out |= fc_to_hf(sd, m + "mlp.shared_experts.", p + "mlp.shared_expert.")
            if cfg.shared_expert_gate:
                out[p + "mlp.shared_expert_gate.weight"] = sd[m + "mlp.shared_experts.gate_weight"]
    out["model.norm.weight"] = sd["decoder.final_layernorm.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["output_layer.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def _fuse_qkv(cfg: ModelConfig, hf: Mapping[str, torch.Tensor], prefix: str, kind: str):
    g, d = cfg.num_kv_heads, cfg.head_dim
    per_group = cfg.num_attention_heads // g
    q = hf[f"{prefix}q_proj.{kind}"]
    k = hf[f"{prefix}k_proj.{kind}"]
    v = hf[f"{prefix}v_proj.{kind}"]
    tail = q.shape[1:]
    fused = torch.cat(
        [q.reshape(g, per_group * d, *tail), k.reshape(g, d, *tail), v.reshape(g, d, *tail)], dim=1
    )
    return fused.reshape(-1, *tail)


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


def fc_to_hf(sd: Mapping[str, torch.Tensor], src: str, dst: str) -> Tensors:
    gate, up = sd[src + "linear_fc1.weight"].chunk(2, dim=0)
    return {
        dst + "gate_proj.weight": gate,
        dst + "up_proj.weight": up,
        dst + "down_proj.weight": sd[src + "linear_fc2.weight"],
    }
