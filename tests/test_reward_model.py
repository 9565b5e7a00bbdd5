"""The reward model: a Qwen2 backbone with a score head, trained with the Bradley-Terry loss.

Scores equal transformers' *ForSequenceClassification on the same weights; the logged loss and
reward metrics of a step equal a hand computation on those scores; a separable preference set is
learned; `upcycle reward score` and best-of-N rejection run on what it scores; bad input is named.
Single-process except one Ray Train run (tiny-moe at tp=2 with sequence parallelism equals one
process, and its checkpoint scores as one process does) and one Ray Data scoring run.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from post_training_data import FACTS, write_dpo, write_sft
from training_reference import run_locally

from upcycle.config import ConfigError, Layout, from_name
from upcycle.conversion.hf_interop import export_hf, import_hf, transformers_twin
from upcycle.dense.hf_weights import CheckpointError
from upcycle.dense.tokenizer import get_tokenizer
from upcycle.moe.model import build_model
from upcycle.platform.checkpoint import load_checkpoint, read_model_config, save_checkpoint
from upcycle.platform.distributed import single_process
from upcycle.platform.tracking import spooled_metrics
from upcycle.synthesis.scoring import read_scorable, sequences
from upcycle.train_config import TrainConfig
from upcycle.training.data import DataError
from upcycle.training.evaluation import score_sequences
from upcycle.training.job import TrainJob
from upcycle.training.ray_train import fit

DENSE = from_name("tiny-dense")


def _checkpoint(path, cfg, seed: int) -> torch.nn.Module:
    with single_process(seed=seed):
        model = build_model(cfg).eval()
        save_checkpoint(model, cfg, path)
    return model


def _loaded(ckpt) -> torch.nn.Module:
    model = build_model(read_model_config(ckpt)).eval()
    load_checkpoint(model, ckpt)
    return model


def _job(tmp_path, data, **changes) -> TrainJob:
    """A single-process reward job on `data` (all 8 pairs in one micro-batch), from scratch."""
    job = TrainJob(
        model=DENSE,
        data=str(data),
        objective="reward",
        layout=Layout(micro_batch_size=8, global_batch_size=8),
        train=TrainConfig(steps=1, seq_length=48, lr=1e-3, warmup_steps=0),
        name="reward",
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        tracking_dir=str(tmp_path / "tracking"),
    )
    return dataclasses.replace(job, **changes)


def _pair_tokens(question: str, reply: str) -> list[int]:
    """prompt (chat template up to the assistant header) + reply + <|im_end|>, by hand."""
    tok = get_tokenizer()
    prompt = tok.apply_chat_template([{"role": "user", "content": question}])
    return prompt + tok.encode(reply) + [tok.im_end_id]


def _hf_score(hf, ids: list[int]) -> float:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0, 0].item()


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-moe"])
def test_scores_equal_transformers_and_survive_export_and_import(tmp_path, name):
    """Qwen2(Moe)ForSequenceClassification on the same weights gives the same reward to every
    sequence (ours: right-padded batches of mixed lengths); export then import is exact."""
    cfg = from_name(name).as_reward_model()
    model = _checkpoint(tmp_path / "ckpt", cfg, seed=1)
    hf = transformers_twin(cfg, model, tmp_path / "hf")
    assert type(hf).__name__.endswith("ForSequenceClassification") and hf.num_labels == 1
    seqs = [_pair_tokens(q, a) for q, a in FACTS] + [_pair_tokens("Hi", "")]
    with torch.no_grad():
        ours = score_sequences(model, seqs, pad_id=get_tokenizer().eot_id)
    want = [_hf_score(hf, s) for s in seqs]
    assert ours == pytest.approx(want, abs=1e-5)
    assert max(want) - min(want) > 1e-3  # the sequences do score differently

    export_hf(tmp_path / "ckpt", tmp_path / "export")
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert exported["architectures"][0].endswith("ForSequenceClassification")
    assert len(exported["id2label"]) == 1  # num_labels 1: a scalar reward
    assert import_hf(tmp_path / "export", tmp_path / "back") == cfg.replace(name="export")
    back = _loaded(tmp_path / "back").state_dict()
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor) and not key.endswith("_extra_state"):
            assert torch.equal(back[key], value), key


def test_bradley_terry_step_equals_a_hand_computation(tmp_path):
    """A reward job from a language-model checkpoint keeps its backbone and starts a fresh head
    (the same on every layout); step 1's logged loss and reward metrics equal the formulas on
    transformers' twin of that starting model."""
    _checkpoint(tmp_path / "lm", DENSE, seed=1)
    job = _job(tmp_path, write_dpo(tmp_path / "dpo.jsonl"), init_from=str(tmp_path / "lm"))
    got = run_locally(job, tmp_path / "run")[1]

    cfg = DENSE.as_reward_model()
    with single_process():
        start = build_model(cfg).eval()
        load_checkpoint(start, tmp_path / "lm")  # backbone from the LM, head from its seed
    hf = transformers_twin(cfg, start, tmp_path / "hf")
    chosen = torch.tensor([_hf_score(hf, _pair_tokens(q, a)) for q, a in FACTS])
    rejected = torch.tensor(
        [_hf_score(hf, _pair_tokens(q, FACTS[(i + 3) % 8][1])) for i, (q, _) in enumerate(FACTS)]
    )
    every = torch.cat([chosen, rejected])
    want = {
        "reward_loss": -F.logsigmoid(chosen - rejected).mean().item(),
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/mean": every.mean().item(),
        "rewards/std": every.std(correction=0).item(),
    }
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert got["loss"] == got["reward_loss"]
    assert got["rewards/margin"] == pytest.approx((chosen - rejected).mean().item(), abs=1e-6)
    assert got["rewards/accuracy"] == pytest.approx((chosen > rejected).float().mean().item())
    assert 0 < got["rewards/accuracy"] < 1  # a random head: the hand count is not trivial


