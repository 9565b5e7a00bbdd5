"""The Serve config file and the KubeRay RayService shipped in upcycle/deploy/ are valid: Ray's
own Serve schema accepts them, their `args` are valid serve specs, the builder they name exists,
and their engine layout fits the model they serve."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

import upcycle.deploy
from upcycle.config import ConfigError, from_name
from upcycle.deploy.spec import ServeSpec

DEPLOY = Path(upcycle.deploy.__file__).parent


def _serve_configs() -> dict[str, dict]:
    service = yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())
    assert service["kind"] == "RayService" and service["apiVersion"] == "ray.io/v1"
    return {
        "serve-config.yaml": yaml.safe_load((DEPLOY / "serve-config.yaml").read_text()),
        "rayservice.yaml": yaml.safe_load(service["spec"]["serveConfigV2"]),
    }


@pytest.mark.parametrize("name", ["serve-config.yaml", "rayservice.yaml"])
def test_shipped_serve_configs_are_valid(name):
    config = ServeDeploySchema.model_validate(_serve_configs()[name])
    (app,) = config.applications
    module, attr = app.import_path.split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    spec = ServeSpec.parse(app.args, name)
    spec.engine.check(from_name(spec.name))  # the layout fits the served preset


def test_rayservice_asks_for_the_gpus_its_ranks_need():
    service = yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())
    spec = ServeSpec.parse(_serve_configs()["rayservice.yaml"]["applications"][0]["args"])
    ranks = spec.engine.tp * spec.engine.ep
    (group,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert spec.engine.gpus_per_rank == 1 and gpus >= ranks


@pytest.mark.parametrize(
    "args,field",
    [
        ({}, "model"),
        ({"model": "m", "engine": {"tq": 2}}, "engine.tq"),
        ({"model": "m", "engine": {"tp": 0}}, "engine.tp"),
        ({"model": "m", "autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "autoscaling"),
        ({"model": "m", "http": {"port": 70000}}, "http.port"),
    ],
)
def test_bad_serve_specs_name_the_field(args, field):
    with pytest.raises(ConfigError, match=f"^{field}: "):
        ServeSpec.parse(args)


def test_engine_layout_is_checked_against_the_model():
    spec = ServeSpec.parse({"model": "m", "engine": {"tp": 3}})
    with pytest.raises(ConfigError, match="^engine.tp: num_attention_heads"):
        spec.engine.check(from_name("qwen2-7b"))
    spec = ServeSpec.parse({"model": "m", "engine": {"max_model_len": 4096}})
    with pytest.raises(ConfigError, match="^engine.max_model_len"):
        spec.engine.check(from_name("tiny-moe"))


def test_default_context_fits_a_short_context_model():
    """engine.max_model_len left at its default fits a model with a shorter context (and a value
    someone set is kept, to be refused by the check)."""
    short = from_name("tiny-moe").replace(max_position_embeddings=512)
    fitted = ServeSpec.parse({"model": "m"}).engine.fit_context(short)
    assert fitted.max_model_len == 512
    fitted.check(short)
    assert ServeSpec.parse({"model": "m"}).engine.fit_context(from_name("qwen2-7b")) == (
        ServeSpec.parse({"model": "m"}).engine
    )  # 2048 fits 32k: unchanged
    unset = ServeSpec.parse({"model": "m"}).engine  # `upcycle generate`'s default is 1024
    assert unset.fit_context(from_name("qwen2-7b"), default=1024).max_model_len == 1024
    assert unset.fit_context(short, default=1024).max_model_len == 512
    asked = ServeSpec.parse({"model": "m", "engine": {"max_model_len": 2048}}).engine
    with pytest.raises(ConfigError, match="^engine.max_model_len: 2048 exceeds"):
        asked.fit_context(short).check(short)
