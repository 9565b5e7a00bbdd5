from __future__ import annotations

import pytest

from upcycle.config import PRESETS, ConfigError, Layout, ModelConfig, from_name


def test_presets_are_valid_and_named():
    assert {"qwen2-0.5b", "qwen2-1.5b", "qwen2-7b", "qwen2-72b", "qwen2-57b-a14b",
            "qwen1.5-moe-a2.7b", "tiny-dense", "tiny-moe"} <= set(PRESETS)  # fmt: skip
    moe = from_name("qwen2-57b-a14b")
    assert (moe.num_experts, moe.moe_top_k, moe.moe_ffn_hidden_size) == (64, 8, 2560)
    assert moe.shared_expert_ffn_hidden_size == 20480 and not moe.norm_topk_prob
    tiny = from_name("tiny-moe")
    assert (
        tiny.num_kv_heads < tiny.num_attention_heads
        and tiny.qkv_bias
        and tiny.shared_expert_ffn_hidden_size
    )


def test_unknown_preset_lists_the_valid_names():
    with pytest.raises(ConfigError, match="qwen2-7b.*tiny-moe|tiny-moe.*qwen2-7b"):
        from_name("qwen2-8b")


@pytest.mark.parametrize(
    "change,field,words",
    [
        (dict(hidden_size=65), "hidden_size", "not divisible by num_attention_heads"),
        (dict(num_kv_heads=3), "num_kv_heads", "allowed: [1, 2, 4]"),
        (dict(moe_top_k=9), "moe_top_k", "1..num_experts (8)"),
        (dict(moe_ffn_hidden_size=0), "moe_ffn_hidden_size", "positive"),
        (dict(ffn_hidden_size=128), "ffn_hidden_size", "must be 0 for a MoE model"),
        (dict(num_layers=0), "num_layers", "positive"),
    ],
)
def test_bad_model_config_names_field_and_fix(change, field, words):
    with pytest.raises(ConfigError) as e:
        from_name("tiny-moe").replace(**change)
    assert e.value.field == field and words in str(e.value)


def test_unknown_field_is_refused():
    with pytest.raises(ConfigError, match="unknown field"):
        ModelConfig.from_dict({**from_name("tiny-dense").to_dict(), "hiden_size": 3})
    with pytest.raises(ConfigError, match="unknown field"):
        from_name("tiny-dense").replace(num_expert=3)


def test_config_round_trips_through_json(tmp_path):
    cfg = from_name("qwen2-57b-a14b")
    cfg.save(tmp_path / "m.json")
    assert ModelConfig.load(tmp_path / "m.json") == cfg


def test_layout_derives_dp_and_checks_world_size():
    assert Layout(tp=2, pp=2).resolve(8).dp == 2
    with pytest.raises(ConfigError, match="not divisible by tp\\*pp = 4"):
        Layout(tp=2, pp=2).resolve(6)
    with pytest.raises(ConfigError, match="layout.dp"):
        Layout(tp=2, dp=3).resolve(4)
    with pytest.raises(ConfigError, match="global_batch_size"):
        Layout(micro_batch_size=2, global_batch_size=3).resolve(2)


@pytest.mark.parametrize(
    "layout,words",
    [
        (Layout(tp=3), "num_attention_heads (4) must be a multiple of tp (3)"),
        (Layout(tp=4, sequence_parallel=True), "num_kv_heads (2) must be a multiple of tp (4)"),
        (Layout(pp=3), "num_layers (2) must be divisible by pp*vpp (3)"),
        (Layout(ep=3), "num_experts (8) must be divisible by ep (3)"),
        (Layout(tp=2), "sequence_parallel: must be true when tp > 1 on a MoE model"),
    ],
)
def test_layout_that_does_not_divide_the_model(layout, words):
    with pytest.raises(
        ConfigError, match=words.replace("(", "\\(").replace(")", "\\)").replace("*", "\\*")
    ):
        layout.check_model(from_name("tiny-moe"))


def test_layout_accepts_a_fitting_model():
    Layout(tp=2, ep=2, sequence_parallel=True).check_model(from_name("tiny-moe"))
    with pytest.raises(ConfigError, match="dense"):
        Layout(ep=2).check_model(from_name("tiny-dense"))


def test_fp8_without_transformer_engine_fails_clearly():
    from upcycle.dense.megatron_config import to_transformer_config
    from upcycle.runtime import MissingDependencyError

    with pytest.raises(MissingDependencyError, match="fp8='hybrid' needs a CUDA GPU"):
        to_transformer_config(from_name("tiny-moe"), fp8="hybrid")
