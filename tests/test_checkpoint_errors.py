"""Bad checkpoints get clear errors; writes are atomic; corrupted or unsafe checkpoints are refused."""

from __future__ import annotations

import pickle

import pytest
import torch
from conftest import tiny_qwen2, tiny_qwen2_moe
from safetensors.torch import load_file, save_file

from upcycle.atomic import IntegrityError, atomic_directory
from upcycle.config import ConfigError
from upcycle.conversion.hf_interop import export_hf, import_hf, model_from_hf
from upcycle.dense.hf_weights import CheckpointError


def _rewrite(folder, change):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
    tiny_qwen2(tmp_path)
    _rewrite(
        tmp_path,
        lambda t: t.update({"model.layers.1.self_attn.k_proj.weight": torch.zeros(16, 64)}),
    )
    with pytest.raises(
        CheckpointError,
        match=r"'model.layers.1.self_attn.k_proj.weight' has shape \(16, 64\).*expects \(32, 64\)",
    ):
        model_from_hf(tmp_path)


def test_missing_tensors_are_listed(tmp_path):
    tiny_qwen2_moe(tmp_path)

    def drop(t):
        del t["model.layers.0.mlp.shared_expert_gate.weight"]
        del t["model.norm.weight"]

    _rewrite(tmp_path, drop)
    with pytest.raises(
        CheckpointError, match="missing 2 tensor.*shared_expert_gate.*model.norm.weight"
    ):
        model_from_hf(tmp_path)


def test_unexpected_tensors_are_refused(tmp_path):
    tiny_qwen2(tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"model.layers.7.mlp.up_proj.weight": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match="does not: model.layers.7.mlp.up_proj.weight"):
        model_from_hf(tmp_path)


def test_pickle_checkpoint_is_refused_with_conversion_hint(tmp_path):
    hf = tiny_qwen2(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(
        CheckpointError, match="pytorch_model.bin.*refused.*safe_serialization=True"
    ):
        model_from_hf(tmp_path)


def test_unsupported_config_is_named(tmp_path):
    tiny_qwen2(tmp_path)
    text = (
        (tmp_path / "config.json")
        .read_text()
        .replace('"model_type": "qwen2"', '"model_type": "llama"')
    )
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match="model_type: 'llama' is not supported"):
        model_from_hf(tmp_path)


def test_failed_write_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 10)
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_failed_import_leaves_nothing_behind(tmp_path):
    tiny_qwen2(tmp_path / "hf")
    _rewrite(tmp_path / "hf", lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError):
        import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_existing_output_is_never_overwritten(tmp_path):
    tiny_qwen2(tmp_path / "hf")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "precious.txt").read_text() == "keep me"


@pytest.fixture
def checkpoint(tmp_path):
    tiny_qwen2(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_corrupted_checkpoint_is_detected(checkpoint, tmp_path):
    shard = sorted((checkpoint / "weights").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match its SHA-256"):
        export_hf(checkpoint, tmp_path / "out")
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(IntegrityError, match="bytes, the manifest says"):
        export_hf(checkpoint, tmp_path / "out")
    assert not (tmp_path / "out").exists()


class _Boom:
    def __reduce__(self):
        return (print, ("this would run code",))


def test_metadata_that_would_run_code_is_refused(checkpoint, tmp_path):
    """An attacker who rewrites the DCP metadata pickle and the manifest still cannot run code."""
    from upcycle.atomic import write_manifest

    (checkpoint / "weights" / ".metadata").write_bytes(pickle.dumps(_Boom()))
    write_manifest(checkpoint)
    with pytest.raises(CheckpointError, match="refusing to load builtins.print"):
        export_hf(checkpoint, tmp_path / "out")
