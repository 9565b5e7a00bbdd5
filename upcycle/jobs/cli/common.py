"""What every command module shares: the typer app and its groups, the console, error exits
and `--address` (run this command line as a Ray job)."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.markup import escape

from upcycle.config import ConfigError, ModelConfig, from_name

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
model_app = typer.Typer(no_args_is_help=True, help="Inspect model presets.")
checkpoint_app = typer.Typer(no_args_is_help=True, help="Convert checkpoints.")
data_app = typer.Typer(no_args_is_help=True, help="Prepare training data.")
runs_app = typer.Typer(no_args_is_help=True, help="MLflow runs.")
synthesize_app = typer.Typer(
    no_args_is_help=True,
    help="Machine-made post-training data: rejection sampling, instruction evolution, "
    "constitutional feedback, repurposing.",
)
reward_app = typer.Typer(
    no_args_is_help=True, help="Reward models: train on preference pairs, score replies."
)
app.add_typer(model_app, name="model")
app.add_typer(checkpoint_app, name="checkpoint")
app.add_typer(data_app, name="data")
app.add_typer(runs_app, name="runs")
app.add_typer(synthesize_app, name="synthesize")
app.add_typer(reward_app, name="reward")
# Not a terminal (CI, pipes): wide enough that tables are not truncated.
console = Console(width=None if sys.stdout.isatty() else 160)


def parse_preset(name: str) -> ModelConfig:
    try:
        return from_name(name)
    except ConfigError as e:
        raise typer.BadParameter(str(e), param_hint="PRESET") from None


def parse_dtype(name: str):
    import torch

    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if name not in dtypes:
        raise typer.BadParameter(f"{name!r}; allowed: {', '.join(dtypes)}", param_hint="--dtype")
    return dtypes[name]


def fail(message: str | BaseException) -> None:
    """Print `message` (an exception: its text; one a Ray task raised: the task's own error,
    without Ray's task header) and exit 2."""
    if isinstance(message, BaseException):
        message = str(getattr(message, "cause", None) or message)
    console.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(2)


ADDRESS_HELP = "Ray dashboard URL (http://HOST:8265): run this command there as a Ray job"
SANDBOX_HELP = (
    "where generated programs run: bwrap (namespaces, the boundary) or process (no boundary: "
    "only where bwrap cannot run; README 'Sandbox')"
)


def submit_if_remote(address: str | None, extra: tuple[str, ...] = ()) -> None:
    """With --address: run this command line as a Ray job there; exit with the job's status."""
    if address:
        from upcycle.jobs.submit import submit

        raise typer.Exit(submit(address, [*sys.argv[1:], *extra], echo=console.print))


def print_result(result, name: str, tracking_uri: str) -> None:
    """A Ray Train run's outcome: its last metrics, checkpoint and MLflow run (exit 2 if it
    failed)."""
    from upcycle.platform.tracking import default_tracking_uri

    if result.error is not None:
        fail(f"{name} failed: {result.error}")
    metrics = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.metrics.items()}
    where = result.checkpoint.path if result.checkpoint else "none (nothing left to do)"
    console.print(f"{name}: {metrics}; checkpoint {where}")
    uri = tracking_uri or default_tracking_uri()
    console.print(f"MLflow run '{name}' in {uri}; view with: mlflow ui --backend-store-uri {uri}")
