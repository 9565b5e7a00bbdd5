"""SFT and DPO: the ChatML loss mask, packing that keeps conversations apart, the DPO loss against
a hand computation on transformers' twin of the same weights, and short runs that learn.

All single-process except one Ray run: SFT on two pipeline stages equals one process."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from post_training_data import FACTS, write_dpo, write_sft
from training_reference import run_locally

from upcycle.config import ConfigError, Layout, from_name
from upcycle.conversion.hf_interop import transformers_twin
from upcycle.dense.tokenizer import chat_text, get_tokenizer
from upcycle.moe.model import build_model
from upcycle.platform.checkpoint import save_checkpoint
from upcycle.platform.distributed import single_process
from upcycle.platform.tracking import spooled_metrics
from upcycle.train_config import DpoConfig, TrainConfig
from upcycle.training.chat_data import PackedConversations, PreferencePairs
from upcycle.training.data import DataError
from upcycle.training.job import TrainJob
from upcycle.training.objectives import lm_step
from upcycle.training.ray_train import fit

CFG = from_name("tiny-dense")


def _checkpoint(path, seed: int, cfg=CFG):
    with single_process(seed=seed):
        model = build_model(cfg)
        save_checkpoint(model, cfg, path)
    return model


def test_loss_mask_covers_exactly_the_assistant_turns():
    tok = get_tokenizer()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
    ids, mask = tok.chat_tokens(messages)
    assert ids == tok.encode(chat_text(messages, add_generation_prompt=False), allow_special=True)
    learned = [i for i, m in zip(ids, mask, strict=True) if m]
    assert tok.decode(learned) == "Paris.<|im_end|>Rome.<|im_end|>"
    # the headers and the other turns are context only
    assert (
        tok.decode([i for i, m in zip(ids, mask, strict=True) if not m]).count("<|im_start|>") == 5
    )


def test_packed_conversations_do_not_see_each_other(tmp_path):
    """Logits of each conversation inside a packed row equal its logits alone; without the
    packing mask and restarted positions they would not."""
    samples = PackedConversations(write_sft(tmp_path / "sft.jsonl"), seq_length=128, seed=0)
    batch = samples.batch([0])
    segments = batch.segments[0]
    assert int(segments.max()) >= 2  # at least three conversations share the row
    model = build_model(CFG).eval()
    with torch.no_grad():
        packed = model(batch.tokens, batch.positions, batch.attention_mask)[0]
        unmasked = model(batch.tokens, torch.arange(128)[None], None)[0]
        for seg in range(int(segments.max()) + 1):
            where = (segments == seg).nonzero()[:, 0]
            alone = model(batch.tokens[:, where], torch.arange(len(where))[None], None)[0]
            assert (packed[where] - alone).abs().max() < 1e-5
    last = (segments == segments.max()).nonzero()[:, 0]
    assert (unmasked[last] - packed[last]).abs().max() > 1e-3


def test_unpacked_rows_hold_one_conversation_each(tmp_path):
    """sft.pack: false (what Transformer Engine's attention can run): one conversation per row,
    plain causal attention, same loss mask."""
    path = write_sft(tmp_path / "sft.jsonl")
    unpacked = PackedConversations(path, seq_length=128, seed=0, pack=False)
    packed = PackedConversations(path, seq_length=128, seed=0)
    assert len(unpacked) == unpacked.num_examples == 16 > len(packed)
    batch = unpacked.batch([0, 1])
    assert batch.segments is None and batch.attention_mask is None
    assert [len(r) for r in unpacked.rows[:2]] == [1, 1]
    learned = int(batch.loss_mask.sum())
    first, second = (unpacked.rows[i][0][1] for i in (0, 1))  # the conversations' masks
    assert learned == sum(first[1:]) + sum(second[1:])  # labels that are assistant tokens
    spec = {"model": "tiny-dense", "data": str(path), "objective": "sft", "sft": {"pack": False}}
    job = TrainJob.from_dict(spec)
    assert job.samples().pack is False


def test_sft_loss_is_the_mean_over_assistant_tokens(tmp_path):
    samples = PackedConversations(write_sft(tmp_path / "sft.jsonl"), seq_length=128, seed=0)
    batch = samples.batch([0, 1])
    model = build_model(CFG).eval()
    with torch.no_grad():
        output, loss_func = lm_step(iter([batch]), model)
        loss, metrics = loss_func(output)
        logits = model(batch.tokens, batch.positions, batch.attention_mask)
    keep = batch.loss_mask.bool()
    want = F.cross_entropy(logits[keep], batch.labels[keep])
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    tok = get_tokenizer()
    assert tok.decode(batch.labels[0][keep[0]].tolist()).count("<|im_end|>") == len(
        samples.rows[0]
    )  # every packed conversation ends its assistant turn once


def _job(tmp_path, objective: str, data, **changes) -> TrainJob:
    """A single-process job of `objective` on `data`, from tmp_path/policy, tracked in tmp_path."""
    job = TrainJob(
        model=CFG,
        data=str(data),
        objective=objective,
        layout=Layout(micro_batch_size=2, global_batch_size=8),
        train=TrainConfig(steps=1, seq_length=48, lr=1e-3, warmup_steps=0),
        init_from=str(tmp_path / "policy"),
        name=objective,
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        tracking_dir=str(tmp_path / "tracking"),
    )
    return dataclasses.replace(job, **changes)


def _dpo_job(tmp_path, data, **changes) -> TrainJob:
    return _job(tmp_path, "dpo", data, **changes)


def _two_stages_equal_one_process(job: TrainJob, tmp_path, keys: tuple[str, ...]) -> dict:
    """Run `job` in this process and with pp=2 on Ray Train; per step, `keys` agree (rel 1e-5)."""
    want = run_locally(job, tmp_path / "reference-run")
    parallel = dataclasses.replace(
        job, name=f"{job.name}-pp2", tracking_dir="",
        layout=dataclasses.replace(job.layout, pp=2),
    )  # fmt: skip
    assert fit(parallel, num_workers=2, storage_path=tmp_path).error is None
    got = spooled_metrics(tmp_path / parallel.name / "tracking")
    for step in range(1, job.train.steps + 1):
        for key in keys:
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-5), (step, key)
    return want


def _logp(model, prompt: list[int], response: list[int]) -> float:
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logprobs = model(ids).logits[0].log_softmax(-1)
    n = len(prompt)
    return sum(logprobs[n - 1 + j, t].item() for j, t in enumerate(response))


def test_dpo_loss_equals_a_hand_computation(tmp_path):
    """Policy and reference are different random models; the first step's logged DPO loss and
    rewards (before any update) equal the formula evaluated on transformers' twins."""
    policy = _checkpoint(tmp_path / "policy", seed=1)
    reference = _checkpoint(tmp_path / "reference", seed=2)
    beta = 0.5
    job = _dpo_job(
        tmp_path,
        write_dpo(tmp_path / "dpo.jsonl"),
        dpo=DpoConfig(beta=beta, reference=str(tmp_path / "reference")),
    )
    got = run_locally(job, tmp_path / "run")[1]

    tok = get_tokenizer()
    hf_policy = transformers_twin(CFG, policy, tmp_path / "hf-policy")
    hf_reference = transformers_twin(CFG, reference, tmp_path / "hf-reference")
    losses, margins, wins = [], [], 0
    for i, (question, answer) in enumerate(FACTS):
        prompt = tok.apply_chat_template([{"role": "user", "content": question}])
        chosen = tok.encode(answer) + [tok.im_end_id]
        rejected = tok.encode(FACTS[(i + 3) % len(FACTS)][1]) + [tok.im_end_id]
        r_chosen = beta * (_logp(hf_policy, prompt, chosen) - _logp(hf_reference, prompt, chosen))
        r_rejected = beta * (
            _logp(hf_policy, prompt, rejected) - _logp(hf_reference, prompt, rejected)
        )
        losses.append(-F.logsigmoid(torch.tensor(r_chosen - r_rejected)).item())
        margins.append(r_chosen - r_rejected)
        wins += r_chosen > r_rejected
    assert got["dpo_loss"] == pytest.approx(sum(losses) / 8, rel=1e-4)
    assert got["loss"] == got["dpo_loss"]
    # the margin is beta times a difference of four summed log-probs of ~-100 each: fp32 sums in
    # another order (SDPA, transformers' attention) move it by ~1e-6; a wrong term by >= 1e-2
    assert got["rewards/margin"] == pytest.approx(sum(margins) / 8, rel=1e-4, abs=1e-5)
    assert got["rewards/accuracy"] == pytest.approx(wins / 8)


def test_a_short_dpo_run_raises_the_margin(tmp_path):
    """From the SFT model (policy = reference): the margin starts at exactly 0 (loss ln 2) and
    rises; the preference accuracy reaches 1."""
    _checkpoint(tmp_path / "policy", seed=1)
    job = _dpo_job(
        tmp_path,
        write_dpo(tmp_path / "dpo.jsonl"),
        train=TrainConfig(steps=8, seq_length=48, lr=3e-3, warmup_steps=0, min_lr=3e-3),
        dpo=DpoConfig(beta=0.1),
    )
    got = run_locally(job, tmp_path / "run")
    print({s: round(m["rewards/margin"], 4) for s, m in got.items()})
    assert got[1]["rewards/margin"] == pytest.approx(0, abs=1e-6)
    assert got[1]["dpo_loss"] == pytest.approx(0.693147, rel=1e-5)
    assert got[8]["rewards/margin"] > got[4]["rewards/margin"] > 0.05
    assert got[8]["rewards/accuracy"] == 1.0
    assert got[8]["dpo_loss"] < 0.6


def test_bad_post_training_input_names_the_fix(tmp_path):
    data = write_dpo(tmp_path / "dpo.jsonl")
    with pytest.raises(ConfigError, match="init_from: DPO starts from"):
        _dpo_job(tmp_path, data, init_from=None).validate(1)
    with pytest.raises(ConfigError, match="objective: 'rlhf'"):
        _job(tmp_path, "rlhf", data).validate(1)
    with pytest.raises(ConfigError, match="dpo.beta"):
        TrainJob.from_dict({"model": "tiny-dense", "data": str(data), "dpo": {"beta": 0}})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": 1}\n'
    )
    with pytest.raises(DataError, match=r"bad.jsonl:2: missing 'rejected'"):
        PreferencePairs(bad, 32)
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: no assistant message"):
        PackedConversations(bad, 32, 0)
    bad.write_text("{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: not valid JSON"):
        PackedConversations(bad, 32, 0)


