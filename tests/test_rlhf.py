"""Online RLHF (upcycle.rlhf): the objectives on hand cases, named errors before any actor
starts, learning on a verifiable task with both objectives (an engine killed mid-run, a resumed
run), and the in-memory weight sync from trainers at TP2 and EP2 to a tp-1 engine.

The policy is tiny-dense (or tiny-moe) with a 32-token vocabulary: token ids 0-31 are the byte
tokens '!' .. '@', so the prompts ("417=") and the answer ("7") are real tokenizer text, and a
fresh model says "7" with probability ~1/32: the task is learnable in seconds on 2 cores.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from typer.testing import CliRunner

from upcycle.config import ConfigError, from_name
from upcycle.jobs.cli import app
from upcycle.moe.model import build_model
from upcycle.platform.checkpoint import load_checkpoint, read_model_config, save_checkpoint
from upcycle.platform.distributed import single_process
from upcycle.platform.tracking import spooled_metrics
from upcycle.rlhf.batches import micro_batches
from upcycle.rlhf.driver import run_local
from upcycle.rlhf.objectives import grpo_advantages, grpo_loss, online_dpo_loss
from upcycle.rlhf.spec import RlhfJob, RolloutConfig
from upcycle.train_config import TrainConfig
from upcycle.training.loop import LocalSink

DIGITS = from_name("tiny-dense").replace(name="digits", vocab_size=32, max_position_embeddings=64)
DIGITS_MOE = from_name("tiny-moe").replace(name="digits-moe", vocab_size=32,
                                           max_position_embeddings=64)  # fmt: skip


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict[str, Path]:
    """A fresh policy of each kind and 32 prompts whose answer is always "7"."""
    root = tmp_path_factory.mktemp("rlhf")
    out = {}
    for name, cfg in (("dense", DIGITS), ("moe", DIGITS_MOE)):
        with single_process(seed=0):
            out[name] = save_checkpoint(build_model(cfg).eval(), cfg, root / name)
    rng = random.Random(0)
    prompts = [{"prompt": f"{rng.randrange(1000)}=", "answer": "7"} for _ in range(32)]
    out["prompts"] = root / "prompts.jsonl"
    out["prompts"].write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return out


def _job(task, tmp_path, **kw) -> RlhfJob:
    fields = dict(
        policy=str(task["dense"]), prompts=str(task["prompts"]), scorer="exact",
        iterations=10, prompts_per_iteration=8, rollout=RolloutConfig(samples=8, max_tokens=1),
        train=TrainConfig(steps=10, lr=1e-2, min_lr=0.0, warmup_steps=0, weight_decay=0.0),
        tracking_dir=str(tmp_path / "run" / "tracking"),
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
    )  # fmt: skip
    return RlhfJob(**{**fields, **kw})


def _rollouts(tmp_path) -> list[dict]:
    path = tmp_path / "run" / "rollouts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_grpo_advantages_and_loss_on_a_hand_case():
    scores = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    a = grpo_advantages(scores)
    std = math.sqrt(1 / 3)  # Bessel: ((0.5^2) * 4) / 3
    expected = [[0.5 / (std + 1e-4), -0.5 / (std + 1e-4)] * 1, [0.0, 0.0]]
    assert a[0].tolist() == pytest.approx([expected[0][0], expected[0][1], expected[0][1],
                                           expected[0][0]], rel=1e-6)  # fmt: skip
    assert a[1].tolist() == [0.0] * 4  # a tied group teaches nothing
    # two rows, three positions; row 0 has 2 response tokens, row 1 has 1
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]])
    old = torch.tensor([[-1.5, -2.0, -0.5], [-0.3, -0.2, -9.0]])
    ref = torch.tensor([[-1.0, -1.0, -0.5], [-0.3, -0.9, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    adv = torch.tensor([2.0, -1.0])
    loss, m = grpo_loss(logps, old, ref, mask, adv, clip=0.2, kl_coef=0.1)

    def term(lp, o, r, a):
        ratio = math.exp(lp - o)
        surrogate = min(ratio * a, min(max(ratio, 0.8), 1.2) * a)
        kl = math.exp(r - lp) - (r - lp) - 1
        return -(surrogate - 0.1 * kl), kl

    t00, k00 = term(-1.0, -1.5, -1.0, 2.0)  # ratio e^0.5 = 1.65: clipped to 1.2
    t01, k01 = term(-2.0, -2.0, -1.0, 2.0)
    t11, k11 = term(-0.7, -0.2, -0.9, -1.0)  # ratio e^-0.5 = 0.61, A < 0: min takes 0.8 * A
    assert float(loss) == pytest.approx(((t00 + t01) / 2 + t11) / 2, rel=1e-6)
    assert float(m["kl"]) == pytest.approx(((k00 + k01) / 2 + k11) / 2, rel=1e-6)
    assert float(m["clip_fraction"]) == pytest.approx((1 / 2 + 1) / 2)


def test_online_dpo_pairs_best_with_worst_and_averages_untied_pairs():
    groups = [
        {"ids": [1, 2], "responses": [[3], [4], [5]], "scores": [0.0, 1.0, 0.0]},  # best 1, worst 0
        {"ids": [1, 2], "responses": [[6], [7], [8]], "scores": [0.5, 0.5, 0.5]},  # a tie
        {"ids": [9], "responses": [[3, 4], [5], [6]], "scores": [0.2, -1.0, 3.0]},  # best 2, worst 1
        {"ids": [9], "responses": [[7], [8], [9]], "scores": [1.0, 0.0, 0.0]},
    ]  # fmt: skip
    micro = micro_batches(groups, "online_dpo", 4, dp_rank=1, dp_size=2, micro_batch_size=1)
    assert len(micro) == 2  # dp rank 1 holds groups 2 and 3
    first = micro[0]
    assert first.tokens[:, :3].tolist() == [[9, 6, 0], [9, 5, 0]]  # best row, worst row
    assert first.loss_mask.tolist() == [[1, 0, 0, 0], [1, 0, 0, 0]]  # label of the response
    # 4 groups, 3 untied: the weights make the step a mean over untied pairs
    assert first.weights.tolist() == pytest.approx([4 / 3])
    tie = micro_batches(groups, "online_dpo", 4, dp_rank=0, dp_size=2, micro_batch_size=2)[0]
    assert tie.weights.tolist() == pytest.approx([4 / 3, 0.0])
    policy = torch.tensor([-1.0, -2.0, -3.0, -2.5])
    reference = torch.tensor([-1.5, -2.0, -2.0, -2.0])
    loss, m = online_dpo_loss(policy, reference, tie.weights, torch.ones(4), beta=0.5)
    margin = 0.5 * ((-1.0 + 1.5) - (-3.0 + 2.0))
    assert float(loss) == pytest.approx(-F.logsigmoid(torch.tensor(margin)).item() * (4 / 3) / 2)
    assert float(m["pairs_used"]) == 0.5


def test_bad_specs_are_named_before_any_actor_starts(task, tmp_path):
    def error(**kw) -> ConfigError:
        with pytest.raises(ConfigError) as e:
            _job(task, tmp_path, **kw).validate(2)
        return e.value

    example = Path(__file__).parents[1] / "examples" / "rlhf-tiny-moe.yaml"
    assert RlhfJob.from_dict(yaml.safe_load(example.read_text())).rollout.samples == 4
    with pytest.raises(ConfigError, match="rollout.samples.*K >= 2"):
        RolloutConfig(samples=1)
    assert error(scorer="judge").field == "scorer"
    assert "not a reward model" in str(error(scorer=str(task["dense"])))
    assert error(rollout=RolloutConfig(tp=3, max_tokens=1)).field == "rollout.tp"  # 4 heads
    assert error(rollout=RolloutConfig(max_tokens=61)).field == "rollout.max_tokens"  # 64
    assert error(prompts_per_iteration=7).field == "prompts_per_iteration"  # dp 2
    assert error(prompts_per_iteration=40).field == "prompts_per_iteration"  # 32 prompts
    assert error(objective="ppo").field == "objective"
    assert error(sandbox="docker").field == "sandbox"
    with pytest.raises(ConfigError, match="train.steps.*set by the RLHF job"):
        RlhfJob.from_dict({"policy": "p", "prompts": "q", "train": {"steps": 5}})
    wide = tmp_path / "wide.jsonl"
    wide.write_text(json.dumps({"prompt": "hello", "answer": "7"}) + "\n")
    assert "outside the policy's vocabulary" in str(error(prompts=str(wide)))
    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps({"prompt": "1="}) + "\n")
    assert "needs each prompt's 'answer'" in str(error(prompts=str(bare)))


def test_grpo_learns_survives_a_killed_engine_and_resumes(task, tmp_path, ray_cluster):
    """10 GRPO iterations in this process (one trainer rank) with one engine at tp 2 (two
    actors: the weights are re-laid out as they arrive), which is killed after iteration 4's
    rollouts: Ray restarts it (and its follower rank), its sync is retried, and the run goes on;
    before iteration 6 trains, the engine's logits equal the one-process model of the iteration-5
    checkpoint (an independent path: megatron's dist checkpoint, not the sync).
    Then the last checkpoint is removed and the run resumed from iteration 5: it samples and
    trains exactly as the first run did."""
    import os

    import ray

    pids, probe = {}, [[16, 17, 28], [22, 15, 24, 28]]  # "12=", "709="

    def kill_once(iteration, engines):
        pids[iteration] = ray.get(engines[0].__ray_call__.remote(lambda _: os.getpid()))
        if iteration == 3:
            ray.kill(engines[0], no_restart=False)
        if iteration == 5:  # the engine holds version 5: the checkpoint of iteration 5
            ckpt = tmp_path / "run" / "checkpoints" / "step_0000005"
            model = build_model(read_model_config(ckpt)).eval()
            load_checkpoint(model, ckpt)
            with torch.no_grad():
                want = [model(torch.tensor([p]), torch.arange(len(p))[None], None)[0, -1]
                        for p in probe]  # fmt: skip
            got = ray.get(engines[0].probe.remote(probe))
            torch.testing.assert_close(got, torch.stack(want).float(), rtol=0, atol=1e-5)

    job = _job(task, tmp_path, objective="grpo", save_interval=5,
               rollout=RolloutConfig(samples=8, max_tokens=1, tp=2))  # fmt: skip
    last = run_local(job, LocalSink(tmp_path / "run"), after_rollout=kill_once)
    metrics = spooled_metrics(tmp_path / "run" / "tracking")
    rewards = [metrics[i]["reward/mean"] for i in range(1, 11)]
    assert sum(rewards[-2:]) / 2 - sum(rewards[:2]) / 2 >= 0.4, rewards
    assert pids[4] != pids[3] and last["version"] == 10  # a new engine process from iteration 5
    assert 5 in pids  # the engine's logits were checked against the checkpoint
    # the restarted engine took version 4 (its retried sync) and computes what the trainer does
    assert max(m["sync/max_logit_diff"] for m in metrics.values()) <= 1e-6
    assert [r["version"] for r in _rollouts(tmp_path)][::8] == list(range(10))
    first = {i: metrics[i] for i in range(6, 11)}
    (tmp_path / "run" / "checkpoints" / "step_0000010").rename(tmp_path / "set-aside")
    resumed = run_local(job, LocalSink(tmp_path / "run"))
    again = spooled_metrics(tmp_path / "run" / "tracking")
    for i in range(6, 11):
        for key in ("reward/mean", "grpo_loss", "kl", "grad_norm"):
            assert again[i][key] == pytest.approx(first[i][key], rel=1e-5, abs=1e-7), (i, key)
    assert resumed["version"] == 10
    assert [r["iteration"] for r in _rollouts(tmp_path)] == [i for i in range(10) for _ in range(8)]


def test_online_dpo_learns_and_its_loss_is_the_hand_computation(task, tmp_path, ray_cluster):
    """Online DPO: the mean reward rises, and iteration 2's logged loss equals the loss computed
    by hand from the logged rollouts (best and worst by logged score) with the log-probs of the
    policy after iteration 1 (its checkpoint) and of the starting policy (the reference). The
    seed (prompts and samples) is one whose first iteration samples a right answer (1 in 32 at
    random), so that iteration has a pair for its log(2) check."""
    job = _job(task, tmp_path, objective="online_dpo", iterations=12, save_interval=1,
               train=TrainConfig(steps=12, lr=1e-2, min_lr=0.0, warmup_steps=0, weight_decay=0.0,
                                 seed=1))  # fmt: skip
    run_local(job, LocalSink(tmp_path / "run"))
    metrics = spooled_metrics(tmp_path / "run" / "tracking")
    rewards = [metrics[i]["reward/mean"] for i in range(1, 13)]
    assert sum(rewards[-2:]) / 2 - sum(rewards[:2]) / 2 >= 0.3, rewards
    assert metrics[1]["pairs_used"] > 0
    assert metrics[1]["dpo_loss"] == pytest.approx(math.log(2), rel=1e-6)  # policy = reference

    def logps(ckpt, rows):
        with single_process():
            model = build_model(read_model_config(ckpt)).eval()
            load_checkpoint(model, ckpt)
            out = []
            for prompt, response in rows:
                ids = torch.tensor([prompt + response])
                with torch.no_grad():
                    logits = model(ids, torch.arange(ids.shape[1])[None], None).float()
                lp = torch.log_softmax(logits[0, :-1], -1)
                targets = ids[0, 1:]
                picked = lp[torch.arange(len(targets)), targets][len(prompt) - 1 :]
                out.append(float(picked.sum()))
            return out

    tasks = [json.loads(line) for line in task["prompts"].read_text().splitlines()]
    from upcycle.synthesis.generation import prompt_ids

    pairs = []
    for r in (r for r in _rollouts(tmp_path) if r["iteration"] == 1):
        s = r["scores"]
        if max(s) != min(s):
            best, worst = s.index(max(s)), s.index(min(s))
            ids = prompt_ids(tasks[r["prompt"]])
            pairs.append(((ids, r["response_tokens"][best]), (ids, r["response_tokens"][worst])))
    rows = [p[0] for p in pairs] + [p[1] for p in pairs]
    pi = logps(tmp_path / "run" / "checkpoints" / "step_0000001", rows)
    ref = logps(task["dense"], rows)
    n = len(pairs)
    terms = [-F.logsigmoid(torch.tensor(0.1 * ((pi[i] - ref[i]) - (pi[n + i] - ref[n + i]))))
             for i in range(n)]  # fmt: skip
    assert metrics[2]["dpo_loss"] == pytest.approx(float(sum(terms) / n), rel=1e-5)


@pytest.mark.parametrize(
    "name, layout",
    [("dense", {"tp": 2}), ("moe", {"ep": 2})],
)
def test_weight_sync_from_a_sharded_trainer_on_ray_train(name, layout, task, tmp_path, ray_cluster):
    """`upcycle rlhf` on 2 Ray Train workers (dense at TP2, MoE at EP2) with a tp-1 engine whose
    decode step is compiled (`compile: on`, weights live in the graph): after every sync the
    engine's logits on fixed prompts (a prefill, then a compiled decode step) equal the
    trainer's (fp32), the
    iterations' rollouts carry their policy versions, and the last checkpoint is written."""
    spec = {
        "policy": str(task[name]), "prompts": str(task["prompts"]), "objective": "grpo",
        "scorer": "exact", "iterations": 2, "prompts_per_iteration": 4,
        "rollout": {"samples": 4, "max_tokens": 2, "compile": "on"}, "layout": layout,
        "train": {"lr": 1e-2}, "name": f"sync-{name}",
        "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
    }  # fmt: skip
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(app, ["rlhf", str(tmp_path / "spec.yaml"), "--workers", "2",
                                      "--storage", str(tmp_path / "runs"), "--max-failures", "0"])  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = spooled_metrics(tmp_path / "runs" / f"sync-{name}" / "tracking")
    assert sorted(metrics) == [1, 2]
    for m in metrics.values():
        assert m["sync/max_logit_diff"] <= 1e-6
        assert m["sync/bytes"] > 0
    assert metrics[2]["rollout/compiled_steps"] > metrics[1]["rollout/compiled_steps"] > 0
    lines = (tmp_path / "runs" / f"sync-{name}" / "rollouts.jsonl").read_text().splitlines()
    assert [json.loads(line)["version"] for line in lines] == [0] * 4 + [1] * 4
