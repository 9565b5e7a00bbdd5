"""Upcycling dense -> MoE: function preservation, the qwen2 method's slices, bad input, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from upcycle.config import ConfigError, from_name
from upcycle.dense.hf_weights import hf_shapes, to_hf, to_megatron
from upcycle.jobs.cli import app
from upcycle.moe.model import build_model
from upcycle.moe.upcycling import UpcycleSettings, copies_needed, upcycle_hf, upcycle_mlp
from upcycle.platform.checkpoint import load_checkpoint, load_state, save_checkpoint
from upcycle.platform.distributed import single_process

DENSE = from_name("tiny-dense")  # ffn 256
MOE = from_name("tiny-moe")  # 8 experts of 64, top-2, shared 256


@pytest.fixture(scope="module")
def dense_model():
    with single_process(seed=11):
        return build_model(DENSE).eval()


def upcycled_state(dense_model, moe, settings):
    """The MoE state dict the converter produces from `dense_model` (megatron-core names)."""
    state = {k: v for k, v in dense_model.state_dict().items() if isinstance(v, torch.Tensor)}
    hf = to_hf(DENSE, state)
    return to_megatron(
        moe, dict(upcycle_hf(hf.__getitem__, hf_shapes(DENSE), DENSE, moe, settings))
    )


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)


@pytest.mark.parametrize(
    ("method", "moe"),
    [
        (
            "sparse",
            MOE.replace(
                moe_ffn_hidden_size=256, shared_expert_ffn_hidden_size=0, norm_topk_prob=True
            ),
        ),
        (
            "granular",
            MOE.replace(shared_expert_ffn_hidden_size=0, norm_topk_prob=True, moe_top_k=4),
        ),
    ],
)
def test_sparse_and_granular_preserve_the_dense_function(dense_model, method, moe):
    """Exact when the chosen experts' weights sum to 1 (norm_topk_prob) and there is no shared
    expert (a second FFN); granular needs top-k to be a multiple of G = 256/64 = 4."""
    upcycled = build_model(moe).eval()
    load_state(upcycled, upcycled_state(dense_model, moe, UpcycleSettings(method, seed=5)))
    tokens = torch.randint(0, 151_000, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = logits(dense_model, tokens)
    assert (logits(upcycled, tokens) - ref).abs().max() < 1e-5 * ref.abs().max()


def dense_ffn(layer: int, model):
    sd = model.state_dict()
    fc1 = sd[f"decoder.layers.{layer}.mlp.linear_fc1.weight"]
    return fc1[:256], fc1[256:], sd[f"decoder.layers.{layer}.mlp.linear_fc2.weight"]


def test_qwen2_experts_are_permuted_slices_of_the_dense_ffn(dense_model):
    gate, up, down = dense_ffn(1, dense_model)
    out = upcycle_mlp(
        torch.cat([gate, up]),
        down,
        DENSE,
        MOE,
        UpcycleSettings("qwen2", seed=3, reinit_fraction=0.0),
        layer=1,
    )
    assert copies_needed(DENSE, MOE) == 2  # 8 * 64 / 256
    used = []
    x = torch.randn(5, 64)
    for e in range(8):
        fc1 = out[f"experts.local_experts.{e}.linear_fc1.weight"]
        fc2 = out[f"experts.local_experts.{e}.linear_fc2.weight"]
        # Each expert gate row is one dense unit; its up row and down column are the same unit's.
        units = [int((gate == row).all(dim=1).nonzero()) for row in fc1[:64]]
        assert fc1[64:].equal(up[units]) and fc2.equal(down[:, units])
        assert len(set(units)) == 64
        used.append(units)
        expert = F.linear(F.silu(F.linear(x, fc1[:64])) * F.linear(x, fc1[64:]), fc2)
        sliced = F.linear(F.silu(x @ gate[units].T) * (x @ up[units].T), down[:, units])
        assert torch.allclose(expert, sliced, atol=1e-6)
    # Two copies, each a permutation of all 256 units, cut into four experts each.
    assert sorted(sum(used[:4], [])) == list(range(256)) == sorted(sum(used[4:], []))
    assert used[:4] != [list(range(i * 64, i * 64 + 64)) for i in range(4)]  # shuffled


def test_qwen2_reinit_fraction_seed_and_shared_expert(dense_model):
    gate, up, down = dense_ffn(0, dense_model)
    fc1 = torch.cat([gate, up])
    kept = upcycle_mlp(
        fc1, down, DENSE, MOE, UpcycleSettings("qwen2", seed=3, reinit_fraction=0.0), layer=0
    )
    half = upcycle_mlp(
        fc1, down, DENSE, MOE, UpcycleSettings("qwen2", seed=3, reinit_fraction=0.5), layer=0
    )
    again = upcycle_mlp(
        fc1, down, DENSE, MOE, UpcycleSettings("qwen2", seed=3, reinit_fraction=0.5), layer=0
    )
    other = upcycle_mlp(
        fc1, down, DENSE, MOE, UpcycleSettings("qwen2", seed=4, reinit_fraction=0.5), layer=0
    )
    for name in kept:
        assert half[name].numpy().tobytes() == again[name].numpy().tobytes()  # byte-identical
        if ".local_experts." in name:
            changed = (half[name] != kept[name]).float().mean().item()
            assert changed == pytest.approx(0.5, abs=0.01), name
            assert not half[name].equal(other[name])
    fresh = half["experts.local_experts.0.linear_fc1.weight"][
        half["experts.local_experts.0.linear_fc1.weight"]
        != kept["experts.local_experts.0.linear_fc1.weight"]
    ]
    assert fresh.std().item() == pytest.approx(DENSE.init_std, rel=0.1)
    # Shared expert (256 wide = the dense FFN): the dense FFN itself; its gate and the router fresh.
    assert half["shared_experts.linear_fc1.weight"].equal(fc1)
    assert half["shared_experts.linear_fc2.weight"].equal(down)
    assert half["router.weight"].shape == (8, 64) and half["shared_experts.gate_weight"].shape == (
        1,
        64,
    )


def test_wider_shared_expert_starts_with_the_dense_units():
    fc1, fc2 = torch.randn(512, 64), torch.randn(64, 256)
    out = upcycle_mlp(
        fc1, fc2, DENSE, MOE.replace(shared_expert_ffn_hidden_size=320), UpcycleSettings(), layer=0
    )
    shared1, shared2 = (
        out["shared_experts.linear_fc1.weight"],
        out["shared_experts.linear_fc2.weight"],
    )
    assert shared1.shape == (640, 64) and shared2.shape == (64, 320)
    assert shared1[:256].equal(fc1[:256]) and shared1[320:576].equal(fc1[256:])
    assert shared2[:, :256].equal(fc2)


@pytest.mark.parametrize(
    ("moe", "settings", "field", "words"),
    [
        (
            MOE.replace(hidden_size=128, num_attention_heads=4),
            UpcycleSettings(),
            "to.hidden_size",
            "does not match",
        ),
        (MOE.replace(num_layers=3), UpcycleSettings(), "to.num_layers", "does not match"),
        (
            MOE.replace(moe_ffn_hidden_size=96),
            UpcycleSettings("granular"),
            "to.moe_ffn_hidden_size",
            "divide",
        ),
        (MOE.replace(moe_top_k=2), UpcycleSettings("granular"), "to.moe_top_k", "multiples of G"),
        (MOE, UpcycleSettings("sparse"), "to.moe_ffn_hidden_size", "copies the whole FFN"),
        (DENSE, UpcycleSettings(), "to", "is dense"),
    ],
)
def test_bad_pairs_are_refused_before_anything_is_written(
    tmp_path, dense_model, moe, settings, field, words
):
    src = save_checkpoint(dense_model, DENSE, tmp_path / "dense")
    (tmp_path / "target.json").write_text(json.dumps(moe.to_dict()))
    from upcycle.jobs.convert import convert

    with pytest.raises(ConfigError, match=words) as e:
        convert(str(src), str(tmp_path / "target.json"), tmp_path / "out", settings)
    assert e.value.field == field
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="method: 'moefy' is not a method"):
        UpcycleSettings("moefy")


def test_convert_cli_writes_a_verified_moe_checkpoint_with_lineage(
    ray_cluster, tmp_path, dense_model
):
    src = save_checkpoint(dense_model, DENSE, tmp_path / "dense")
    run = CliRunner().invoke(
        app,
        ["convert", str(tmp_path / "moe"), "--from", str(src), "--to", "tiny-moe", "--seed", "7"],
    )
    assert run.exit_code == 0, run.output
    lineage = json.loads((tmp_path / "moe" / "lineage.json").read_text())
    assert lineage["method"] == "qwen2" and lineage["settings"]["seed"] == 7
    assert lineage["source_model"] == "tiny-dense" and len(lineage["source_sha256"]) == 64
    moe = build_model(MOE)
    load_checkpoint(moe, tmp_path / "moe")  # verifies the manifest
    sd = moe.state_dict()
    assert sd["decoder.layers.0.self_attention.linear_qkv.weight"].equal(
        dense_model.state_dict()["decoder.layers.0.self_attention.linear_qkv.weight"]
    )
    again = CliRunner().invoke(
        app, ["convert", str(tmp_path / "moe"), "--from", str(src), "--to", "tiny-moe"]
    )
    assert again.exit_code == 2 and "not empty" in again.output


def test_dry_run_prints_the_published_counts():
    run = CliRunner().invoke(
        app, ["convert", "--from", "qwen2-7b", "--to", "qwen2-57b-a14b", "--dry-run"]
    )
    assert run.exit_code == 0, run.output
    assert "57,408,658,944 total / 14,249,270,784 active" in " ".join(run.output.split())


@pytest.mark.slow
def test_continued_training_starts_at_the_dense_loss_and_lowers_it(corpus, tmp_path, dense_model):
    """sparse upcycling, then the Ray training job (EP=2): step 1 has the dense model's loss."""
    import dataclasses

    import mlflow
    from training_reference import TRAIN, run_locally

    from upcycle.config import Layout
    from upcycle.jobs.convert import convert
    from upcycle.platform.tracking import spooled_metrics
    from upcycle.training.job import TrainJob
    from upcycle.training.ray_train import fit

    moe_cfg = MOE.replace(
        moe_ffn_hidden_size=256, shared_expert_ffn_hidden_size=0, norm_topk_prob=True
    )
    (tmp_path / "moe.json").write_text(json.dumps(moe_cfg.to_dict()))
    src = save_checkpoint(dense_model, DENSE, tmp_path / "dense")
    convert(
        str(src), str(tmp_path / "moe.json"), tmp_path / "moe", UpcycleSettings("sparse", seed=2)
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    train = dataclasses.replace(TRAIN, steps=6, lr=3e-3)
    layout = Layout(micro_batch_size=2, global_batch_size=8)
    dense_job = TrainJob(model=DENSE, data=str(corpus), layout=layout, train=train, init_from=str(src),
                         tracking_uri=uri, tracking_dir=str(tmp_path / "dense-tracking"))  # fmt: skip
    dense = run_locally(dense_job, tmp_path / "dense-run")
    job = TrainJob(model=moe_cfg, data=str(corpus), layout=dataclasses.replace(layout, ep=2),
                   train=train, init_from=str(tmp_path / "moe"), name="upcycled", tracking_uri=uri)  # fmt: skip
    assert fit(job, num_workers=2, storage_path=tmp_path).error is None
    moe = spooled_metrics(tmp_path / "upcycled" / "tracking")
    assert moe[1]["lm_loss"] == pytest.approx(dense[1]["lm_loss"], rel=1e-5)  # function preserved
    assert moe[6]["lm_loss"] < moe[1]["lm_loss"] - 0.05  # and it learns
    mlflow.set_tracking_uri(uri)
    (run,) = mlflow.search_runs(
        experiment_names=["upcycle"],
        filter_string="tags.mlflow.runName = 'upcycled'",
        output_format="list",
    )
    assert run.data.tags["upcycled.method"] == "sparse" and run.data.tags["upcycled.seed"] == "2"
    assert (
        run.data.tags["upcycled.source_sha256"]
        == json.loads((tmp_path / "moe" / "lineage.json").read_text())["source_sha256"]
    )


def test_transformers_qwen2_in_qwen2_moe_out_loads_in_transformers(ray_cluster, tmp_path):
    """A transformers Qwen2 folder upcycled (granular, exact) into a sharded folder that
    transformers loads as Qwen2MoeForCausalLM with the dense model's logits; the same conversion
    into our format holds the same weights."""
    from conftest import tiny_qwen2
    from transformers import AutoModelForCausalLM

    from upcycle.jobs.convert import convert

    dense = tiny_qwen2(tmp_path / "dense", tie=False)  # vocab 512, ffn 96, hidden 64
    moe = from_name("tiny-moe").replace(
        vocab_size=512, tie_embeddings=False, moe_ffn_hidden_size=48, num_experts=4, moe_top_k=2,
        shared_expert_ffn_hidden_size=0, norm_topk_prob=True, max_position_embeddings=256,
    )  # fmt: skip
    (tmp_path / "moe.json").write_text(json.dumps(moe.to_dict()))
    settings = UpcycleSettings("granular", seed=4)
    convert(str(tmp_path / "dense"), str(tmp_path / "moe.json"), tmp_path / "hf", settings,
            hf_dtype=torch.float32, max_shard_bytes=100_000)  # fmt: skip
    assert len(list((tmp_path / "hf").glob("model-*-of-*.safetensors"))) > 3  # streamed shards
    upcycled = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(upcycled).__name__ == "Qwen2MoeForCausalLM"
    assert json.loads((tmp_path / "hf" / "lineage.json").read_text())["method"] == "granular"
    tokens = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = dense(tokens).logits, upcycled(tokens).logits
    assert (got - want).abs().max() < 1e-4 * want.abs().max()

    run = CliRunner().invoke(app, ["convert", str(tmp_path / "ours"), "--from", str(tmp_path / "dense"), "--to", str(tmp_path / "moe.json"), "--method", "granular", "--seed", "4"])  # fmt: skip
    assert run.exit_code == 0, run.output
    ours = build_model(moe).eval()
    load_checkpoint(ours, tmp_path / "ours")
    assert torch.allclose(logits(ours, tokens), got, atol=1e-5)
