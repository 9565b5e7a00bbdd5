"""The proof that this is Qwen2: transformers and our megatron-core model, same weights, same
tokens, fp32 logits within 1e-4 (measured ~1e-7); and back again through export."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import logits_of, positions, tiny_qwen2, tiny_qwen2_moe
from transformers import AutoModelForCausalLM
from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

from upcycle.conversion.hf_interop import export_hf, import_hf, model_from_hf
from upcycle.moe import aux_loss
from upcycle.moe.model import build_model

TOL = 1e-4
TOKENS = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(7))


def _hf_logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize(
    "tie,kv_heads",
    [(False, 2), (True, 2), (False, 4), (False, 1)],
    ids=["gqa", "tied", "mha", "mqa"],
)
def test_dense_logits_match_transformers(tmp_path, tie, kv_heads):
    hf = tiny_qwen2(tmp_path, tie=tie, kv_heads=kv_heads)
    cfg, ours = model_from_hf(tmp_path)
    assert cfg.tie_embeddings is tie and cfg.num_kv_heads == kv_heads and cfg.qkv_bias
    diff = (logits_of(ours.eval(), TOKENS) - _hf_logits(hf)).abs().max().item()
    assert diff <= TOL, diff


def test_yarn_logits_match_transformers(tmp_path):
    """YaRN (factor 4 over a 64-token original context; theta 1e4 so that the ramp between
    interpolated and extrapolated frequencies falls inside the tiny head dim) on 160 tokens:
    transformers' Qwen2 with rope_scaling {"type": "yarn"} and ours on the same weights."""
    from transformers import Qwen2Config

    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    hf = tiny_qwen2(tmp_path, rope_scaling=yarn | {"rope_theta": 1e4})
    assert Qwen2Config.from_pretrained(tmp_path).rope_parameters["rope_type"] == "yarn"
    cfg, ours = model_from_hf(tmp_path)
    assert (cfg.yarn_factor, cfg.yarn_original_max_position_embeddings) == (4.0, 64)
    tokens = torch.randint(0, 512, (1, 160), generator=torch.Generator().manual_seed(3))
    diff = (logits_of(ours.eval(), tokens) - _hf_logits(hf, tokens)).abs().max().item()
    assert diff <= TOL, diff
    # and YaRN matters: plain RoPE on the same weights is another function
    plain = build_model(cfg.replace(yarn_factor=1.0))
    plain.load_state_dict(ours.state_dict())
    plain_diff = (logits_of(plain.eval(), tokens) - _hf_logits(hf, tokens)).abs().max().item()
    print(f"yarn {diff:.2e}, plain RoPE {plain_diff:.2e}")
    assert plain_diff > 100 * diff, (plain_diff, diff)


def test_qkv_bias_is_used(tmp_path):
    """Zeroing one k bias in the HF folder changes our logits: the bias reaches the model."""
    hf = tiny_qwen2(tmp_path)
    _, ours = model_from_hf(tmp_path)
    bias = ours.decoder.layers[0].self_attention.linear_qkv.bias
    assert bias.abs().sum() > 0
    with torch.no_grad():
        bias.zero_()
    assert (logits_of(ours.eval(), TOKENS) - _hf_logits(hf)).abs().max() > 1e-3


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_moe_logits_match_transformers(tmp_path, norm_topk_prob):
    hf = tiny_qwen2_moe(tmp_path, norm_topk_prob=norm_topk_prob)
    cfg, ours = model_from_hf(tmp_path)
    assert cfg.norm_topk_prob is norm_topk_prob and cfg.shared_expert_gate
    diff = (logits_of(ours.eval(), TOKENS) - _hf_logits(hf)).abs().max().item()
    assert diff <= TOL, diff


def test_norm_topk_prob_changes_the_function(tmp_path):
    """The flag must matter: the same weights with the other setting give other logits."""
    hf = tiny_qwen2_moe(tmp_path, norm_topk_prob=False)
    _, ours = model_from_hf(tmp_path)
    hf.config.norm_topk_prob = True
    for layer in hf.model.layers:
        layer.mlp.gate.norm_topk_prob = True
    assert (logits_of(ours.eval(), TOKENS) - _hf_logits(hf)).abs().max() > 1e-3


