"""The `upcycle` command line: thin typed functions over the jobs (their docstrings are --help)."""

from __future__ import annotations

import json
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from upcycle.config import ConfigError, ModelConfig, from_name

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
model_app = typer.Typer(no_args_is_help=True, help="Inspect model presets.")
checkpoint_app = typer.Typer(no_args_is_help=True, help="Convert checkpoints.")
data_app = typer.Typer(no_args_is_help=True, help="Prepare training data.")
runs_app = typer.Typer(no_args_is_help=True, help="MLflow runs.")
app.add_typer(model_app, name="model")
app.add_typer(checkpoint_app, name="checkpoint")
app.add_typer(data_app, name="data")
app.add_typer(runs_app, name="runs")
# Not a terminal (CI, pipes): wide enough that tables are not truncated.
console = Console(width=None if sys.stdout.isatty() else 160)
# megatron-core warns at import that Apex / Transformer Engine are absent: expected on CPU.
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")


def _preset(name: str) -> ModelConfig:
    try:
        return from_name(name)
    except ConfigError as e:
        raise typer.BadParameter(str(e), param_hint="PRESET") from None


def _dtype(name: str):
    import torch

    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if name not in dtypes:
        raise typer.BadParameter(f"{name!r}; allowed: {', '.join(dtypes)}", param_hint="--dtype")
    return dtypes[name]


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(2)


ADDRESS_HELP = "Ray dashboard URL (http://HOST:8265): run this command there as a Ray job"


def _submit_if_remote(address: str | None, extra: tuple[str, ...] = ()) -> None:
    """With --address: run this command line as a Ray job there; exit with the job's status."""
    if address:
        from upcycle.jobs.submit import submit

        raise typer.Exit(submit(address, [*sys.argv[1:], *extra], echo=console.print))