@pytest.mark.slow
def test_sft_on_two_pipeline_stages_equals_one_process(ray_cluster, tmp_path):
    """The packing mask and restarted positions reach every pipeline stage."""
    _checkpoint(tmp_path / "policy", seed=3)
    job = _job(
        tmp_path, "sft", write_sft(tmp_path / "sft.jsonl", copies=8),
        layout=Layout(micro_batch_size=2, global_batch_size=4),
        train=TrainConfig(steps=3, seq_length=64, lr=1e-3, warmup_steps=1),
    )  # fmt: skip
    want = _two_stages_equal_one_process(job, tmp_path, ("lm_loss", "grad_norm"))
    assert want[3]["lm_loss"] < want[1]["lm_loss"]


def test_long_context_continued_pretraining_changes_the_rope_base(tmp_path, corpus):
    """A model trained at 64 positions (base 1e4) continues at 128-token sequences with base
    1e6: the job refuses the longer sequences without the option, and the checkpoint it writes
    carries the new base and limit, so serving builds the long-context model."""
    from upcycle.platform.checkpoint import read_model_config

    short = CFG.replace(name="short", max_position_embeddings=64, rope_theta=1e4)
    _checkpoint(tmp_path / "init", seed=4, cfg=short)
    spec = {
        "model": short.to_dict(),
        "data": str(corpus),
        "init_from": str(tmp_path / "init"),
        "layout": {"micro_batch_size": 2, "global_batch_size": 2},
        "train": {"steps": 2, "seq_length": 128, "warmup_steps": 0},
        "name": "long",
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking_dir": str(tmp_path / "tracking"),
    }
    with pytest.raises(ConfigError, match="train.seq_length: 128 exceeds"):
        TrainJob.from_dict(spec).validate(1)
    spec["long_context"] = {"rope_theta": 1e6, "max_position_embeddings": 256}
    job = TrainJob.from_dict(spec)
    assert TrainJob.from_dict(job.to_dict()) == job  # travels to workers unchanged
    job.validate(1)
    metrics = run_locally(job, tmp_path / "run")
    assert metrics[2]["lm_loss"] < metrics[1]["lm_loss"]
    saved = read_model_config(tmp_path / "run" / "checkpoints" / "step_0000002")
    assert (saved.rope_theta, saved.max_position_embeddings) == (1e6, 256)
    inv_freq = build_model(saved).rotary_pos_emb.inv_freq
    assert inv_freq[1].item() == pytest.approx(1e6 ** (-2 / CFG.head_dim), rel=1e-6)


