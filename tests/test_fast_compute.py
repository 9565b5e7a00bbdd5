"""The fast compute path against what it replaces: SDPA core attention against megatron-core's
`DotProductAttention`, the fused experts against megatron-core's `SequentialMLP` (forward and
every gradient), and bf16 mixed-precision training against the fp32 run.

(Both modules are also in every model the transformers-parity tests build.)
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.moe.experts import SequentialMLP
from training_reference import reference_job, run_locally

from upcycle.config import ConfigError, from_name
from upcycle.dense.attention import SDPAttention
from upcycle.dense.megatron_config import to_transformer_config
from upcycle.moe.experts import EXPERTS_PER_GEMM, ROW_QUANTUM, FusedSequentialMLP, GroupPlan
from upcycle.moe.model import build_model
from upcycle.training.data import Batch


def _attention_pair():
    cfg = from_name("tiny-dense")  # 4 query heads, 2 kv heads: GQA
    tconfig = to_transformer_config(cfg)
    args = dict(layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    return SDPAttention(tconfig, **args), DotProductAttention(tconfig, **args), cfg


def _qkv(s, b, cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = cfg.head_dim
    q = torch.randn(s, b, cfg.num_attention_heads, d, generator=g, requires_grad=True)
    k = torch.randn(s, b, cfg.num_kv_heads, d, generator=g, requires_grad=True)
    v = torch.randn(s, b, cfg.num_kv_heads, d, generator=g, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("packed", [False, True])
def test_sdpa_attention_equals_megatron_dot_product_attention(packed):
    """Causal GQA attention, and the packed-SFT block mask (three conversations in a row): the
    output and the gradients of q, k, v agree with megatron-core's unfused module."""
    ours, theirs, cfg = _attention_pair()
    s, b = 48, 2
    mask = None
    if packed:
        segments = torch.tensor([[0] * 20 + [1] * 16 + [2] * 12, [0] * 30 + [1] * 18])
        mask = Batch(tokens=segments, labels=segments, segments=segments).attention_mask
    results = []
    for module in (ours, theirs):
        q, k, v = _qkv(s, b, cfg)
        out = module(q, k, v, mask)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), q.grad, k.grad, v.grad))
    assert results[0][0].shape == (s, b, cfg.num_attention_heads * cfg.head_dim)
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if packed:  # the mask is read: without it the later conversations see the earlier ones
        q, k, v = _qkv(s, b, cfg)
        assert (ours(q, k, v, None) - results[0][0]).abs().max() > 1e-2


def _moe_layer(num_experts=16, top_k=2):
    cfg = from_name("tiny-moe").replace(num_layers=1, num_experts=num_experts, moe_top_k=top_k)
    return build_model(cfg).decoder.layers[0].mlp, cfg