@model_app.command("info")
def model_info(
    preset: str = typer.Argument(..., help="A preset name, e.g. qwen2-57b-a14b"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Total and active parameter counts and bf16 weight bytes, built on the meta device."""
    from upcycle.moe.model import build_on_meta
    from upcycle.moe.params import count_parameters
    from upcycle.platform.distributed import single_process

    cfg = _preset(preset)
    with single_process():
        counts = count_parameters(build_on_meta(cfg), cfg)
    if as_json:
        print(json.dumps(asdict(counts)))
        return
    table = Table(title=f"{cfg.name}")
    for col in ("total params", "active params", "bf16 weights"):
        table.add_column(col, justify="right")
    table.add_row(
        f"{counts.total_params:,}",
        f"{counts.active_params:,}",
        f"{counts.bf16_bytes / 2**30:.2f} GiB",
    )
    console.print(table)


@checkpoint_app.command("import-hf")
def import_hf(
    hf_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="transformers folder"),
    out_dir: Path = typer.Argument(..., help="new folder for our checkpoint"),
) -> None:
    """Convert a transformers Qwen2 / Qwen2-MoE safetensors folder into our checkpoint."""
    from upcycle.dense.hf_weights import CheckpointError
    from upcycle.platform.hf_interop import import_hf as run

    try:
        cfg = run(hf_dir, out_dir)
    except (CheckpointError, ConfigError, FileExistsError) as e:
        _fail(str(e))
    console.print(f"imported {cfg.name} ({'MoE' if cfg.is_moe else 'dense'}) -> {out_dir}")


@checkpoint_app.command("export-hf")
def export_hf(
    ckpt_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="our checkpoint"),
    out_dir: Path = typer.Argument(..., help="new folder for the transformers checkpoint"),
    dtype: str = typer.Option("bfloat16", help="bfloat16, float16 or float32"),
    max_shard_gib: float = typer.Option(2.0, help="shard size limit in GiB"),
) -> None:
    """Write our checkpoint as transformers safetensors (+ config.json) that transformers loads."""
    from upcycle.atomic import IntegrityError
    from upcycle.dense.hf_weights import CheckpointError
    from upcycle.platform.hf_interop import export_hf as run

    try:
        cfg = run(
            ckpt_dir, out_dir, dtype=_dtype(dtype), max_shard_bytes=int(max_shard_gib * 2**30)
        )
    except (CheckpointError, ConfigError, IntegrityError, FileExistsError) as e:
        _fail(str(e))
    console.print(f"exported {cfg.name} -> {out_dir}")


@data_app.command("prepare")
def data_prepare(
    out_dir: Path = typer.Argument(..., help="new folder for the token shards"),
    sources: list[Path] = typer.Argument(
        None, help="text / JSONL / Parquet files or folders (default: Python's stdlib source)"
    ),
    text_field: str = typer.Option("text", help="JSONL key or Parquet column holding the text"),
    shard_tokens: int = typer.Option(1 << 22, help="tokens per shard"),
    address: str = typer.Option(None, help=ADDRESS_HELP),
) -> None:
    """Tokenize a corpus with Ray Data into Arrow token shards with a manifest."""
    from upcycle.jobs.prepare import demo_corpus, prepare
    from upcycle.platform.cluster import ensure_ray

    _submit_if_remote(address)
    ensure_ray()
    try:
        meta = prepare(
            sources or demo_corpus(), out_dir, text_field=text_field, shard_tokens=shard_tokens
        )
    except (ConfigError, FileExistsError) as e:
        _fail(str(e))
    console.print(
        f"{meta['documents']:,} documents -> {meta['num_tokens']:,} tokens in "
        f"{len(meta['shards'])} shard(s) at {out_dir}"
    )


@data_app.command("chat-demo")
def data_chat_demo(
    out_dir: Path = typer.Argument(..., help="new folder for sft.jsonl and dpo.jsonl"),
    seed: int = typer.Option(0, help="which wrong answers become DPO's rejected replies"),
) -> None:
    """Post-training demo data from the Python standard library's docstrings (no download):
    SFT conversations and DPO pairs about its functions."""
    from upcycle.jobs.chat_demo import write

    try:
        sft_path, dpo_path = write(out_dir, seed)
    except FileExistsError as e:
        _fail(str(e))
    n = len(sft_path.read_text().splitlines())
    console.print(f"{n} conversations -> {sft_path}; {n} preference pairs -> {dpo_path}")


def _training_command(name: str, objective: str | None, doc: str) -> None:
    """Register `upcycle NAME SPEC`: one job runner for train, sft and dpo."""

    def command(
        spec: Path = typer.Argument(..., exists=True, dir_okay=False, help="job spec (YAML)"),
        workers: int = typer.Option(1, min=1, help="Ray Train workers (ranks)"),
        storage: Path = typer.Option(Path("runs"), help="where checkpoints and run state go"),
        max_failures: int = typer.Option(1, min=0, help="restarts from the last checkpoint"),
        address: str = typer.Option(None, help=ADDRESS_HELP),
    ) -> None:
        _run_training(spec, objective, workers, storage, max_failures, address)

    command.__doc__ = doc
    app.command(name)(command)


_training_command(
    "train",
    None,
    "Train (or resume) the job in SPEC on a Ray Train worker group; tracked in MLflow.",
)
_training_command(
    "sft", "sft",
    """Supervised fine-tuning on ChatML conversations (data: JSONL of {"messages": [...]}):
    loss on the assistant's tokens, conversations packed without seeing each other.""",
)  # fmt: skip
_training_command(
    "dpo", "dpo",
    """Direct Preference Optimization on offline pairs (data: JSONL of {"prompt", "chosen",
    "rejected"}) against the frozen starting model; logs reward margins and accuracy.""",
)  # fmt: skip


def _run_training(spec, objective, workers, storage, max_failures, address) -> None:
    """sft/dpo set (or check) the spec's objective; `train` takes it as written."""
    import yaml

    from upcycle.platform.cluster import ensure_ray
    from upcycle.platform.data import DataError
    from upcycle.platform.job import TrainJob
    from upcycle.platform.ray_train import fit
    from upcycle.platform.tracking import default_tracking_uri

    try:
        data = yaml.safe_load(spec.read_text()) or {}
        if objective and isinstance(data, dict):
            if data.setdefault("objective", objective) != objective:
                raise ConfigError(
                    "objective",
                    f"{data['objective']!r}, but `upcycle {objective}` runs {objective}",
                )
        job = TrainJob.from_dict(data)
        job.validate(workers)
    except (ConfigError, DataError, yaml.YAMLError, TypeError) as e:
        _fail(f"{spec}: {e}")
    _submit_if_remote(address)
    ensure_ray()
    result = fit(job, num_workers=workers, storage_path=storage, max_failures=max_failures)
    if result.error is not None:
        _fail(f"training failed: {result.error}")
    metrics = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.metrics.items()}
    where = result.checkpoint.path if result.checkpoint else "none (nothing left to train)"
    console.print(f"{job.name}: {metrics}; checkpoint {where}")
    uri = job.tracking_uri or default_tracking_uri()
    console.print(
        f"MLflow run '{job.name}' in {uri}; view with: mlflow ui --backend-store-uri {uri}"
    )


