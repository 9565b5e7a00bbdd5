"""`upcycle serve`: the OpenAI-compatible Ray Serve application."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from upcycle.config import ConfigError
from upcycle.jobs.cli.common import (
    ADDRESS_HELP,
    app,
    console,
    fail,
    submit_if_remote,
)


@app.command()
def serve(
    spec: Path = typer.Argument(None, exists=True, dir_okay=False, help="serve spec (YAML)"),
    model: str = typer.Option(
        None, help="checkpoint, transformers folder, runs:/RUN_ID or models:/NAME/VERSION"
    ),
    host: str = typer.Option(None, help="HTTP host (default: the spec's, else 127.0.0.1)"),
    port: int = typer.Option(None, help="HTTP port (default: the spec's, else 8000)"),
    detach: bool = typer.Option(
        False, help="deploy and return (on a cluster, RAY_ADDRESS: the app keeps running there)"
    ),
    address: str = typer.Option(None, help=ADDRESS_HELP + " (implies --detach)"),
) -> None:
    """Serve a model with an OpenAI-compatible API (Ray Serve, autoscaled engine replicas).

    In-process (the default) it serves until Ctrl-C; with --address a Ray job deploys the
    application on that cluster, where it keeps running after the job ends."""

    from upcycle.deploy.app import resolve_model, run
    from upcycle.deploy.spec import ServeSpec
    from upcycle.platform.cluster import ensure_ray

    try:
        data = ServeSpec.load(spec).model_dump(exclude_unset=True) if spec else {}
        if model:
            data["model"] = model
        if "model" not in data:
            fail("give a serve spec or --model")
        http = data.setdefault("http", {})
        http.update({k: v for k, v in (("host", host), ("port", port)) if v is not None})
        parsed = ServeSpec.parse(data, str(spec or "command line"))
        fitted, _, _ = resolve_model(parsed)  # bad model or layout: fail before any start
        if fitted.engine.max_model_len != parsed.engine.max_model_len:
            console.print(
                f"engine.max_model_len: {fitted.engine.max_model_len}, the model's context "
                f"(the default {parsed.engine.max_model_len} is longer)"
            )
        parsed = fitted
        submit_if_remote(address, ("--detach",))
        ensure_ray()
        url = run(parsed)
    except ConfigError as e:
        fail(str(e))
    console.print(f"serving {parsed.name or parsed.model} at {url}/v1 (OpenAI API)")
    if detach:
        return
    console.print("Ctrl-C stops it")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve as ray_serve

        ray_serve.delete(parsed.app_name)  # the app only (see jobs/pipeline.py)
