"""The compiled steps (`engine.compile`, upcycle.deploy.engine.compiled_step) and the MoE serving
path (upcycle.deploy.engine.moe_inference) against their eager references: megatron-core's own MoE
layer, and the eager engine on the same schedule of requests joining and leaving mid-flight."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from conftest import slot_tables, tiny_qwen2_moe

from upcycle import runtime
from upcycle.conversion.hf_interop import import_hf
from upcycle.deploy.engine import compiled_step, moe_inference
from upcycle.deploy.engine.batching import Engine
from upcycle.deploy.engine.kv_cache import StepPlan
from upcycle.deploy.engine.runner import ModelRunner, RunnerConfig
from upcycle.deploy.engine.sampling import SamplingParams
from upcycle.moe.model import build_model
from upcycle.platform.checkpoint import read_model_config
from upcycle.platform.distributed import single_process

CONTEXT, SLOTS = 128, 4  # buckets 1, 2, 4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    tiny_qwen2_moe(root / "hf")
    import_hf(root / "hf", root / "ckpt")
    return root / "ckpt"


def test_selected_experts_equal_megatrons_moe_layer(ckpt):
    """1 to 32 tokens, routing balanced (random hidden states) and skewed (every token's top-k
    the same few experts, the others idle): fp32 within 1e-5 of megatron's forward."""
    cfg = read_model_config(ckpt)
    with single_process():
        layer = build_model(cfg).eval().decoder.layers[0].mlp
        megatron = layer.forward
        selected = moe_inference.SelectedExperts(layer, max_tokens=64)
        g = torch.Generator().manual_seed(0)
        k = cfg.moe_top_k
        with torch.no_grad():
            for skewed in (False, True):
                if skewed:  # positive hidden states: the first k experts win every token
                    layer.router.weight[:k] += 1.0
                    layer.router.weight[k:] -= 1.0
                for tokens in (1, 2, 3, 8, 17, 32):
                    x = torch.randn(tokens, 1, cfg.hidden_size, generator=g)
                    x = x.abs() if skewed else x
                    want, _ = megatron(x)
                    got, _ = selected(x)
                    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
                    if skewed:
                        _, routing = selected.route(x)
                        assert routing[:, k:].sum() == 0  # the other experts idle


def _engine(runner: ModelRunner, log: list) -> Engine:
    def forward(plan: StepPlan) -> torch.Tensor:
        logits = runner.forward(plan)
        log.append((plan, logits))
        return logits

    return Engine(forward, max_num_seqs=SLOTS, max_model_len=CONTEXT, max_step_tokens=12,
                  eos_ids=(), vocab_limit=512, decode=lambda ids: "")  # fmt: skip


def _schedule(engine: Engine, params: SamplingParams) -> dict[str, list[int]]:
    """Six requests joining at different steps (more than the 4 slots: some wait for others to
    leave), prompts longer than a step's 12 prefill tokens (chunks mixed with decodes)."""
    g = torch.Generator().manual_seed(5)
    prompts = {f"r{i}": torch.randint(0, 512, (n,), generator=g).tolist()
               for i, n in enumerate((5, 20, 3, 9, 30, 2))}  # fmt: skip
    lengths = {"r0": 64, "r1": 40, "r2": 12, "r3": 64, "r4": 20, "r5": 30}
    arrivals = {"r0": 0, "r1": 0, "r2": 3, "r3": 5, "r4": 9, "r5": 30}
    tokens = {r: [] for r in prompts}
    step = 0
    while len(arrivals) or engine.has_work:
        for r in [r for r, at in arrivals.items() if at <= step]:
            del arrivals[r]
            p = SamplingParams(**{**params.__dict__, "max_tokens": lengths[r]})
            engine.add(prompts[r], p, request_id=r)
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
        step += 1
    return tokens


def _runner(ckpt, compile: str, dtype: str = "float32") -> ModelRunner:
    rc = RunnerConfig(max_num_seqs=SLOTS, max_model_len=CONTEXT, max_step_tokens=12,
                      dtype=dtype, compile=compile)  # fmt: skip
    return ModelRunner(ckpt, rc)


