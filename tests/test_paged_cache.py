"""The paged KV cache: prefix-shared and preempted sequences decode exactly what transformers
does, no block leaks under a random workload, the block pool's LRU and hash rules, and a KV
budget too small for one sequence named at start."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import tiny_qwen2_moe

from upcycle.config import ConfigError
from upcycle.conversion.hf_interop import import_hf
from upcycle.deploy.engine.batching import Engine
from upcycle.deploy.engine.blocks import BlockPool, PoolExhausted, block_hash
from upcycle.deploy.engine.runner import ModelRunner, RunnerConfig
from upcycle.deploy.engine.sampling import SamplingParams
from upcycle.platform.checkpoint import read_model_config

CONTEXT, BS = 128, 16
GREEDY = SamplingParams(max_tokens=24, temperature=0.0)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(transformers Qwen2-MoE, our checkpoint of the same weights)."""
    root = tmp_path_factory.mktemp("paged")
    hf = tiny_qwen2_moe(root / "hf")
    import_hf(root / "hf", root / "ckpt")
    return hf.eval(), root / "ckpt"


@pytest.fixture(scope="module")
def runner(model):
    rc = RunnerConfig(max_num_seqs=16, max_model_len=CONTEXT, max_step_tokens=64, compile="off")
    return ModelRunner(model[1], rc)


def _engine(runner, *, slots=16, blocks=None, prefix_caching=True, reserve=256) -> Engine:
    """An engine over `runner` using its pool's first `blocks` blocks (default: all)."""
    return Engine(runner.forward, max_num_seqs=slots, max_model_len=CONTEXT, max_step_tokens=64,
                  eos_ids=(), vocab_limit=512, decode=lambda ids: "", block_size=BS,
                  num_blocks=blocks or runner.num_blocks, prefix_caching=prefix_caching,
                  reserve_tokens=reserve)  # fmt: skip


def _run(engine: Engine, requests: dict, arrivals: dict | None = None, aborts=None) -> dict:
    """Drive `engine` to the end: request r (prompt, params) joins before step arrivals[r],
    and is aborted before step aborts[r]. {request: tokens}."""
    arrivals, aborts = arrivals or {}, dict(aborts or {})
    tokens = {r: [] for r in requests}
    pending, step = dict(requests), 0
    while pending or engine.has_work:
        for r in [r for r in pending if arrivals.get(r, 0) <= step]:
            engine.add(*pending.pop(r), request_id=r)
        for r in [r for r, at in aborts.items() if at <= step]:
            del aborts[r]
            engine.abort(r)
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
        step += 1
    return tokens


def _greedy(hf, prompt: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                      dtype=torch.long), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      pad_token_id=0)  # fmt: skip
    return out[0, len(prompt) :].tolist()


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_shared_prefixes_decode_what_transformers_does(model, runner):
    """Three samples of one 40-token prompt, a prompt sharing its first two blocks, later the
    first 32 tokens alone (every block cached: the last token recomputed in a private copy of
    the last block) and a chat continuation of the first prompt's answer: each equal to
    transformers' greedy decoding alone, and every shared block computed once."""
    hf, _ = model
    a = _prompt(40, 1)
    answer = _greedy(hf, a, GREEDY.max_tokens)
    requests = {
        "a0": a, "a1": a, "a2": a,  # n = 3: a1, a2 wait for a0's blocks, then share them
        "b": a[:32] + _prompt(10, 2),  # shares a's two full blocks
        "c": a[:32],  # arrives after a is done: both blocks cached
        "d": a + answer + _prompt(5, 3),  # the next turn: a and 23 answer tokens in 3 blocks
    }  # fmt: skip
    engine = _engine(runner)
    got = _run(engine, {r: (p, GREEDY) for r, p in requests.items()}, {"c": 40, "d": 40})
    for r, p in requests.items():
        assert got[r] == _greedy(hf, p, GREEDY.max_tokens), r
    s = engine.scheduler
    # a1, a2, b: 32 tokens each; c: 31 (its last token recomputed); d: 48 (a's 63 cached tokens)
    assert s.prompt_tokens_hit == 3 * 32 + 31 + 48
    assert s.prefill_tokens == sum(map(len, requests.values())) - s.prompt_tokens_hit
    assert s.pool.used == 0


