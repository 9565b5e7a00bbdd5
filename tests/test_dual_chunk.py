"""Dual Chunk Attention in the serving engine: within one chunk it is plain attention; beyond,
it equals a slow reference written here straight from the chunk position rules (one query, one
key at a time), through chunked prefill, decode steps and a KV cache shared by two sequences."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import slot_tables, tiny_qwen2

from upcycle.conversion.hf_interop import import_hf, model_from_hf
from upcycle.dense.dual_chunk import DualChunk
from upcycle.deploy.engine.kv_cache import StepPlan
from upcycle.deploy.engine.runner import ModelRunner, RunnerConfig

TRAINED = 32  # chunk c = 24, local window w = 2, chunk length s = 22
HEAD_DIM = 16
THETA = 1e4  # so that positions 0..80 turn even the slow RoPE frequencies noticeably
INV_FREQ = 1.0 / (THETA ** (torch.arange(0, HEAD_DIM, 2).double() / HEAD_DIM))


def _rotate(x: torch.Tensor, position: int) -> torch.Tensor:
    """RoPE of one head vector (transformers' rotate_half convention)."""
    angles = position * INV_FREQ
    cos, sin = torch.cat([angles.cos(), angles.cos()]), torch.cat([angles.sin(), angles.sin()])
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[half:], x[:half]]) * sin


def _query_position(i: int, j: int) -> int:
    c, w = 3 * TRAINED // 4, TRAINED // 16
    s = c - w
    if j // s == i // s:
        return i % s  # intra-chunk
    if j // s == i // s - 1:
        return min(i % s + s, c)  # successive chunk
    return c  # earlier chunks


class SlowDualChunk(torch.nn.Module):
    """Reference core attention: unrotated q/k/v [L, 1, heads, d] of one sequence."""

    def forward(self, query, key, value, attention_mask=None, **_ignored):
        q, k, v = (t[:, 0].double() for t in (query, key, value))
        length, heads, d = q.shape
        group = heads // k.shape[1]
        s = 3 * TRAINED // 4 - TRAINED // 16
        out = torch.zeros_like(q)
        for i in range(length):
            for h in range(heads):
                scores = torch.stack([
                    _rotate(q[i, h], _query_position(i, j)) @ _rotate(k[j, h // group], j % s)
                    for j in range(i + 1)
                ]) / math.sqrt(d)  # fmt: skip
                out[i, h] = scores.softmax(0) @ v[: i + 1, h // group]
        return out.reshape(length, 1, heads * d).to(query.dtype)


def _reference_logits(model, tokens: list[int]) -> torch.Tensor:
    for layer in model.decoder.layers:
        layer.self_attention.core_attention = SlowDualChunk()
    ids = torch.tensor([tokens])
    with torch.no_grad():
        hidden = model.embedding(input_ids=ids, position_ids=torch.arange(len(tokens))[None])
        hidden = model.decoder(hidden, attention_mask=None, rotary_pos_emb=None)
        logits, _ = model.output_layer(hidden)
    return logits[:, 0].float()


def _teacher_forced(runner: ModelRunner, prompts: dict[int, list[int]], prefill: dict[int, int]):
    """Feed each slot's first `prefill[slot]` tokens in chunks of 16, then one token per step;
    logits per slot and position."""
    got: dict[int, dict[int, torch.Tensor]] = {slot: {} for slot in prompts}
    done = dict.fromkeys(prompts, 0)
    while any(done[s] < len(p) for s, p in prompts.items()):
        live = [s for s, p in prompts.items() if done[s] < len(p)]
        lengths = [min(16, prefill[s] - done[s]) if done[s] < prefill[s] else 1 for s in live]
        plan = StepPlan(
            tokens=[
                t
                for s, n in zip(live, lengths, strict=True)
                for t in prompts[s][done[s] : done[s] + n]
            ],
            tables=slot_tables(live, 96),
            offsets=[done[s] for s in live],
            lengths=lengths,
        )
        for s, n, row in zip(live, lengths, runner.forward(plan), strict=True):
            done[s] += n
            got[s][done[s] - 1] = row
    return got


def test_chunk_rules():
    dca = DualChunk.for_trained_length(TRAINED)
    assert (dca.chunk_size, dca.local_size, dca.chunk_len) == (24, 2, 22)
    pos = torch.tensor([0, 21, 22, 23, 43, 44, 70])
    intra, successive, inter = dca.query_positions(pos)
    assert intra.tolist() == [0, 21, 0, 1, 21, 0, 4]
    assert successive.tolist() == [22, 24, 22, 23, 24, 22, 24]
    assert set(inter.tolist()) == {24}
    assert dca.key_positions(pos).tolist() == [0, 21, 0, 1, 21, 0, 4]


def test_dual_chunk_attention_in_the_engine(tmp_path):
    # larger weights than usual: peaked attention, so positions change the logits clearly
    tiny_qwen2(tmp_path / "hf", std=0.3, rope_scaling={"rope_type": "default", "rope_theta": THETA})
    ckpt = tmp_path / "ckpt"
    import_hf(tmp_path / "hf", ckpt)
    long = torch.randint(0, 512, (80,), generator=torch.Generator().manual_seed(1)).tolist()
    short = long[5:29]  # 24 tokens: one chunk (c)
    rc = RunnerConfig(max_num_seqs=2, max_model_len=96, max_step_tokens=32)
    dca = _teacher_forced(
        ModelRunner(ckpt, rc.model_copy(update={"dual_chunk_length": TRAINED})),
        {0: long, 1: short},
        prefill={0: 48, 1: 16},
    )
    plain = _teacher_forced(ModelRunner(ckpt, rc), {1: short}, prefill={1: 16})
    within = max((dca[1][pos] - row).abs().max().item() for pos, row in plain[1].items())
    want = _reference_logits(model_from_hf(tmp_path / "hf")[1].eval(), long)
    beyond = max((row - want[pos]).abs().max().item() for pos, row in dca[0].items())
    plain_long = _teacher_forced(ModelRunner(ckpt, rc), {0: long}, prefill={0: 48})
    differs = min((plain_long[0][p] - dca[0][p]).abs().max().item() for p in range(70, 80))
    print(f"DCA vs plain within a chunk {within:.1e}, vs the slow reference {beyond:.1e}; "
          f"plain attention differs by >= {differs:.1e} at positions 70-79")  # fmt: skip
    assert within < 1e-4  # within one chunk DCA is plain attention
    assert beyond < 1e-4  # positions 47 and 48..79 (chunks 2 and 3) follow the rules
    assert differs > 100 * beyond  # and past one chunk DCA is not plain attention


def test_dual_chunk_length_is_checked():
    from upcycle.config import ConfigError, from_name

    cfg = from_name("tiny-dense")  # max_position_embeddings 2048
    with pytest.raises(ConfigError, match="engine.max_model_len.*dual_chunk_length"):
        RunnerConfig(max_model_len=4096).check(cfg)
    RunnerConfig(max_model_len=4096, dual_chunk_length=2048).check(cfg)
    with pytest.raises(ConfigError, match="engine.dual_chunk_length"):
        RunnerConfig(max_model_len=4096, dual_chunk_length=8192).check(cfg)
