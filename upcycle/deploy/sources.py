"""Where a served model comes from: our checkpoint, a transformers folder, or MLflow.

`resolve(source)` always ends at one of our (verified) checkpoint folders, which every rank of a
replica can load its shard of:
- a folder with model.json: our checkpoint (a training checkpoint works too);
- a folder with config.json + safetensors: a transformers Qwen2 / Qwen2-MoE folder, imported once
  into `cache_dir` (keyed by the SHA-256 of its config and index);
- `runs:/RUN_ID`: the newest valid checkpoint of that MLflow run (training runs carry a
  `checkpoints` tag naming their checkpoint folder);
- `models:/NAME/VERSION`, `models:/NAME@ALIAS`, `models:/NAME` (latest version): a registered
  model version whose source is a checkpoint path or a `runs:/` URI (`upcycle runs register`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from upcycle.atomic import IntegrityError
from upcycle.config import ConfigError
from upcycle.dense import hf_io
from upcycle.platform.checkpoint import MODEL_CONFIG, newest_valid, read_model_config
from upcycle.platform.tracking import CHECKPOINTS_TAG


def default_cache_dir() -> Path:
    """Where imported transformers folders are kept: $UPCYCLE_CACHE or ~/.cache/upcycle."""
    return Path(os.environ.get("UPCYCLE_CACHE", "~/.cache/upcycle")).expanduser()


def resolve(source: str, *, cache_dir: Path, tracking_uri: str | None = None) -> Path:
    """Our checkpoint folder for `source` (see the module docstring); ConfigError("model", ...)
    says what was wrong."""
    if source.startswith("runs:/"):
        return _run_checkpoint(source.removeprefix("runs:/").strip("/"), tracking_uri)
    if source.startswith("models:/"):
        return _registered_checkpoint(source.removeprefix("models:/"), tracking_uri)
    path = Path(source).expanduser()
    if (path / MODEL_CONFIG).is_file():
        _verified(path)
        return path
    if (path / "config.json").is_file():
        return _imported(path, Path(cache_dir))
    raise ConfigError(
        "model",
        f"{source!r} is neither our checkpoint (a folder with {MODEL_CONFIG}), a transformers "
        "folder (config.json + safetensors), runs:/RUN_ID nor models:/NAME[/VERSION]",
    )


def _verified(ckpt: Path) -> Path:
    from upcycle.atomic import verify_manifest

    try:
        verify_manifest(ckpt)
    except IntegrityError as e:
        raise ConfigError("model", f"{ckpt} failed verification: {e}") from None
    read_model_config(ckpt)
    return ckpt


def _imported(hf_dir: Path, cache_dir: Path) -> Path:
    from upcycle.conversion.hf_interop import import_hf

    digest = hashlib.sha256()
    for name in ("config.json", hf_io.INDEX_FILE, hf_io.SINGLE_FILE):
        if (hf_dir / name).is_file():
            digest.update((hf_dir / name).read_bytes()[: 1 << 20])
    out = cache_dir / f"hf-{digest.hexdigest()[:16]}"
    if not (out / MODEL_CONFIG).is_file():
        import_hf(hf_dir, out)
    return _verified(out)


def _client(tracking_uri: str | None):
    from mlflow import MlflowClient

    from upcycle.platform.tracking import default_tracking_uri

    return MlflowClient(tracking_uri or default_tracking_uri())


def _run_checkpoint(run_id: str, tracking_uri: str | None) -> Path:
    from mlflow.exceptions import MlflowException

    try:
        run = _client(tracking_uri).get_run(run_id.split("/")[0])
    except MlflowException as e:
        raise ConfigError("model", f"runs:/{run_id}: {e.message}") from None
    folder = run.data.tags.get(CHECKPOINTS_TAG)
    if not folder:
        raise ConfigError(
            "model", f"run {run.info.run_id} has no {CHECKPOINTS_TAG!r} tag (not a training run?)"
        )
    found = newest_valid(sorted(Path(folder).glob("step_*[0-9]")))
    if found is None:
        raise ConfigError("model", f"run {run.info.run_id}: no valid checkpoint under {folder}")
    return found


def _registered_checkpoint(ref: str, tracking_uri: str | None) -> Path:
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        elif "/" in ref:
            name, number = ref.split("/", 1)
            version = client.get_model_version(name, number)
        else:
            versions = client.search_model_versions(f"name = '{ref}'")
            if not versions:
                raise ConfigError("model", f"models:/{ref}: no versions registered")
            version = max(versions, key=lambda v: int(v.version))
    except MlflowException as e:
        raise ConfigError("model", f"models:/{ref}: {e.message}") from None
    if version.source.startswith("runs:/"):
        return _run_checkpoint(version.source.removeprefix("runs:/"), tracking_uri)
    return _verified(Path(version.source))


def register(run_id: str, name: str, *, tracking_uri: str | None = None) -> tuple[str, Path]:
    """Register the newest checkpoint of training run `run_id` as a new version of model `name`;
    returns (version, checkpoint)."""
    ckpt = _run_checkpoint(run_id, tracking_uri)
    client = _client(tracking_uri)
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    version = client.create_model_version(name, source=str(ckpt), run_id=run_id)
    return version.version, ckpt
