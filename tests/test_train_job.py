"""A training job is checked before any Ray actor starts; errors name the field and the fix."""

from __future__ import annotations

import dataclasses
import time

import pytest
from typer.testing import CliRunner

from upcycle import runtime
from upcycle.config import ConfigError, Layout, from_name
from upcycle.jobs.cli import app
from upcycle.runtime import MissingDependencyError
from upcycle.train_config import TrainConfig
from upcycle.training.job import TrainJob
from upcycle.training.ray_train import fit


@pytest.fixture
def job(corpus):
    return TrainJob(model=from_name("tiny-moe"), data=str(corpus))


@pytest.mark.parametrize(
    ("layout", "workers", "field", "words"),
    [
        (Layout(tp=3), 3, "layout.tp", "allowed tp"),
        (Layout(tp=2), 3, "layout", r"not divisible by tp\*pp"),
        (Layout(ep=3), 3, "layout.ep", "allowed ep"),
        (Layout(tp=2), 2, "layout.sequence_parallel", "must be true"),
        (Layout(tp=2, etp=1, sequence_parallel=True), 2, "layout.etp", "needs ep > 1"),
        (Layout(pp=4), 4, "layout.pp", "divisible by pp"),
        (
            Layout(micro_batch_size=2, global_batch_size=6),
            2,
            "layout.global_batch_size",
            "multiple",
        ),
    ],
)
def test_bad_layout_fails_before_any_worker_starts(job, tmp_path, layout, workers, field, words):
    began = time.perf_counter()
    with pytest.raises(ConfigError, match=words) as e:
        fit(dataclasses.replace(job, layout=layout), num_workers=workers, storage_path=tmp_path)
    assert e.value.field == field
    assert time.perf_counter() - began < 5  # a worker group takes ~20 s to start
    assert not (tmp_path / job.name).exists()


def test_fp8_needs_a_gpu_and_bf16_a_bf16_cpu(job, tmp_path, monkeypatch):
    with pytest.raises(MissingDependencyError, match="train.fp8='hybrid'"):
        fit(
            dataclasses.replace(job, train=TrainConfig(fp8="hybrid")),
            num_workers=1,
            storage_path=tmp_path,
        )
    # a CPU without AVX512-BF16/AMX is what this stands in for (this machine has AMX)
    monkeypatch.setattr(runtime, "bf16_supported", lambda: False)
    with pytest.raises(ConfigError, match="train.dtype: bf16 needs a CUDA GPU or a CPU"):
        fit(
            dataclasses.replace(job, train=TrainConfig(dtype="bf16")),
            num_workers=1,
            storage_path=tmp_path,
        )


def test_spec_errors_name_the_field(tmp_path, corpus):
    cases = {
        "layout:\n  tq: 2\n": "layout.tq: unknown field",
        "train:\n  lr: -1\n": "train.lr",
        "train:\n  token_dispatcher: flex\n": "train.token_dispatcher: 'flex'; allowed",
        "train:\n  seq_length: 100000\n": "train.seq_length: 100000 exceeds",
        "model: qwen3\n": "qwen3",
        "modle: tiny-moe\n": "modle: unknown field",
    }
    for body, message in cases.items():
        spec = tmp_path / "job.yaml"
        base = "" if body.startswith("mod") else "model: tiny-dense\n"
        spec.write_text(f"{base}data: {corpus}\n{body}")
        result = CliRunner().invoke(app, ["train", str(spec), "--storage", str(tmp_path)])
        assert result.exit_code == 2, body
        assert message in " ".join(result.output.split()), (body, result.output)