def test_preemption_completes_every_request_with_the_same_tokens(runner):
    """Eight sequences of up to 100 tokens in a pool of 10 blocks (160 tokens), admitted on
    their prompt alone (reserve_tokens 0): sequences are preempted and recomputed, and each
    decodes what it does with room to spare. With room kept for each whole completion
    (reserve_tokens >= max_tokens) they wait instead: nothing is preempted."""
    prompts = {str(i): (_prompt(20 + 5 * i, 10 + i), SamplingParams(max_tokens=40,
                        temperature=0.0)) for i in range(8)}  # fmt: skip
    roomy = _run(_engine(runner, prefix_caching=False), prompts)
    for reserve, preempted in ((0, True), (40, False)):
        tight = _engine(runner, blocks=CONTEXT // BS + 2, prefix_caching=False, reserve=reserve)
        assert _run(tight, prompts) == roomy
        assert (tight.scheduler.preemptions > 0) == preempted
        assert tight.scheduler.pool.used == 0


def test_no_block_leaks_after_a_random_workload(runner):
    """500 requests (shared prefixes, n > 1 samples, stop tokens, aborts mid-prefill and
    mid-decode) through a pool small enough to preempt: every request ends, every block's
    reference count returns to 0."""
    rng = random.Random(0)
    bases = [_prompt(48, 100 + i) for i in range(6)]
    requests, arrivals, aborts = {}, {}, {}
    for i in range(500):
        prompt = rng.choice(bases)[: rng.randint(1, 48)] + _prompt(rng.randint(0, 20), i)
        stop = (rng.randrange(512),) if i % 3 == 0 else ()
        params = SamplingParams(max_tokens=rng.randint(1, 20), temperature=1.0, seed=i,
                                stop_token_ids=stop)  # fmt: skip
        for k in range(rng.choice([1, 1, 1, 4])):  # n samples of the prompt
            r = f"{i}.{k}"
            requests[r], arrivals[r] = (prompt, params), i // 4
            if rng.random() < 0.1:
                aborts[r] = i // 4 + rng.randint(0, 6)
    engine = _engine(runner, blocks=24, reserve=4)
    tokens = _run(engine, requests, arrivals, aborts)
    s = engine.scheduler
    finished = [r for r in requests if r not in aborts]
    assert all(1 <= len(tokens[r]) <= requests[r][1].max_tokens for r in finished)
    assert s.preemptions > 0 and s.prompt_tokens_hit > 0
    assert s.pool.used == 0 and set(s.pool.refs) == {0}
    assert s.pool.available == s.pool.num_blocks


def test_block_pool_evicts_the_least_recently_released_tail_first():
    pool = BlockPool(4, 2)
    keys = [block_hash(None, [1, 2])]
    keys.append(block_hash(keys[0], [3, 4]))
    first = [pool.allocate(), pool.allocate()]
    for block, key in zip(first, keys, strict=True):
        pool.commit(block, key)
    pool.release(first)  # cached: evictable, the tail block first
    assert pool.match(keys) == first  # the whole prefix, referenced again
    pool.release(first)
    taken = [pool.allocate() for _ in range(3)]  # 2 free blocks, then the evicted tail
    assert taken[2] == first[1] and pool.match(keys) == first[:1]
    with pytest.raises(PoolExhausted):
        pool.allocate()
    assert block_hash(None, [1, 2]) != block_hash(keys[0], [1, 2])  # the parent is in the key
    pool.forget()  # new weights: nothing cached is valid
    assert pool.match(keys) == []


def test_a_kv_budget_too_small_for_one_sequence_is_named_at_start(model):
    cfg = read_model_config(model[1])
    rc = RunnerConfig(max_model_len=CONTEXT, kv_cache_gib=1e-5)
    with pytest.raises(ConfigError, match=r"engine.kv_cache_gib.*needs 8.*raise kv_cache_gib"):
        ModelRunner(model[1], rc)
    # 2 layers x 2 kv heads x 16 dims x 2 (K, V) x 16 tokens x 4 bytes = 8 KiB a block
    assert RunnerConfig(max_model_len=CONTEXT, kv_cache_gib=64 / 2**20).kv_blocks(cfg) == 8