def test_compiled_decode_equals_eager_at_every_bucket(ckpt):
    """fp32, greedy: every step's logits within 1e-5 of the eager engine's and the same tokens,
    with prefill chunks and decode steps mixed and sequences joining and leaving (decode steps
    at every bucket, prefill and mixed steps through the dynamic-shape graph); a seeded sampled
    run gives the eager run's tokens token for token."""
    eager, compiled = _runner(ckpt, "off"), _runner(ckpt, "on")
    for params in (SamplingParams(temperature=0.0),
                   SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=11)):  # fmt: skip
        want_log, got_log = [], []
        want = _schedule(_engine(eager, want_log), params)
        got = _schedule(_engine(compiled, got_log), params)
        assert got == want
        assert [len(t) for t in got.values()] == [64, 40, 12, 64, 20, 30]
        for (want_plan, a), (got_plan, b) in zip(want_log, got_log, strict=True):
            assert got_plan == want_plan
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    assert compiled._decode is not None  # no fallback to eager
    seen = compiled._decode.hot.seen
    assert all(seen[b] > 0 for b in compiled_step.buckets(SLOTS)), seen
    assert compiled._decode.compiled_steps > 0 and compiled._prefill.compiled_steps > 0


@pytest.mark.skipif(not runtime.bf16_supported(), reason="no native bf16 (AVX512-BF16/AMX) here")
def test_compiled_bf16_decode_is_as_close_as_eager_bf16(ckpt):
    """bf16 weights and cache: the compiled step's logits are no further from the eager bf16
    step's than eager bf16 is from exact fp32. bf16 keeps 8 mantissa bits, and inductor fuses and
    reorders the sums (and, frozen, prepacks the GEMM weights), so the two round differently;
    a wrong weight, cache row or mask would be off by the size of the logits."""
    prompts = [[7, 8, 9, 10], [1, 2, 3], [4, 5, 6, 7, 8], [9, 9]]
    tables = slot_tables([0, 1, 2, 3], CONTEXT)
    plans = [StepPlan(sum(prompts, []), tables, [0] * 4, [len(p) for p in prompts]),
             StepPlan([11, 12, 13, 14], tables, [len(p) for p in prompts], [1] * 4)]  # fmt: skip
    out = {}
    for name, compile, dtype in (("exact", "off", "float32"), ("eager", "off", "bfloat16"),
                                 ("compiled", "on", "bfloat16")):  # fmt: skip
        runner = _runner(ckpt, compile, dtype)
        out[name] = [runner.forward(plan) for plan in plans][-1]
    bf16_err = (out["eager"] - out["exact"]).abs().max()
    assert 0 < (out["compiled"] - out["eager"]).abs().max() <= bf16_err


def test_a_failed_compile_falls_back_to_eager_with_one_warning(ckpt, monkeypatch):
    """A compile failure (forced: a backend that raises, as a missing C++ compiler would) gives
    one warning naming the reason, and the eager engine's tokens."""

    def failing_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler (forced by the test)")

    want = _schedule(_engine(_runner(ckpt, "off"), []), SamplingParams(temperature=0.0))
    monkeypatch.setattr("upcycle.deploy.engine.runner.DecodeStep",
                        functools.partial(compiled_step.DecodeStep, backend=failing_backend))  # fmt: skip
    runner = _runner(ckpt, "on")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _schedule(_engine(runner, []), SamplingParams(temperature=0.0))
    fallback = [w for w in caught if "engine.compile" in str(w.message)]
    assert len(fallback) == 1 and "forced by the test" in str(fallback[0].message)
    assert got == want and runner._decode is None


def test_auto_compiles_a_bucket_only_once_it_is_busy(ckpt, monkeypatch):
    """engine.compile auto: a bucket's decode steps stay eager until it has decoded
    `AUTO_COMPILE_AFTER` steps (here 3), then run compiled."""
    monkeypatch.setattr("upcycle.deploy.engine.runner.AUTO_COMPILE_AFTER", 3)
    runner = _runner(ckpt, "auto")
    calls = []
    real = runner._decode._compiled
    runner._decode._compiled = lambda *a: calls.append(a[2].shape[0]) or real(*a)
    table = slot_tables([0], CONTEXT)
    runner.forward(StepPlan([1, 2, 3], table, [0], [3]))
    for t in range(5):
        runner.forward(StepPlan([4], table, [3 + t], [1]))
    assert calls == [1, 1]  # steps 4 and 5 of bucket 1
