"""Needle in a haystack: prompts of exactly the asked length with the needle at the asked depth,
the grid's accuracy bookkeeping, and `upcycle eval --needle` end to end into MLflow (a short
model run past its trained length through Dual Chunk Attention)."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from upcycle.config import ConfigError, from_name
from upcycle.dense.tokenizer import get_tokenizer
from upcycle.jobs.evaluate import run
from upcycle.jobs.needle import NeedleResult, NeedleSpec, Trial, build_prompt
from upcycle.moe.model import build_model
from upcycle.platform.checkpoint import save_checkpoint
from upcycle.platform.distributed import single_process
from upcycle.training.data import TokenDataset


def test_prompt_has_the_length_and_the_needle_at_its_depth(corpus):
    tok = get_tokenizer()
    tokens = TokenDataset(corpus).tokens
    hay = tokens[tokens < tok.eot_id]
    for length in (64, 300):
        for depth in (0.0, 0.5, 1.0):
            ids, at = build_prompt(tok, hay, length, depth, 12345)
            assert len(ids) == length
            needle = tok.encode(" The secret number is 12345. ")
            assert ids[at : at + len(needle)] == needle
            head = len(tok.encode("<|im_start|>user\n", allow_special=True))
            tail = tok.encode(
                "\nWhat is the secret number? Answer with the number only.<|im_end|>\n"
                "<|im_start|>assistant\n",
                allow_special=True,
            )
            assert ids[-len(tail) :] == tail
            room = length - head - len(needle) - len(tail)
            assert at - head == round(depth * room)  # haystack tokens before the needle
    with pytest.raises(ConfigError, match="lengths: 20 tokens cannot hold"):
        build_prompt(tok, hay, 20, 0.5, 12345)


def test_accuracy_grid_and_metrics():
    spec = NeedleSpec(lengths=(64, 128), depths=(0.0, 1.0), trials=2)
    trials = [
        Trial(64, 0.0, 11111, 5, "11111"),
        Trial(64, 0.0, 22222, 5, "no idea"),
        Trial(64, 1.0, 33333, 50, "It is 33333."),
        Trial(64, 1.0, 44444, 50, "44444"),
        Trial(128, 0.0, 55555, 5, ""),
        Trial(128, 0.0, 66666, 5, "6666"),  # a prefix is not the number
        Trial(128, 1.0, 77777, 99, "77777"),
        Trial(128, 1.0, 88888, 99, "x"),
    ]
    result = NeedleResult(spec, trials)
    assert result.accuracy().tolist() == [[0.5, 1.0], [0.0, 0.5]]
    m = result.metrics()
    assert m["niah_accuracy"] == 0.5 and m["niah_accuracy/len_64"] == 0.75
    assert m["niah/len_128/depth_1"] == 0.5 and m["niah/len_64/depth_0"] == 0.5


@pytest.mark.slow
def test_eval_with_needle_logs_grid_heatmap_and_trials(ray_cluster, corpus, tmp_path):
    cfg = from_name("tiny-dense").replace(name="short", max_position_embeddings=96)
    with single_process(seed=5):
        save_checkpoint(build_model(cfg), cfg, tmp_path / "ckpt")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = NeedleSpec(lengths=(64, 160), depths=(0.0, 0.5, 1.0), trials=1)
    with pytest.raises(ConfigError, match="engine.max_model_len"):  # 160 > 96 without DCA
        run(tmp_path / "ckpt", corpus, spool_dir=tmp_path / "s0", seq_length=64, needle=spec)
    spec = NeedleSpec(lengths=(64, 160), depths=(0.0, 0.5, 1.0), trials=1, dual_chunk_length=96)
    ppl, found = run(
        tmp_path / "ckpt", corpus, spool_dir=tmp_path / "s1", seq_length=64, max_windows=4,
        needle=spec, run_name="needle", tracking_uri=uri,
    )  # fmt: skip
    assert found.accuracy().shape == (2, 3) and len(found.trials) == 6
    assert all(t.answer for t in found.trials)  # the model answered every prompt
    client = mlflow.MlflowClient(uri)
    (logged,) = client.search_runs(
        [client.get_experiment_by_name("upcycle").experiment_id], "run_name = 'needle'"
    )
    metrics = logged.data.metrics
    assert metrics["perplexity"] == pytest.approx(ppl.perplexity)
    for length in (64, 160):
        for depth in ("0", "0.5", "1"):
            assert metrics[f"niah/len_{length}/depth_{depth}"] in (0.0, 1.0)
    assert metrics["niah_accuracy"] == pytest.approx(float(np.mean(found.accuracy())))
    assert logged.data.params["niah.dual_chunk_length"] == "96"
    files = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {"needle_heatmap.png", "needle_trials.json"} <= files
