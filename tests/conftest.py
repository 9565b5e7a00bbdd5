"""Shared fixtures: one megatron-core parallel state (one gloo rank) for the whole session, one
in-process Ray cluster, a prepared corpus of real text (the Python standard library), and tiny
transformers models built in the test (no downloads)."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

# Loopback only, no auth prompts, no usage reporting; slow 2-core CI needs a long start timeout.
os.environ.update(
    RAY_AUTH_MODE="disabled",
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
    RAY_USAGE_STATS_ENABLED="0",
    RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="180",
)

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")


@pytest.fixture(scope="session", autouse=True)
def megatron_state():
    from upcycle.platform.distributed import single_process

    with single_process():
        yield


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # socket paths must stay short
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        object_store_memory=300 * 1024**2,
        _temp_dir=temp,
        log_to_driver=False,
        # metrics reach the node's Prometheus endpoint within a second (default 10 s)
        _system_config={"metrics_report_interval_ms": 1000},
    )
    yield
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def corpus(ray_cluster, tmp_path_factory) -> Path:
    """~50k tokens of the standard library's source, prepared by the Ray Data job."""
    from upcycle.jobs.prepare import demo_corpus, prepare

    out = tmp_path_factory.mktemp("corpus") / "stdlib"
    prepare(demo_corpus()[:16], out, shard_tokens=20_000, progress=False)
    return out


@pytest.fixture(scope="session")
def references(corpus, tmp_path_factory):
    """Per tiny preset: (base job, single-process per-step metrics, its folder)."""
    from training_reference import reference_job, run_locally

    out = {}
    for name in ("tiny-dense", "tiny-moe"):
        root = tmp_path_factory.mktemp(name)
        job = reference_job(name, corpus, root)
        out[name] = (job, run_locally(job, root / "reference"), root)
    return out


@pytest.fixture(scope="session")
def text_model(tmp_path_factory) -> Path:
    """A tiny-moe checkpoint with the real Qwen2 vocabulary, so real text goes in and out;
    weights drawn wide enough (std 0.1) that greedy decoding does not just repeat one token."""
    from upcycle.config import from_name
    from upcycle.moe.model import build_model
    from upcycle.platform.checkpoint import save_checkpoint

    cfg = from_name("tiny-moe")
    out = tmp_path_factory.mktemp("text-model") / "ckpt"
    save_checkpoint(randomise(build_model(cfg), seed=0, std=0.1), cfg, out)
    return out


def randomise(model: torch.nn.Module, seed: int, std: float = 0.1) -> torch.nn.Module:
    """Give every parameter (norms and biases too) random values, so no mapping hides behind 0/1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def tiny_qwen2(
    tmp_path, *, tie=False, kv_heads=2, seed=0, rope_scaling=None, std=0.1
):  # fmt: skip
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, tie_word_embeddings=tie,
        rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=256,
        rope_scaling=rope_scaling,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = randomise(Qwen2ForCausalLM(cfg), seed, std)
    model.save_pretrained(tmp_path)
    return model


def tiny_qwen2_moe(tmp_path, *, norm_topk_prob: bool = False, layers: int = 2, seed: int = 0):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=80, num_experts=8, num_experts_per_tok=2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        norm_topk_prob=norm_topk_prob, rope_theta=1e6, max_position_embeddings=256,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = randomise(Qwen2MoeForCausalLM(cfg), seed, std=0.2)
    model.save_pretrained(tmp_path)
    return model


def positions(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1]).expand_as(tokens)


def logits_of(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, positions(tokens), None)


def slot_tables(slots: list[int], max_model_len: int, block_size: int = 16) -> list[list[int]]:
    """Block tables giving sequence "slot" s the blocks of a whole max_model_len sequence of its
    own (the pool a runner has by default: max_num_seqs such runs), for tests that feed
    `StepPlan`s by hand."""
    from upcycle.deploy.engine.blocks import blocks_for

    per = blocks_for(max_model_len, block_size)
    return [list(range(s * per, (s + 1) * per)) for s in slots]
