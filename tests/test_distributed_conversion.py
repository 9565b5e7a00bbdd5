"""Conversion on a group of ranks (Ray actors, one process each): upcycling, import-hf and
export-hf, each rank building, reading and writing only its shard. Proven against the
one-process conversions tensor by tensor, and against transformers' logits.

One group of 4 ranks serves every layout here (each job makes a fresh process group over the
first `world` actors), so the actors start and import megatron-core once.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from conftest import logits_of, randomise, tiny_qwen2, tiny_qwen2_moe
from safetensors.torch import save_file
from typer.testing import CliRunner

from upcycle.config import ConfigError, Layout, from_name
from upcycle.conversion.budget import upcycle_budget
from upcycle.conversion.distributed import export_on_ranks, import_on_ranks
from upcycle.conversion.group import RankFailed, RankGroup
from upcycle.conversion.hf_interop import model_from_hf
from upcycle.conversion.shards import all_coords, check_layout
from upcycle.dense.hf_weights import CheckpointError
from upcycle.jobs import convert as job
from upcycle.jobs.cli import app
from upcycle.moe.model import build_model
from upcycle.moe.upcycling import UpcycleSettings
from upcycle.platform.checkpoint import load_checkpoint, read_model_config, save_checkpoint

DENSE = from_name("tiny-dense")  # ffn 256, 4 heads, 2 KV heads
MOE = from_name("tiny-moe")  # 8 experts of 64, top-2, shared 256
TARGETS = {  # qwen2's target adds 128 vocabulary rows (as 7B -> 57B cuts 128): fresh ones
    "qwen2": MOE.replace(vocab_size=MOE.vocab_size + 128),
    "granular": MOE.replace(shared_expert_ffn_hidden_size=0, norm_topk_prob=True, moe_top_k=4),
    "sparse": MOE.replace(moe_ffn_hidden_size=256, shared_expert_ffn_hidden_size=0),
}
LAYOUTS = {  # (layout, ranks)
    "tp2xep2": (Layout(tp=2, ep=2), 4),
    "pp2": (Layout(pp=2), 2),
    "ep4": (Layout(ep=4, etp=1), 4),
}


@pytest.fixture(scope="module")
def group(ray_cluster):
    # half a CPU per rank: the session's test cluster has 4 CPUs and an earlier module may
    # still hold one; a short wait, so a cluster that cannot place them fails fast
    with RankGroup(4, cpus_per_rank=0.5, wait_s=60) as g:
        yield g


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    model = randomise(build_model(DENSE), seed=3, std=0.05)
    return save_checkpoint(model, DENSE, tmp_path_factory.mktemp("dense") / "ckpt")


def _tensors(cfg, path):
    model = build_model(cfg)
    load_checkpoint(model, path)
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("method", list(TARGETS))
def test_upcycling_on_ranks_equals_one_process(group, dense_ckpt, tmp_path, method):
    """Every layout's output equals the one-process conversion, tensor by tensor (exact)."""
    target = tmp_path / "moe.json"
    target.write_text(json.dumps(TARGETS[method].to_dict()))
    settings = UpcycleSettings(method, seed=5)
    job.convert(str(dense_ckpt), str(target), tmp_path / "one", settings)
    want = _tensors(TARGETS[method], tmp_path / "one")
    for name, (layout, world) in LAYOUTS.items():
        out = tmp_path / name
        _, reports = job.on_ranks(str(dense_ckpt), str(target), out, settings, layout, world,
                                  group=group)  # fmt: skip
        assert [r.rank for r in reports] == list(range(world))
        got = _tensors(TARGETS[method], out)
        assert got.keys() == want.keys()
        assert [k for k in want if not torch.equal(got[k], want[k])] == [], name
        lineage = json.loads((out / "lineage.json").read_text())
        assert lineage == json.loads((tmp_path / "one" / "lineage.json").read_text())
        if name == "tp2xep2":  # TP halves the embedding, the largest piece of a tiny model
            whole = sum(v.numel() * 4 for v in want.values())
            assert max(r.bytes_held for r in reports) < 0.6 * whole