def test_shared_expert_gate_matters(tmp_path):
    hf = tiny_qwen2_moe(tmp_path)
    _, ours = model_from_hf(tmp_path)
    with torch.no_grad():
        ours.decoder.layers[1].mlp.shared_experts.gate_weight.zero_()  # sigmoid(0) = 0.5
        hf.model.layers[1].mlp.shared_expert_gate.weight.zero_()
    diff = (logits_of(ours.eval(), TOKENS) - _hf_logits(hf)).abs().max().item()
    assert diff <= TOL, diff


def _router_logits(hf, tokens=TOKENS):
    with torch.no_grad():
        return hf(tokens, output_router_logits=True)


@pytest.mark.parametrize("layers", [1, 3])
def test_aux_loss_matches_transformers(tmp_path, layers):
    hf = tiny_qwen2_moe(tmp_path, layers=layers)
    cfg, ours = model_from_hf(tmp_path)
    out = _router_logits(hf)
    aux_loss.reset()
    ours.train()
    ours(TOKENS, positions(TOKENS), None)  # megatron-core computes the aux loss in training
    mine = aux_loss.layer_aux_losses(cfg)
    aux_loss.reset()
    theirs = [
        load_balancing_loss_func((lg,), cfg.num_experts, cfg.moe_top_k) for lg in out.router_logits
    ]
    assert mine.shape == (layers,)
    for layer, value in enumerate(theirs):
        assert abs(mine[layer].item() - value.item()) <= 1e-5, (layer, mine, theirs)
    assert mine.min() > 1.0  # E * sum f*P >= 1 whatever the routing: a real value, not zeros
    if layers == 1:  # one layer: transformers' whole-model value is ours exactly
        assert abs(mine.sum().item() - out.aux_loss.item()) <= 1e-5


def test_training_loss_includes_the_aux_loss_gradient(tmp_path):
    """megatron-core adds coeff * aux to the router gradient: with coeff 0 the grad differs."""
    tiny_qwen2_moe(tmp_path)
    grads = []
    for coef in (0.001, 0.0):
        cfg, ours = model_from_hf(tmp_path)
        if coef == 0.0:
            from upcycle.moe.model import build_model
            from upcycle.platform.checkpoint import load_state

            state = ours.state_dict()
            cfg = cfg.replace(router_aux_loss_coef=0.0)
            ours = build_model(cfg)
            load_state(ours, state)
        ours.train()
        ours(TOKENS, positions(TOKENS), None, labels=TOKENS).float().mean().backward()
        grads.append(ours.decoder.layers[0].mlp.router.weight.grad.clone())
        aux_loss.reset()
    assert (grads[0] - grads[1]).abs().max() > 0


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_export_loads_in_transformers_with_same_logits(tmp_path, kind):
    hf = (tiny_qwen2 if kind == "dense" else tiny_qwen2_moe)(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    # no dtype: the checkpoint's own (fp32 here), as transformers' save_pretrained keeps it
    _, written = export_hf(tmp_path / "ckpt", tmp_path / "out", max_shard_bytes=200_000)
    assert written == torch.float32
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(back).__name__ == type(hf).__name__
    diff = (_hf_logits(back) - _hf_logits(hf)).abs().max().item()
    assert diff <= TOL, diff
    if kind == "moe":  # per-expert layout, as documented
        assert "model.layers.0.mlp.experts.3.gate_proj.weight" in index["weight_map"]


def test_import_accepts_packed_expert_layout(tmp_path):
    """transformers keeps experts packed in memory (gate_up_proj [E, 2I, H]); some versions save
    them so. Write that layout by hand and import it."""
    from safetensors.torch import save_file

    hf = tiny_qwen2_moe(tmp_path / "per_expert")
    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "config.json").write_text((tmp_path / "per_expert" / "config.json").read_text())
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, packed / "model.safetensors")
    _, ours = model_from_hf(packed)
    diff = (logits_of(ours.eval(), TOKENS) - _hf_logits(hf)).abs().max().item()
    assert diff <= TOL, diff