@app.command()
def convert(
    out_dir: Path = typer.Argument(None, help="new folder for the MoE checkpoint"),
    source: str = typer.Option(
        ..., "--from", help="dense checkpoint, transformers folder, or preset (--dry-run)"
    ),
    target: str = typer.Option(..., "--to", help="MoE preset name or model JSON"),
    method: str = typer.Option("qwen2", help="qwen2 | granular | sparse"),
    seed: int = typer.Option(0),
    reinit_fraction: float = typer.Option(0.5, help="qwen2: share of each expert re-initialised"),
    router_std: float = typer.Option(0.02, help="std of the new router and shared-expert gate"),
    dry_run: bool = typer.Option(False, "--dry-run", help="check shapes on the meta device only"),
    hf: bool = typer.Option(False, "--hf", help="write a transformers Qwen2-MoE folder"),
    dtype: str = typer.Option("bfloat16", help="--hf weights: bfloat16 | float16 | float32"),
    address: str = typer.Option(None, help=ADDRESS_HELP),
) -> None:
    """Upcycle a dense Qwen2 model into a Qwen2-MoE (qwen2, granular or sparse initialisation)
    as a Ray task; --dry-run checks every shape on the meta device instead."""
    from upcycle.dense.hf_weights import CheckpointError
    from upcycle.jobs import convert as job
    from upcycle.moe.upcycling import UpcycleSettings
    from upcycle.platform.cluster import ensure_ray

    try:
        settings = UpcycleSettings(method, seed, reinit_fraction, router_std)
        if dry_run:
            moe, counts = job.dry_run(source, target, settings)
            console.print(
                f"{source} -> {moe.name} ({method}): every shape checks; "
                f"{counts.total_params:,} total / {counts.active_params:,} active parameters"
            )
            return
        if out_dir is None:
            _fail("OUT_DIR is required unless --dry-run")
        job.validate(source, target, out_dir, settings)  # before any cluster time
        _submit_if_remote(address)
        ensure_ray()
        hf_dtype = _dtype(dtype) if hf else None
        moe = job.run_as_ray_task(source, target, out_dir, settings, hf_dtype=hf_dtype)
    except (ConfigError, CheckpointError, FileExistsError) as e:
        _fail(str(e))
    console.print(f"upcycled {source} -> {moe.name} ({method}) at {out_dir}")


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
        data = ServeSpec.load(spec).model_dump() if spec else {}
        if model:
            data["model"] = model
        if "model" not in data:
            _fail("give a serve spec or --model")
        http = data.setdefault("http", {})
        http.update({k: v for k, v in (("host", host), ("port", port)) if v is not None})
        parsed = ServeSpec.parse(data, str(spec or "command line"))
        resolve_model(parsed)  # bad model or layout: fail before any cluster starts
        _submit_if_remote(address, ("--detach",))
        ensure_ray()
        url = run(parsed)
    except ConfigError as e:
        _fail(str(e))
    console.print(f"serving {parsed.name or parsed.model} at {url}/v1 (OpenAI API)")
    if detach:
        return
    console.print("Ctrl-C stops it")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve as ray_serve

        ray_serve.shutdown()


@runs_app.command("register")
def runs_register(
    run_id: str = typer.Argument(..., help="a training run's MLflow id"),
    name: str = typer.Argument(..., help="registered model name"),
    tracking_uri: str = typer.Option(
        None, help="MLflow (default: MLFLOW_TRACKING_URI or ./mlflow.db)"
    ),
) -> None:
    """Register a training run's newest checkpoint as a model version (serve it as models:/NAME)."""
    from upcycle.deploy.sources import register

    try:
        version, ckpt = register(run_id, name, tracking_uri=tracking_uri)
    except ConfigError as e:
        _fail(str(e))
    console.print(f"models:/{name}/{version} -> {ckpt}")