def test_sft_and_dpo_commands_check_the_spec_before_any_worker(tmp_path):
    from typer.testing import CliRunner

    from upcycle.jobs.cli import app

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    spec = tmp_path / "job.yaml"
    spec.write_text(f"model: tiny-dense\ndata: {bad}\nobjective: sft\n")
    result = CliRunner().invoke(app, ["dpo", str(spec)])
    assert result.exit_code == 2
    assert "objective: 'sft', but `upcycle dpo` runs dpo" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["sft", str(spec)])
    assert result.exit_code == 2
    assert "bad.jsonl:1: no assistant message" in " ".join(result.output.split())


@pytest.mark.slow
def test_dpo_on_two_pipeline_stages_equals_one_process(ray_cluster, tmp_path):
    """The frozen reference runs forward-only through the same pipeline schedule (MoE: its
    router losses stay out of the policy's)."""
    cfg = from_name("tiny-moe")
    _checkpoint(tmp_path / "policy", seed=1, cfg=cfg)
    _checkpoint(tmp_path / "reference", seed=2, cfg=cfg)
    job = _dpo_job(
        tmp_path,
        write_dpo(tmp_path / "dpo.jsonl"),
        model=cfg,
        layout=Layout(micro_batch_size=2, global_batch_size=4),
        train=TrainConfig(steps=3, seq_length=48, lr=1e-3, warmup_steps=0),
        dpo=DpoConfig(beta=0.5, reference=str(tmp_path / "reference")),
    )
    keys = ("dpo_loss", "rewards/margin", "grad_norm", "aux_loss")
    _two_stages_equal_one_process(job, tmp_path, keys)
