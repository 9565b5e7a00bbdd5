"""`upcycle plan`'s memory model against hand calculations (the formulas are in
upcycle/platform/plan.py), its parameter split against the built models, and its ranking."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from upcycle.config import PRESETS, Layout, from_name
from upcycle.jobs.cli import app
from upcycle.moe.model import build_on_meta
from upcycle.moe.params import count_parameters
from upcycle.platform.plan import GIB, Workload, memory, parameter_split, plans

WORK = Workload(seq_len=4096, micro_batch=1, global_batch=512)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_split_adds_up_to_the_built_model(name):
    cfg = from_name(name)
    dense, experts = parameter_split(cfg)
    assert dense + experts == count_parameters(build_on_meta(cfg), cfg).total_params


def test_qwen2_7b_by_hand():
    # tp 4, pp 2, dp 8 on 64 GPUs: 7,615,616,512 / 8 = 951,952,064 parameters per GPU.
    m = memory(from_name("qwen2-7b"), Layout(tp=4, pp=2, dp=8, sequence_parallel=True), WORK)
    assert m.params == 951_952_064
    assert (m.weights, m.grads, m.optimizer) == (1_903_904_128, 3_807_808_256, 11_423_424_768)
    assert m.optimizer_distributed == 12 * 951_952_064 // 8 == 1_427_928_096
    # per token and layer: attention 4*3584 + 2*4*128 = 15,360 values, SwiGLU 2*3584 + 3*18944
    # = 64,000; 2 B each, 4096 tokens, / tp 4, 28 layers
    assert m.activations == 2 * (15_360 + 64_000) * 4096 // 4 * 28 == 4_550_819_840
    assert m.activations_recompute == 2 * 3584 * 4096 // 4 * 28 == 205_520_896
    assert m.logits == 6 * 4096 * 152_064 // 4 == 934_281_216
    total = 1_903_904_128 + 3_807_808_256 + 1_427_928_096 + 4_550_819_840 + 934_281_216
    assert m.total(distributed_optimizer=True, recompute=False) == total  # 11.8 GiB


def test_qwen2_57b_a14b_by_hand():
    # routed experts: 28 layers x 64 x 3 x 3584 x 2560 = 49,325,015,040; the rest 8,083,643,904
    cfg = from_name("qwen2-57b-a14b")
    assert parameter_split(cfg) == (8_083_643_904, 49_325_015_040)
    layout = Layout(tp=2, pp=4, ep=8, etp=1, dp=8, sequence_parallel=True)
    m = memory(cfg, layout, WORK)
    # dense / (tp*pp) + experts / (ep*etp*pp)
    assert m.params == 8_083_643_904 // 8 + 49_325_015_040 // 32 == 2_551_862_208
    # expert dp = tp*dp / (ep*etp) = 2: the expert optimizer states shard only two ways
    assert m.optimizer_distributed == 12 * 1_010_455_488 // 8 + 12 * 1_541_406_720 // 2
    # MoE block: 2*3584 + 8*(3584 + 3*2560) + 3*20480 = 158,720 values per token
    assert m.activations == 2 * (15_360 + 158_720) * 4096 // 2 * 28 == 19_964_887_040
    assert m.logits == 6 * 4096 * 151_936 // 2


def test_plans_fit_and_are_ranked():
    found = plans(from_name("qwen2-57b-a14b"), gpus=64, gpu_memory_gib=80, work=WORK)
    assert len(found) > 10
    assert all(p.bytes <= 80 * GIB * 0.9 - GIB for p in found)
    times = [p.step_seconds for p in found]
    assert times == sorted(times)
    assert all(p.layout.tp * p.layout.pp * p.layout.dp == 64 for p in found)
    # a layout that does not fit is absent: everything on 8 GPUs without sharding experts
    assert not plans(from_name("qwen2-72b"), gpus=8, gpu_memory_gib=16, work=WORK)


def test_plan_command_prints_a_ranked_table():
    r = CliRunner().invoke(
        app, ["plan", "--model", "qwen2-57b-a14b", "--gpus", "64", "--gpu-memory", "80"]
    )
    assert r.exit_code == 0, r.output
    assert "layouts fit" in r.output and "tok/s/GPU" in r.output
    r = CliRunner().invoke(
        app, ["plan", "--model", "qwen2-72b", "--gpus", "8", "--gpu-memory", "16"]
    )
    assert r.exit_code == 2 and "no layout" in r.output