def test_transformers_source_on_ranks_then_export_at_another_layout(group, tmp_path):
    """A transformers Qwen2 folder upcycled on 4 ranks (TP2 x EP2, reading slices) equals the
    one-process conversion; exported on 2 ranks (EP2), transformers loads it with our logits."""
    from transformers import AutoModelForCausalLM

    tiny_qwen2(tmp_path / "dense", tie=False)  # vocab 512, ffn 96, 4 heads, 2 KV heads
    moe = MOE.replace(vocab_size=512, tie_embeddings=False, moe_ffn_hidden_size=48,
                      num_experts=4, max_position_embeddings=256)  # fmt: skip
    (tmp_path / "moe.json").write_text(json.dumps(moe.to_dict()))
    settings = UpcycleSettings("qwen2", seed=9)
    src, target = str(tmp_path / "dense"), str(tmp_path / "moe.json")
    job.convert(src, target, tmp_path / "one", settings)
    _, reports = job.on_ranks(src, target, tmp_path / "ranks", settings, Layout(tp=2, ep=2), 4,
                              group=group)  # fmt: skip
    want = _tensors(moe, tmp_path / "one")
    got = _tensors(moe, tmp_path / "ranks")
    assert [k for k in want if not torch.equal(got[k], want[k])] == []
    dense_bytes = sum(p.stat().st_size for p in (tmp_path / "dense").glob("*.safetensors"))
    assert all(r.bytes_read < 0.75 * dense_bytes for r in reports)  # TP slices, not the whole

    export_on_ranks(tmp_path / "ranks", tmp_path / "hf", Layout(ep=2), 2, dtype=torch.float32,
                    max_shard_bytes=200_000, group=group)  # fmt: skip
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ours = build_model(moe).eval()
    load_checkpoint(ours, tmp_path / "one")
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(theirs(tokens).logits, logits_of(ours, tokens), atol=1e-5)


def test_import_and_export_on_ranks_round_trip_transformers_moe(group, tmp_path):
    """import-hf on 2 and on 4 ranks, export-hf on the other count: logits equal transformers';
    a rank reads only its own experts' tensors, and only its expert-TP rows of them."""
    from transformers import AutoModelForCausalLM

    reference = tiny_qwen2_moe(tmp_path / "hf", seed=4)  # 8 experts of 32, shared 80
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = reference(tokens).logits
    cfg, two = import_on_ranks(tmp_path / "hf", tmp_path / "two", Layout(ep=2), 2, group=group)
    _, four = import_on_ranks(tmp_path / "hf", tmp_path / "four", Layout(tp=2, ep=2), 4,
                              group=group)  # fmt: skip
    for ckpt in ("two", "four"):
        ours = build_model(cfg).eval()
        load_checkpoint(ours, tmp_path / ckpt)
        assert torch.allclose(logits_of(ours, tokens), want, atol=1e-5)
    # the packed expert layout (gate_up_proj [E, 2I, H], down_proj [E, H, I]) sliced alike
    (tmp_path / "packed").mkdir()
    (tmp_path / "packed" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()},
              tmp_path / "packed" / "model.safetensors")  # fmt: skip
    _, packed = import_on_ranks(tmp_path / "packed", tmp_path / "from-packed", Layout(tp=2, ep=2),
                                4, group=group)  # fmt: skip
    assert packed[3].expert_reads[0][0].endswith("mlp.experts.gate_up_proj")
    want_tensors = _tensors(cfg, tmp_path / "four")
    got = _tensors(cfg, tmp_path / "from-packed")
    assert all(torch.equal(got[k], v) for k, v in want_tensors.items())
    for report in four:  # experts 4 per EP rank, rows split between the 2 expert-TP ranks
        c = report.coords
        experts = {int(name.split(".")[5]) for name, _ in report.expert_reads}
        assert experts == set(range(4 * c.ep_rank, 4 * c.ep_rank + 4))
        gate_rows = {
            idx[0] for name, idx in report.expert_reads if name.endswith("gate_proj.weight")
        }
        assert gate_rows == {(16 * c.etp_rank, 16 * c.etp_rank + 16)}
    # no dtype given: the checkpoint's own (fp32), so the round trip is exact
    _, dtype, _ = export_on_ranks(tmp_path / "two", tmp_path / "back-from-two", Layout(tp=2, ep=2),
                                  4, group=group)  # fmt: skip
    assert dtype == torch.float32
    export_on_ranks(tmp_path / "four", tmp_path / "back-from-four", Layout(pp=2), 2, group=group)
    for back in ("back-from-two", "back-from-four"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / back, dtype=torch.float32).eval()
        with torch.no_grad():
            assert torch.allclose(model(tokens).logits, want, atol=1e-5)