@app.command("eval")
def evaluate(
    checkpoint: Path = typer.Argument(..., exists=True, file_okay=False, help="our checkpoint"),
    data: Path = typer.Option(..., exists=True, file_okay=False, help="held-out token shards"),
    seq_length: int = typer.Option(128, min=1, help="tokens per window"),
    max_windows: int = typer.Option(64, min=1, help="windows evaluated (from the start)"),
    needle: bool = typer.Option(False, help="also run needle-in-a-haystack over the grid below"),
    lengths: str = typer.Option("256,512,1024", help="needle: context lengths in tokens"),
    depths: str = typer.Option("0,0.25,0.5,0.75,1", help="needle: depths (0 start, 1 end)"),
    trials: int = typer.Option(2, min=1, help="needle: prompts per (length, depth) cell"),
    dual_chunk_length: int = typer.Option(
        0, min=0, help="needle: Dual Chunk Attention for the trained length N (0: off)"
    ),
    run_name: str = typer.Option(None, help="MLflow run name (default: eval-MODEL)"),
    address: str = typer.Option(None, help=ADDRESS_HELP),
) -> None:
    """Held-out perplexity of a checkpoint and, with --needle, needle-in-a-haystack retrieval
    (Ray tasks), recorded as one MLflow run with a heatmap of the needle grid."""
    import tempfile

    from upcycle.jobs.evaluate import run
    from upcycle.jobs.needle import NeedleSpec
    from upcycle.platform.checkpoint import CheckpointError
    from upcycle.platform.cluster import ensure_ray
    from upcycle.platform.data import DataError

    try:
        spec = None
        if needle:
            spec = NeedleSpec(
                lengths=_numbers(lengths, int, "--lengths"),
                depths=_numbers(depths, float, "--depths"),
                trials=trials,
                dual_chunk_length=dual_chunk_length,
            )
        _submit_if_remote(address)
        ensure_ray()
        spool = Path(tempfile.mkdtemp(prefix="upcycle-eval-"))
        r, found = run(
            checkpoint, data, spool_dir=spool, seq_length=seq_length, max_windows=max_windows,
            needle=spec, run_name=run_name,
        )  # fmt: skip
    except (ConfigError, CheckpointError, DataError) as e:
        _fail(str(e))
    console.print(
        f"{r.model}: held-out loss {r.loss:.4f}, perplexity {r.perplexity:,.2f} over "
        f"{r.tokens:,} tokens ({r.data})"
    )
    if found:
        table = Table("length", *(f"depth {d:g}" for d in spec.depths), title="needle retrieval")
        for length, row in zip(spec.lengths, found.accuracy(), strict=True):
            table.add_row(str(length), *(f"{v:.2f}" for v in row))
        console.print(table)
        console.print(f"needle accuracy {found.metrics()['niah_accuracy']:.3f}")


