"""Where `upcycle serve` finds a model: our checkpoints, transformers folders (imported once) and
MLflow references, with errors that name the `model` field. (Training runs resolving through
runs:/ and models:/ are proven in test_training_checkpoints.py on a real Ray training run.)"""

from __future__ import annotations

import pytest
from conftest import tiny_qwen2

from upcycle.config import ConfigError
from upcycle.conversion.hf_interop import import_hf
from upcycle.deploy.sources import resolve


def test_transformers_folder_is_imported_once(tmp_path):
    tiny_qwen2(tmp_path / "hf")
    first = resolve(str(tmp_path / "hf"), cache_dir=tmp_path / "cache")
    stamp = (first / "model.json").stat().st_mtime_ns
    again = resolve(str(tmp_path / "hf"), cache_dir=tmp_path / "cache")
    assert again == first and (again / "model.json").stat().st_mtime_ns == stamp


def test_our_checkpoint_is_verified(tmp_path):
    tiny_qwen2(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert resolve(str(tmp_path / "ckpt"), cache_dir=tmp_path) == tmp_path / "ckpt"
    shard = next(p for p in (tmp_path / "ckpt" / "weights").iterdir() if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ConfigError, match="^model: .* failed verification"):
        resolve(str(tmp_path / "ckpt"), cache_dir=tmp_path)


@pytest.mark.parametrize(
    "source,message",
    [
        ("/no/such/folder", "neither our checkpoint"),
        ("runs:/0123456789abcdef", "runs:/0123456789abcdef"),
        ("models:/never-registered/1", "models:/never-registered/1"),
        ("models:/never-registered", "models:/never-registered"),
    ],
)
def test_bad_sources_name_the_model_field(tmp_path, source, message):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(ConfigError, match=f"^model: .*{message}"):
        resolve(source, cache_dir=tmp_path, tracking_uri=uri)