def test_reward_model_import_and_export_on_ranks(group, tmp_path):
    """A Qwen2ForSequenceClassification imported on 2 ranks (TP2: each holds the whole score
    row) and exported from 2 (PP2: the last stage writes `score.weight`) scores as transformers
    does."""
    from transformers import AutoModelForSequenceClassification

    from upcycle.conversion.hf_interop import transformers_twin
    from upcycle.platform.distributed import single_process

    cfg = DENSE.as_reward_model()
    with single_process(seed=5):
        model = randomise(build_model(cfg), seed=5, std=0.05).eval()
    reference = transformers_twin(cfg, model, tmp_path / "hf")
    tokens = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = reference(tokens).logits[:, 0]  # the score at the last token
    imported, _ = import_on_ranks(tmp_path / "hf", tmp_path / "ckpt", Layout(tp=2), 2, group=group)
    assert imported.is_reward_model
    ours = build_model(imported).eval()
    load_checkpoint(ours, tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.allclose(ours(tokens, torch.arange(16)[None], None)[:, -1, 0], want, atol=1e-5)
    export_on_ranks(tmp_path / "ckpt", tmp_path / "back", Layout(pp=2), 2, group=group)
    back = AutoModelForSequenceClassification.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert torch.allclose(back(tokens).logits[:, 0], want, atol=1e-5)


def test_bad_input_is_refused_before_any_rank_starts(tmp_path, dense_ckpt):
    with pytest.raises(
        ConfigError, match=r"layout.ep: num_experts \(8\) must be divisible by ep \(3\)"
    ):
        check_layout(MOE, Layout(ep=3), 3)
    with pytest.raises(ConfigError, match="layout.vpp"):
        check_layout(MOE, Layout(pp=2, vpp=2), 2)
    tiny_qwen2_moe(tmp_path / "hf", seed=2)
    index = tmp_path / "hf" / "model.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(index)
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, index)
    with pytest.raises(CheckpointError, match="missing 1 tensor.*experts.3.up_proj"):
        import_on_ranks(tmp_path / "hf", tmp_path / "out", Layout(ep=2), 2)  # no group needed
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    run = CliRunner().invoke(app, ["convert", str(tmp_path / "taken"), "--from", str(dense_ckpt),
                                   "--to", "tiny-moe", "--workers", "2", "--layout", "ep=2"])  # fmt: skip
    assert run.exit_code == 2 and "not empty" in run.output
    run = CliRunner().invoke(app, ["convert", str(tmp_path / "new"), "--from", str(dense_ckpt),
                                   "--to", "tiny-moe", "--workers", "2", "--layout", "ep=3"])  # fmt: skip
    assert run.exit_code == 2 and "layout.ep" in run.output


def test_dry_run_sizes_every_rank_of_the_57b_conversion():
    """qwen2-7b -> qwen2-57b-a14b at tp2 pp4 ep8 on 64 ranks: every parameter is written once
    (fp32) in all, and no rank holds 1/16 of the model (1/64 of it, plus what a rank holds whole
    and the save's copies)."""
    moe, dense = from_name("qwen2-57b-a14b"), from_name("qwen2-7b")
    layout = check_layout(moe, Layout(tp=2, pp=4, ep=8), 64)
    coords = all_coords(layout)
    assert len({(c.tp_rank, c.pp_rank, c.dp_rank) for c in coords}) == 64
    budget = upcycle_budget(dense, moe, layout)
    assert sum(b.writes for b in budget) == 57_408_658_944 * 4
    assert max(b.holds for b in budget) < 57_408_658_944 * 4 / 16
    run = CliRunner().invoke(app, ["convert", "--from", "qwen2-7b", "--to", "qwen2-57b-a14b",
                                   "--dry-run", "--workers", "64", "--layout", "tp=2,pp=4,ep=8"])  # fmt: skip
    assert run.exit_code == 0, run.output
    assert "written in all: 213.86 GiB over 64 ranks" in run.output


def test_a_killed_rank_leaves_nothing_and_a_rerun_succeeds(group, tmp_path):
    """Kill rank 1 while the group converts: RankFailed names it, no output (nor staging
    folder) is left; the same command on a fresh group then succeeds. (Last in this module:
    the failure closes the shared group.)"""
    import ray

    tiny_qwen2_moe(tmp_path / "hf", seed=1)
    doomed = group
    result: dict = {}

    def convert():
        try:
            import_on_ranks(tmp_path / "hf", tmp_path / "out", Layout(ep=2), 2, group=doomed)
        except Exception as e:  # noqa: BLE001 - the test inspects it
            result["error"] = e

    worker = threading.Thread(target=convert)
    worker.start()
    while not list(tmp_path.glob(".out.tmp-*")):  # staged: the ranks have their job
        time.sleep(0.01)
    ray.kill(doomed.actors[1])
    worker.join(timeout=120)
    assert isinstance(result.get("error"), RankFailed) and result["error"].rank == 1
    assert "rank 1 of 2 failed" in str(result["error"])
    assert list(tmp_path.iterdir()) == [tmp_path / "hf"]  # no out, no hidden staging folder
    assert doomed._closed
    run = CliRunner().invoke(app, ["checkpoint", "import-hf", str(tmp_path / "hf"),
                                   str(tmp_path / "out"), "--workers", "2", "--layout", "ep=2"])  # fmt: skip
    assert run.exit_code == 0, run.output
    assert "per rank" in run.output and "imported hf (MoE)" in run.output
    cfg = read_model_config(tmp_path / "out")
    _, model = model_from_hf(tmp_path / "hf")
    got = _tensors(cfg, tmp_path / "out")  # verifies the manifest
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items() if k in got)