def _numbers(text: str, kind, option: str) -> tuple:
    try:
        return tuple(kind(x) for x in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{text!r}: comma-separated numbers", param_hint=option) from None


@app.command()
def pipeline(
    out: Path = typer.Option(Path("runs/pipeline"), help="where data, checkpoints, evals go"),
    workers: int = typer.Option(2, min=2, help="Ray Train workers (the MoE uses ep=2)"),
    dense_steps: int = typer.Option(100, min=1, help="pretraining steps of tiny-dense"),
    moe_steps: int = typer.Option(40, min=1, help="training steps after upcycling"),
    sft_steps: int = typer.Option(30, min=1, help="SFT steps of the MoE"),
    dpo_steps: int = typer.Option(16, min=1, help="DPO steps after SFT"),
    address: str = typer.Option(None, help=ADDRESS_HELP),
) -> None:
    """The main job: corpus -> pretrain tiny-dense -> upcycle to tiny-moe -> continue training
    -> SFT -> DPO -> perplexity of each, needle in a haystack (DCA) of the final model -> serve
    it and chat once -> the MLflow runs."""
    from upcycle.jobs.pipeline import PipelineConfig, StageError, run

    _submit_if_remote(address)
    config = PipelineConfig(
        out=out, workers=workers, dense_steps=dense_steps, moe_steps=moe_steps,
        sft_steps=sft_steps, dpo_steps=dpo_steps,
    )  # fmt: skip
    started = time.perf_counter()
    try:
        result = run(config, console)
    except StageError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(1) from None
    console.print(
        f"pipeline done in {time.perf_counter() - started:.0f} s; held-out perplexity "
        f"dense {result.perplexity['dense']:,.1f} -> upcycled MoE {result.perplexity['moe']:,.1f}"
        f" -> after SFT + DPO {result.perplexity['dpo']:,.1f}; needle accuracy "
        f"{result.needle_accuracy:.2f}"
    )


@app.command()
def plan(
    model: str = typer.Option(..., help="preset name, e.g. qwen2-57b-a14b"),
    gpus: int = typer.Option(..., min=1, help="GPUs to train on"),
    gpu_memory: float = typer.Option(..., help="memory per GPU, GiB"),
    seq_len: int = typer.Option(4096, min=1),
    micro_batch: int = typer.Option(1, min=1),
    global_batch: int = typer.Option(512, min=1, help="sequences per step"),
    top: int = typer.Option(15, min=1, help="rows to print"),
) -> None:
    """Rank the TP/PP/EP/ETP/DP layouts that fit, by a cost model (see upcycle/platform/plan.py
    for the memory formulas and the assumptions)."""
    from upcycle.platform.plan import Workload, gib, plans

    work = Workload(seq_len=seq_len, micro_batch=micro_batch, global_batch=global_batch)
    try:
        found = plans(_preset(model), gpus=gpus, gpu_memory_gib=gpu_memory, work=work)
    except ConfigError as e:
        _fail(str(e))
    if not found:
        _fail(f"no layout of {model} fits {gpus} x {gpu_memory:g} GiB at seq {seq_len}, "
              f"micro-batch {micro_batch}; add GPUs or shorten the sequence")  # fmt: skip
    table = Table(title=f"{model} on {gpus} x {gpu_memory:g} GiB, seq {seq_len}, micro-batch "
                        f"{micro_batch}, global batch {global_batch} (GiB per GPU)")  # fmt: skip
    for col in ("rank", "tp", "pp", "ep", "etp", "dp", "dist opt", "recompute", "weights",
                "grads", "optim", "activ", "total", "step s", "tok/s/GPU"):  # fmt: skip
        table.add_column(col, justify="right")
    for i, p in enumerate(found[:top], start=1):
        m, lay = p.memory, p.layout
        opt = m.optimizer_distributed if p.distributed_optimizer else m.optimizer
        act = m.activations_recompute if p.recompute else m.activations
        table.add_row(
            str(i), str(lay.tp), str(lay.pp), str(lay.ep), str(lay.expert_tp), str(lay.dp),
            "yes" if p.distributed_optimizer else "no", "yes" if p.recompute else "no",
            gib(m.weights), gib(m.grads), gib(opt), gib(act + m.logits), gib(p.bytes),
            f"{p.step_seconds:.2f}", f"{p.tokens_per_gpu_s:,.0f}",
        )  # fmt: skip
    console.print(table)
    console.print(f"{len(found)} layouts fit; cost model and assumptions: upcycle/platform/plan.py")


@runs_app.command("import")
def runs_import(
    spool: Path = typer.Argument(..., exists=True, file_okay=False, help="a run's tracking folder"),
    tracking_uri: str = typer.Option(None, help="deliver here instead of the run's own server"),
) -> None:
    """Deliver a run's spooled metrics (kept while MLflow was unreachable) to MLflow."""
    from upcycle.platform.tracking import replay

    console.print(f"delivered to run {replay(spool, tracking_uri)}")


@app.command()
def verify(
    presets: list[str] = typer.Argument(
        None, help="presets to check (default: tiny-dense tiny-moe)"
    ),
    seq_len: int = typer.Option(64, min=1, help="tokens of real text to compare on"),
) -> None:
    """Check our model against transformers on the same random weights and real text."""
    from upcycle.jobs.verify import TOLERANCE
    from upcycle.jobs.verify import verify as run

    table = Table(title=f"upcycle vs transformers (fp32, tolerance {TOLERANCE:g})")
    for col in ("model", "params", "active", "tokens", "max |dlogit|", "greedy agree", "max |daux|",
                "ours s", "transformers s", "ok"):  # fmt: skip
        table.add_column(col, justify="right")
    ok = True
    for name in presets or ["tiny-dense", "tiny-moe"]:
        r = run(_preset(name), seq_len=seq_len)
        ok &= r.ok
        aux = "-" if r.aux_loss_diff is None else f"{r.aux_loss_diff:.2e}"
        table.add_row(
            r.model, f"{r.params:,}", f"{r.active_params:,}", str(r.tokens), f"{r.max_logit_diff:.2e}",
            f"{r.greedy_agreement:.0%}", aux, f"{r.seconds_ours:.3f}", f"{r.seconds_transformers:.3f}",
            "[green]yes[/green]" if r.ok else "[red]NO[/red]",
        )  # fmt: skip
    console.print(table)
    if not ok:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