HELPFUL = ["Gladly, here it is.", "Sure! Step one is below.", "Of course: the answer follows.",
           "Happy to help with that."]  # fmt: skip
REFUSALS = ["No.", "I will not answer that.", "Ask someone else, please.", "Refused."]


def _style_pairs(path, questions) -> None:
    """Separable by style: any helpful reply is preferred to any refusal (16 combinations)."""
    lines = [
        {"prompt": q, "chosen": HELPFUL[i % 4], "rejected": REFUSALS[i // 4 % 4]}
        for i, q in enumerate(questions)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_a_separable_preference_set_is_learned(tmp_path):
    """From a random model (which ranks about half the pairs right): training accuracy reaches
    >= 0.9 and held-out pairs of the same preference are ranked right."""
    _style_pairs(tmp_path / "train.jsonl", [f"What is {a} plus {a + 3}?" for a in range(16)])
    job = _job(
        tmp_path,
        tmp_path / "train.jsonl",
        layout=Layout(micro_batch_size=8, global_batch_size=16),
        train=TrainConfig(steps=12, seq_length=64, lr=3e-3, warmup_steps=0, min_lr=3e-3),
    )
    got = run_locally(job, tmp_path / "run")
    print({s: round(m["rewards/accuracy"], 3) for s, m in got.items()})
    assert got[1]["rewards/accuracy"] < 0.9
    assert got[12]["rewards/accuracy"] >= 0.9
    assert got[12]["reward_loss"] < got[1]["reward_loss"]

    _style_pairs(tmp_path / "held-out.jsonl", [f"Why is {w} so?" for w in "abcdefghijklmnop"])
    records, _ = read_scorable(tmp_path / "held-out.jsonl", max_length=64)
    model = _loaded(sorted((tmp_path / "run" / "checkpoints").glob("step_*"))[-1])
    right = 0
    for record in records:
        chosen, rejected = score_sequences(model, sequences(record, 64, "held-out"), pad_id=0)
        right += chosen > rejected
    assert right / len(records) >= 0.9


@pytest.mark.slow
def test_tp2_sequence_parallel_equals_one_process_and_its_checkpoint_scores_alike(
    ray_cluster, tmp_path
):
    """tiny-moe at tp=2 (sequence parallel: each rank scores its slice, the head's gradient is
    summed over the TP group) trains as one process does; its sharded checkpoint loads into one
    process and scores as the one-process run's checkpoint.

    adam_eps 1e-4: Adam divides each gradient element by its own size (+ eps), so an element
    that is ~0 in one reduction order and ~1e-12 in the other moves by a whole lr. The
    last-token loss leaves many such elements in the experts: at eps 1e-8 step 2 drifts by
    2.6e-5 (step 1's grad norm equal to the last bit; ep=2 and pp=2 agree to 1e-7), at 1e-4 by
    <= 1e-7."""
    cfg = from_name("tiny-moe")
    _checkpoint(tmp_path / "lm", cfg, seed=2)
    job = _job(
        tmp_path,
        write_dpo(tmp_path / "dpo.jsonl"),
        model=cfg,
        init_from=str(tmp_path / "lm"),
        layout=Layout(micro_batch_size=2, global_batch_size=4),
        train=TrainConfig(steps=3, seq_length=48, lr=1e-3, warmup_steps=0, adam_eps=1e-4),
    )
    want = run_locally(job, tmp_path / "reference")
    parallel = dataclasses.replace(
        job, name="reward-tp2", tracking_dir="",
        layout=dataclasses.replace(job.layout, tp=2, sequence_parallel=True),
    )  # fmt: skip
    assert fit(parallel, num_workers=2, storage_path=tmp_path).error is None
    got = spooled_metrics(tmp_path / parallel.name / "tracking")
    for step in (1, 2, 3):
        for key in ("reward_loss", "rewards/chosen", "grad_norm", "aux_loss"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-5), (step, key)
        assert got[step]["rewards/margin"] == pytest.approx(want[step]["rewards/margin"], abs=1e-6)

    seqs = [_pair_tokens(q, a) for q, a in FACTS[:4]]
    one = _loaded(sorted((tmp_path / "reference" / "checkpoints").glob("step_*"))[-1])
    two = _loaded(sorted((tmp_path / parallel.name).rglob("model.json"))[-1].parent)
    assert score_sequences(two, seqs, 0) == pytest.approx(score_sequences(one, seqs, 0), rel=1e-5)


def test_bad_reward_input_names_the_fix(tmp_path):
    pairs = write_dpo(tmp_path / "dpo.jsonl")
    with pytest.raises(ConfigError, match="data: .* is a folder; objective reward"):
        _job(tmp_path, tmp_path).validate(1)
    with pytest.raises(DataError, match=r"sft.jsonl:1: missing 'prompt'"):
        _job(tmp_path, write_sft(tmp_path / "sft.jsonl")).validate(1)
    with pytest.raises(ConfigError, match="model.head: 'score' .* only with objective reward"):
        _job(tmp_path, pairs, objective="sft", model=DENSE.as_reward_model()).validate(1)
    with pytest.raises(ConfigError, match="tie_embeddings"):
        DENSE.replace(head="score")
    with pytest.raises(ConfigError, match="head"):
        DENSE.replace(head="value")

    _checkpoint(tmp_path / "rm", DENSE.as_reward_model(), seed=1)
    with pytest.raises(CheckpointError, match="upcycle reward score"):
        load_checkpoint(build_model(DENSE), tmp_path / "rm")
    with pytest.raises(ConfigError, match="init_from: .* is a reward model"):
        _job(
            tmp_path, pairs, objective="dpo", model=DENSE, init_from=str(tmp_path / "rm")
        ).validate(1)
    from upcycle.deploy.engine.runner import RunnerConfig

    with pytest.raises(ConfigError, match="model: .* does not generate"):
        RunnerConfig().check(DENSE.as_reward_model())

    from upcycle.jobs.synthesize import run_reward_score

    _checkpoint(tmp_path / "lm", DENSE, seed=1)
    with pytest.raises(ConfigError, match="not a reward model"):
        run_reward_score(str(tmp_path / "lm"), pairs, tmp_path / "o.jsonl", max_length=64,
                         workers=1)  # fmt: skip
    with pytest.raises(ValueError, match="max_length: must be in 2..2048"):
        run_reward_score(str(tmp_path / "rm"), pairs, tmp_path / "o.jsonl", max_length=4096,
                         workers=1)  # fmt: skip
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: neither a pair"):
        read_scorable(bad, 64)


def test_reward_score_then_best_of_n_rejection(ray_cluster, tmp_path):
    """`upcycle reward score` on generated samples (a Ray Data actor) gives each sample the
    reward one process gives it; `synthesize rejection --verifier reward` keeps the best sample
    of each prompt and pairs it with the worst."""
    from typer.testing import CliRunner

    from upcycle.jobs.cli import app

    # a 64-token context: the default --max-length (1024) fits itself to it, and says so once
    _checkpoint(tmp_path / "rm", DENSE.replace(max_position_embeddings=64).as_reward_model(), 3)
    generated = tmp_path / "generated.jsonl"
    records = [
        {"prompt": q, "samples": [{"text": a}, {"text": "Hm."}, {"text": FACTS[(i + 1) % 8][1]}]}
        for i, (q, a) in enumerate(FACTS[:3])
    ]
    generated.write_text("".join(json.dumps(r) + "\n" for r in records))
    runner = CliRunner()
    scored = tmp_path / "scored.jsonl"
    result = runner.invoke(app, ["reward", "score", str(tmp_path / "rm"), str(generated),
                                 str(scored)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "3 records" in result.output
    assert result.output.count("max_length: 64, the model's context") == 1
    out = [json.loads(line) for line in scored.read_text().splitlines()]
    model = _loaded(tmp_path / "rm")
    for record, original in zip(out, records, strict=True):
        assert [s["text"] for s in record["samples"]] == [s["text"] for s in original["samples"]]
        want = score_sequences(model, sequences(original, 64, "here"), pad_id=0)
        assert [s["reward"] for s in record["samples"]] == pytest.approx(want, abs=1e-5)

    result = runner.invoke(app, ["synthesize", "rejection", str(scored), str(tmp_path / "rej"),
                                 "--verifier", "reward"])  # fmt: skip
    assert result.exit_code == 0, result.output
    sft = [json.loads(line) for line in (tmp_path / "rej" / "sft.jsonl").read_text().splitlines()]
    dpo = [json.loads(line) for line in (tmp_path / "rej" / "dpo.jsonl").read_text().splitlines()]
    assert len(sft) == len(dpo) == 3
    for record, conversation, pair in zip(out, sft, dpo, strict=True):
        ranked = sorted(record["samples"], key=lambda s: -s["reward"])
        assert conversation["messages"][-1]["content"] == ranked[0]["text"]
        assert (pair["chosen"], pair["rejected"]) == (ranked[0]["text"], ranked[-1]["text"])

    result = runner.invoke(app, ["synthesize", "rejection", str(generated), str(tmp_path / "x"),
                                 "--verifier", "reward"])  # fmt: skip
    assert result.exit_code != 0
    assert "upcycle reward score" in " ".join(result.output.split())
