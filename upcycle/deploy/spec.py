"""The serve spec (YAML): which model, how each replica holds it, how replicas scale, where HTTP
listens. Validated with pydantic; an error names the YAML path of the field and what is allowed.

    model: runs:/3f2a...          # or a checkpoint / transformers folder, or models:/NAME/1
    name: tiny-moe                # the model id clients send (default: the model's name)
    engine: {tp: 1, ep: 1, max_num_seqs: 16, max_model_len: 2048, max_step_tokens: 512,
             block_size: 16, kv_cache_gib: null, prefix_caching: true, reserve_tokens: 256,
             cpus_per_rank: 1, gpus_per_rank: 0, compile: auto}
    autoscaling: {min_replicas: 1, max_replicas: 2, target_ongoing_requests: 8}
    http: {host: 127.0.0.1, port: 8000}
    log_level: INFO               # Ray Serve's: WARNING drops the access lines
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from upcycle.config import ConfigError
from upcycle.deploy.engine.runner import RunnerConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AutoscalingSpec(_Strict):
    """Ray Serve's autoscaling_config for the engine deployment."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    initial_replicas: int | None = Field(default=None, ge=0)
    target_ongoing_requests: float = Field(default=8, gt=0)
    upscale_delay_s: float = Field(default=2.0, ge=0)
    downscale_delay_s: float = Field(default=30.0, ge=0)
    metrics_interval_s: float = Field(default=2.0, gt=0)  # how often load is reported
    look_back_period_s: float = Field(default=10.0, gt=0)  # the window it is averaged over

    @model_validator(mode="after")
    def _order(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        return self


class HttpSpec(_Strict):
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = Field(default=8000, ge=0, le=65535)


class ServeSpec(_Strict):
    model: str
    name: str | None = None
    engine: RunnerConfig = RunnerConfig()
    autoscaling: AutoscalingSpec = AutoscalingSpec()
    max_ongoing_requests: int = Field(default=64, ge=1)  # per engine replica
    retries: int = Field(default=3, ge=0)  # re-sends of a request whose replica died
    http: HttpSpec = HttpSpec()
    app_name: str = "upcycle"
    route_prefix: str = Field(default="/", pattern=r"^/")
    # Ray Serve's console and log files: its controller, proxies and this app's replicas
    # (each request's access line is INFO)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @classmethod
    def parse(cls, data: dict, source: str = "serve spec") -> ServeSpec:
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "(top level)"
            raise ConfigError(where, f"{first['msg']} (in {source})") from None

    @classmethod
    def load(cls, path: Path) -> ServeSpec:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(str(path), f"cannot read the serve spec: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(str(path), "a serve spec is a YAML mapping")
        return cls.parse(data, str(path))