@pytest.mark.parametrize("skewed", [False, True])
def test_fused_experts_equal_sequential_mlp(skewed):
    """Output and the gradients of the input, the router and every expert weight equal
    megatron-core's SequentialMLP on the same weights; `skewed` routes almost every token to a
    few experts so that most are idle (their gradients must be exactly zero)."""
    mlp, cfg = _moe_layer()
    assert type(mlp.experts) is FusedSequentialMLP
    x0 = torch.randn(200, 1, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    if skewed:  # feature 0 is always 5 and only experts 0-2 read it: top-2 of those three
        x0[..., 0] = 5.0
        with torch.no_grad():
            mlp.router.weight[:3, 0] = 10.0
    results = []
    for cls in (FusedSequentialMLP, SequentialMLP):
        mlp.experts.__class__ = cls
        mlp.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        out, _ = mlp(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = {n: p.grad.clone() for n, p in mlp.named_parameters() if p.grad is not None}
        results.append((out.detach(), x.grad, grads))
    mlp.experts.__class__ = FusedSequentialMLP
    (out, dx, grads), (want_out, want_dx, want_grads) = results
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, want_dx, rtol=1e-5, atol=1e-6)
    counts = torch.zeros(cfg.num_experts)
    for name, want in want_grads.items():
        torch.testing.assert_close(grads[name], want, rtol=1e-5, atol=1e-6, msg=name)
        if ".local_experts." in name:
            counts[int(name.split(".local_experts.")[1].split(".")[0])] += want.abs().sum()
    assert "router.weight" in grads
    if skewed:
        idle = [e for e in range(cfg.num_experts) if counts[e] == 0]
        assert len(idle) == cfg.num_experts - 3, (
            counts
        )  # idle experts: zero gradients, in both modules
        for e in idle:
            assert not grads[f"experts.local_experts.{e}.linear_fc1.weight"].any()


def test_fused_experts_without_tokens_keep_tokens_and_probs_in_the_graph():
    """A rank whose local experts get no token in a layer (an untrained router sends them all
    elsewhere) must still run the backward of the dispatcher's token and probability
    all-to-alls, or its peers wait in one while it enters the other (gloo: "Received data size
    doesn't match expected size"): both inputs get (empty) gradients, as with SequentialMLP."""
    mlp, cfg = _moe_layer()
    for cls in (FusedSequentialMLP, SequentialMLP):
        mlp.experts.__class__ = cls
        x = torch.zeros(0, cfg.hidden_size, requires_grad=True)
        probs = torch.zeros(0, requires_grad=True)
        out, _ = mlp.experts(x, torch.zeros(cfg.num_experts, dtype=torch.long), probs)
        dx, dprobs = torch.autograd.grad(out.sum(), [x, probs])
        assert dx.shape == x.shape and dprobs.shape == probs.shape, cls
    mlp.experts.__class__ = FusedSequentialMLP


def test_fused_experts_inference_paths_agree(monkeypatch):
    """Without autograd, a few tokens per expert go expert by expert (a decode step reads only
    the experts it uses, no padding), many through the bucketed GEMMs; both equal SequentialMLP."""
    from upcycle.moe import experts

    mlp, cfg = _moe_layer()
    alone = []
    each_expert = experts._each_expert
    monkeypatch.setattr(experts, "_each_expert", lambda *a: alone.append(1) or each_expert(*a))
    for tokens, by_expert in ((3, True), (300, False)):  # 6 rows would be mostly padding
        x = torch.randn(tokens, 1, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
        alone.clear()
        with torch.no_grad():
            got = mlp(x)[0]
            mlp.experts.__class__ = SequentialMLP
            want = mlp(x)[0]
            mlp.experts.__class__ = FusedSequentialMLP
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert bool(alone) == by_expert


def test_group_plan_buckets_and_rows():
    assert (EXPERTS_PER_GEMM, ROW_QUANTUM) == (8, 32)  # the numbers below follow from these
    counts = [5, 0, 70, 33, 0, 1, 2, 9, 40, 0, 0, 3, 4, 1]  # 14 experts, 4 idle
    plan = GroupPlan.of(counts, torch.device("cpu"))
    assert [counts[e] for e in plan.order] == sorted(counts, reverse=True)
    # [70 40 33 9 5 4 3 2] in one GEMM padded to 96 rows each, [1 1 0 0 0 0] to 32 (idle
    # experts inside a bucket compute zero rows)
    assert plan.buckets == [(0, 8, 96, 0), (8, 6, 32, 768)]
    assert (plan.covered, plan.rows) == (14, 960)
    # every token row lands on its own padded row, inside its expert's slot of its bucket
    assert plan.dest.unique().numel() == sum(counts)
    slot = {}
    for first, n, cap, row in plan.buckets:
        for k in range(n):
            slot[plan.order[first + k]] = (row + k * cap, row + (k + 1) * cap)
    expert_of_row = torch.repeat_interleave(torch.arange(14), torch.tensor(counts))
    for r, e in enumerate(expert_of_row.tolist()):
        assert slot[e][0] <= int(plan.dest[r]) < slot[e][1]
    assert GroupPlan.of([0, 0, 0], torch.device("cpu")).buckets == []


def test_bf16_training_tracks_fp32(corpus, tmp_path):
    """40 steps of tiny-moe from the same checkpoint: bf16 params and activations with fp32 main
    params, grads and Adam state (megatron-core's mixed-precision optimizer) give a loss within
    2% of the fp32 run at every step, while the loss itself falls by over 8%."""
    base = reference_job("tiny-moe", corpus, tmp_path)
    train = dataclasses.replace(base.train, steps=40, warmup_steps=4)
    layout = dataclasses.replace(base.layout, global_batch_size=4)
    curves = {}
    for dtype in ("fp32", "bf16"):
        job = dataclasses.replace(
            base,
            train=dataclasses.replace(train, dtype=dtype),
            layout=layout,
            name=f"tiny-moe-{dtype}",
            tracking_dir=str(tmp_path / f"tracking-{dtype}"),
        )
        curves[dtype] = run_locally(job, tmp_path / dtype)
    fp32 = [curves["fp32"][s]["lm_loss"] for s in range(1, 41)]
    bf16 = [curves["bf16"][s]["lm_loss"] for s in range(1, 41)]
    # measured here: 11.952 -> 10.804 (fp32) and -> 10.846 (bf16), largest gap 1.35%
    assert fp32[-1] < 0.92 * fp32[0]
    assert max(abs(b / f - 1) for b, f in zip(bf16, fp32, strict=True)) < 0.02
    assert bf16 != fp32  # it did run in bf16


def test_bf16_where_the_cpu_has_no_bf16_is_refused_by_name(monkeypatch):
    from upcycle import runtime
    from upcycle.deploy.engine.runner import RunnerConfig

    assert RunnerConfig(dtype="bfloat16").torch_dtype == torch.bfloat16
    assert RunnerConfig().torch_dtype == (torch.bfloat16 if runtime.has_cuda() else torch.float32)
    monkeypatch.setattr(runtime, "bf16_supported", lambda: False)  # a CPU without AVX512-BF16/AMX
    with pytest.raises(ConfigError, match="engine.dtype: bf16 needs a CUDA GPU or a CPU"):
        RunnerConfig(dtype="bfloat16").check(from_name("tiny-moe"))
