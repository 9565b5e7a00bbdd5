"""Parameter counts of the full-size presets, built on the meta device, against the published
sizes (reference/qwen2.md) and a count by hand."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from upcycle.config import from_name
from upcycle.moe.model import build_on_meta
from upcycle.moe.params import count_parameters

PUBLISHED = {
    "qwen2-0.5b": (494_032_768, 494_032_768),
    "qwen2-1.5b": (1_543_714_304, 1_543_714_304),
    "qwen2-7b": (7_615_616_512, 7_615_616_512),
    "qwen2-72b": (72_706_203_648, 72_706_203_648),
    "qwen2-57b-a14b": (57_408_658_944, 14_249_270_784),
}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_counts_equal_published(preset):
    cfg = from_name(preset)
    counts = count_parameters(build_on_meta(cfg), cfg)
    assert (counts.total_params, counts.active_params) == PUBLISHED[preset]
    assert counts.bf16_bytes == 2 * counts.total_params


def test_qwen15_moe_counts_by_hand():
    """Published as 14.3B total / 2.7B activated; the exact figures by hand from the config."""
    h, layers, experts, k, fe, fs, vocab = 2048, 24, 60, 4, 1408, 5632, 151936
    attention = 4 * h * h + 3 * h  # q, k, v, o (16 kv heads = MHA) + q/k/v bias
    per_layer_fixed = (
        attention + 3 * h * fs + h + experts * h + 2 * h
    )  # shared, gate, router, norms
    expert = 3 * h * fe
    outer = 2 * vocab * h + h  # untied embedding and lm head, final norm
    total = layers * (per_layer_fixed + experts * expert) + outer
    active = layers * (per_layer_fixed + k * expert) + outer
    cfg = from_name("qwen1.5-moe-a2.7b")
    counts = count_parameters(build_on_meta(cfg), cfg)
    assert (counts.total_params, counts.active_params) == (total, active)
    assert round(total / 1e9, 1) == 14.3 and round(active / 1e9, 1) == 2.7


def test_cli_model_info_json():
    out = subprocess.run(
        [sys.executable, "-m", "upcycle.jobs.cli", "model", "info", "qwen2-57b-a14b", "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "total_params": 57_408_658_944,
        "active_params": 14_249_270_784,
        "bf16_bytes": 114_817_317_888,
    }


def test_cli_unknown_preset_is_a_clear_error():
    out = subprocess.run(
        [sys.executable, "-m", "upcycle.jobs.cli", "model", "info", "qwen3-7b"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 2
    assert "unknown preset 'qwen3-7b'" in out.stderr and "qwen2-57b-a14b" in out.stderr
