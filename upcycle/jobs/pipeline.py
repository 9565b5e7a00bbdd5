"""`upcycle pipeline`: the main job, the whole dense -> MoE path on the embedded defaults.

    prepare a corpus (the Python standard library's source; held-out files kept apart)
    -> pretrain tiny-dense (Ray Train, data parallel)
    -> upcycle it to tiny-moe (qwen2 method, a Ray task)
    -> continue training the MoE (Ray Train, expert parallel)
    -> SFT, then DPO, of the MoE on chat data made from the stdlib's docstrings (Ray Train, EP)
    -> rejection sampling: K samples of arithmetic prompts (Ray Data, the serving engine), the
       exact verifier's accepted ones as SFT/DPO files (MLflow run)
    -> a reward model: the SFT model with a score head trained on the DPO pairs (Ray Train,
       EP), its rewards of those samples (Ray Data) and their best-of-N as SFT/DPO files
    -> held-out perplexity of each model; needle-in-a-haystack of the final one past its
       trained length with Dual Chunk Attention (Ray tasks, MLflow runs)
    -> serve the final model (Ray Serve) and answer one chat completion over HTTP
    -> list the MLflow runs and the `mlflow ui` command to view them

Every stage reuses what an earlier run of the pipeline already finished (verified data and
checkpoints, Ray Train's resume), so a crashed pipeline continues where it stopped. Any failing
stage raises `StageError` naming it.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from upcycle.atomic import IntegrityError, verify_manifest
from upcycle.config import Layout, from_name
from upcycle.platform.checkpoint import newest_valid
from upcycle.platform.tracking import default_tracking_uri
from upcycle.train_config import TrainConfig


class StageError(RuntimeError):
    """A pipeline stage failed; the message names it."""


@dataclass(frozen=True)
class PipelineConfig:
    out: Path = Path("runs/pipeline")
    workers: int = 2
    heldout_files: int = 8  # the last stdlib modules, never trained on
    seq_length: int = 128
    dense_steps: int = 100
    moe_steps: int = 40
    sft_steps: int = 30
    dpo_steps: int = 16
    dpo_pairs: int = 32  # 4 passes over them in 16 steps of 8 pairs: the margin visibly grows
    reward_steps: int = 8
    lr: float = 3e-3
    post_lr: float = 1e-3  # SFT and DPO
    needle_lengths: tuple[int, ...] = (128, 256, 512)  # trained at seq_length: DCA beyond
    synth_prompts: int = 8  # arithmetic prompts for rejection sampling
    synth_samples: int = 4  # samples per prompt
    prompt: str = "Write a Python function that reverses a string."
    tracking_uri: str = ""


@dataclass
class PipelineResult:
    dense_checkpoint: Path | None = None
    moe_checkpoint: Path | None = None
    sft_checkpoint: Path | None = None
    dpo_checkpoint: Path | None = None
    perplexity: dict[str, float] = dataclasses.field(default_factory=dict)
    needle_accuracy: float = 0.0
    acceptance: float = 0.0  # rejection sampling's share of accepted samples
    reward_checkpoint: Path | None = None
    reply: str = ""
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)


def run(cfg: PipelineConfig, console: Console) -> PipelineResult:
    from upcycle.platform.cluster import ensure_ray

    cfg = dataclasses.replace(cfg, tracking_uri=cfg.tracking_uri or default_tracking_uri())
    out, result = Path(cfg.out).absolute(), PipelineResult()
    ensure_ray()

    def stage(name: str, fn: Callable[[], None]) -> None:
        console.rule(f"[bold]{name}")
        start = time.perf_counter()
        try:
            fn()
        except Exception as e:
            raise StageError(f"stage '{name}' failed: {type(e).__name__}: {e}") from e
        result.seconds[name] = time.perf_counter() - start
        console.print(f"[green]{name}[/green] done in {result.seconds[name]:.0f} s")

    train_data, heldout = out / "data" / "train", out / "data" / "heldout"

    def prepare_data() -> None:
        from upcycle.jobs.prepare import demo_corpus, prepare

        files = demo_corpus()
        for folder, part in ((train_data, files[: -cfg.heldout_files]),
                             (heldout, files[-cfg.heldout_files :])):  # fmt: skip
            if _valid(folder):
                console.print(f"{folder}: already prepared")
                continue
            meta = prepare(part, folder, progress=False)
            console.print(f"{folder}: {meta['num_tokens']:,} tokens from {len(part)} files")

    def pretrain() -> None:
        result.dense_checkpoint = _train(
            cfg, "pipeline-dense", "tiny-dense", train_data, Layout(), cfg.dense_steps, None
        )

    chat = out / "data" / "chat"

    upcycled = out / "upcycled"

    def upcycle() -> None:
        from upcycle.jobs.convert import run_as_ray_task
        from upcycle.moe.upcycling import UpcycleSettings

        if _valid(upcycled):
            console.print(f"{upcycled}: already upcycled")
            return
        run_as_ray_task(
            str(result.dense_checkpoint), "tiny-moe", upcycled, UpcycleSettings("qwen2", seed=0)
        )
        console.print(f"{result.dense_checkpoint} -> tiny-moe (qwen2 method) at {upcycled}")

    def train_moe() -> None:
        result.moe_checkpoint = _train(
            cfg, "pipeline-moe", "tiny-moe", train_data, Layout(ep=2), cfg.moe_steps, upcycled
        )

    def sft() -> None:
        from upcycle.jobs import chat_demo

        if not _valid(chat):
            sft_data, dpo_data = chat_demo.write(chat, dpo_pairs=cfg.dpo_pairs)
            console.print(
                f"{chat}: {len(sft_data.read_text().splitlines())} docstring chats, "
                f"{len(dpo_data.read_text().splitlines())} preference pairs"
            )
        result.sft_checkpoint = _train(
            cfg, "pipeline-sft", "tiny-moe", chat / "sft.jsonl", Layout(ep=2), cfg.sft_steps,
            result.moe_checkpoint, objective="sft",
        )  # fmt: skip

    def dpo() -> None:
        result.dpo_checkpoint = _train(
            cfg, "pipeline-dpo", "tiny-moe", chat / "dpo.jsonl", Layout(ep=2), cfg.dpo_steps,
            result.sft_checkpoint, objective="dpo",
        )  # fmt: skip

    def synthesize() -> None:
        result.acceptance = _rejection_sampling(cfg, result.dpo_checkpoint, out / "synth")
        console.print(
            f"rejection sampling: {cfg.synth_samples} samples of {cfg.synth_prompts} arithmetic "
            f"prompts, acceptance {result.acceptance:.0%} (exact verifier) -> {out / 'synth'}"
        )

    def reward_model() -> None:
        result.reward_checkpoint = _train(
            cfg, "pipeline-reward", "tiny-moe", chat / "dpo.jsonl", Layout(ep=2),
            cfg.reward_steps, result.sft_checkpoint, objective="reward",
        )  # fmt: skip
        pairs = _best_of_n(cfg, result.reward_checkpoint, out / "synth")
        console.print(
            f"reward model: {cfg.reward_steps} steps on {chat / 'dpo.jsonl'}; the samples scored, "
            f"best vs worst of each prompt: {pairs} DPO pairs -> {out / 'synth' / 'best-of-n'}"
        )

    def evaluate() -> None:
        from upcycle.jobs.evaluate import run as evaluate_run
        from upcycle.jobs.needle import NeedleSpec

        models = (("dense", result.dense_checkpoint), ("moe", result.moe_checkpoint),
                  ("dpo", result.dpo_checkpoint))  # fmt: skip
        for label, ckpt in models:
            needle = None
            if label == "dpo":
                needle = NeedleSpec(
                    lengths=cfg.needle_lengths, depths=(0.0, 0.5, 1.0), trials=1,
                    dual_chunk_length=cfg.seq_length,
                )  # fmt: skip
            ppl, found = evaluate_run(
                ckpt, heldout, spool_dir=out / "eval" / label, seq_length=cfg.seq_length,
                needle=needle, run_name=f"pipeline-eval-{label}", tracking_uri=cfg.tracking_uri,
            )  # fmt: skip
            result.perplexity[label] = ppl.perplexity
            console.print(
                f"{label} ({ppl.model}): held-out loss {ppl.loss:.3f}, perplexity "
                f"{ppl.perplexity:,.1f} ({ppl.tokens:,} tokens)"
            )
            if found:
                result.needle_accuracy = found.metrics()["niah_accuracy"]
                console.print(
                    f"needle in a haystack, lengths {cfg.needle_lengths} x depths 0/0.5/1 with "
                    f"Dual Chunk Attention (trained at {cfg.seq_length}): accuracy "
                    f"{result.needle_accuracy:.2f} (heatmap logged to MLflow)"
                )

    def serve_and_chat() -> None:
        result.reply = _serve_and_chat(result.dpo_checkpoint, cfg.prompt, console)

    stage("prepare data", prepare_data)
    stage("pretrain tiny-dense", pretrain)
    stage("upcycle to tiny-moe", upcycle)
    stage("continue training tiny-moe", train_moe)
    stage("SFT tiny-moe", sft)
    stage("DPO tiny-moe", dpo)
    stage("rejection sampling: generate, verify", synthesize)
    stage("reward model: train, score, best-of-N", reward_model)
    stage("evaluate: perplexity, needle in a haystack", evaluate)
    stage("serve and chat", serve_and_chat)
    _print_runs(cfg.tracking_uri, console)
    return result


def _valid(folder: Path) -> bool:
    try:
        verify_manifest(folder)
    except (IntegrityError, OSError):
        return False
    return True


def _train(
    cfg: PipelineConfig,
    name: str,
    preset: str,
    data: Path,
    layout: Layout,
    steps: int,
    init_from: Path | None,
    objective: str = "pretrain",
) -> Path:
    """Train (or resume) one stage's job on Ray Train; its newest valid checkpoint."""
    from upcycle.platform.job import TrainJob
    from upcycle.platform.ray_train import fit

    storage = Path(cfg.out).absolute() / "train"
    job = TrainJob(
        model=from_name(preset),
        data=str(data),
        layout=dataclasses.replace(layout, micro_batch_size=2, global_batch_size=8),
        train=TrainConfig(
            steps=steps,
            seq_length=cfg.seq_length,
            save_interval=steps,
            lr=cfg.lr if objective == "pretrain" else cfg.post_lr,
            min_lr=min(3e-5, cfg.post_lr),
            warmup_steps=4 if objective == "pretrain" else 2,
        ),  # fmt: skip
        objective=objective,
        init_from=str(init_from) if init_from else None,
        name=name,
        tracking_uri=cfg.tracking_uri,
    )
    outcome = fit(job, num_workers=cfg.workers, storage_path=storage, max_failures=1)
    if outcome.error is not None:
        raise outcome.error
    ckpt = newest_valid(sorted((storage / name).glob("step_*[0-9]")))
    if ckpt is None:
        raise RuntimeError(f"no valid checkpoint under {storage / name}")
    return ckpt


def _rejection_sampling(cfg: PipelineConfig, ckpt: Path, out: Path) -> float:
    """Generate samples of arithmetic prompts (Ray Data), keep what the exact verifier accepts
    (SFT/DPO files, an MLflow run); the acceptance rate. Reuses a finished earlier run."""
    import json

    from upcycle.jobs import chat_demo
    from upcycle.jobs.synthesize import run_generate, run_rejection
    from upcycle.synthesis.generation import GenerateSpec

    rejection = out / "rejection"
    if not _valid(rejection):
        out.mkdir(parents=True, exist_ok=True)
        prompts, generated = out / "prompts.jsonl", out / "generated.jsonl"
        records = chat_demo.arithmetic_prompts(cfg.synth_prompts)
        prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
        if not generated.exists():  # written whole (renamed) or not at all
            spec = GenerateSpec(samples=cfg.synth_samples, temperature=1.0, max_tokens=16)
            engine = {"max_model_len": 256, "max_num_seqs": 16}
            run_generate(str(ckpt), prompts, generated, spec, workers=1, engine=engine)
        run_rejection(generated, rejection, verifier_name="exact",
                      run_name="pipeline-rejection", tracking_uri=cfg.tracking_uri)  # fmt: skip
    return json.loads((rejection / "report.json").read_text())["acceptance_rate"]


def _best_of_n(cfg: PipelineConfig, reward_ckpt: Path, synth: Path) -> int:
    """Score the generated samples with the reward model (Ray Data) and keep each prompt's best
    (`--verifier reward`); the number of DPO pairs. Reuses a finished earlier run."""
    import json

    from upcycle.jobs.synthesize import run_rejection, run_reward_score

    best = synth / "best-of-n"
    if not _valid(best):
        scored = synth / "scored.jsonl"
        if not scored.exists():  # written whole (renamed) or not at all
            run_reward_score(str(reward_ckpt), synth / "generated.jsonl", scored,
                             max_length=cfg.seq_length, workers=1)  # fmt: skip
        run_rejection(scored, best, verifier_name="reward", run_name="pipeline-best-of-n",
                      tracking_uri=cfg.tracking_uri)  # fmt: skip
    return json.loads((best / "report.json").read_text())["dpo_pairs"]


def _serve_and_chat(ckpt: Path, prompt: str, console: Console) -> str:
    import requests
    from ray import serve

    from upcycle.deploy.app import run as serve_run
    from upcycle.deploy.spec import ServeSpec

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = ServeSpec.parse(
        {
            "model": str(ckpt),
            "engine": {"max_model_len": 512, "max_num_seqs": 4},
            "http": {"port": port},
            "app_name": "pipeline",
        }  # fmt: skip
    )
    url = serve_run(spec)
    try:
        body = {
            "model": "tiny-moe",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 32,
            "temperature": 0.8,  # greedy text of a model this small is mostly whitespace
            "seed": 0,
        }
        response = requests.post(f"{url}/v1/chat/completions", json=body, timeout=300)
        response.raise_for_status()
        reply = response.json()
    finally:
        # delete our application, not the Serve instance: serve.shutdown() kills the controller
        # while its own graceful_shutdown call is pending (the raylet then reports that task as
        # failed); the controller and proxy go with the in-process cluster, or stay on a shared one
        serve.delete(spec.app_name)
    text = reply["choices"][0]["message"]["content"]
    console.print(f"POST {url}/v1/chat/completions -> {reply['usage']}")
    console.print(f"[bold]user:[/bold] {prompt}\n[bold]tiny-moe:[/bold] {text!r}")
    return text


def _print_runs(tracking_uri: str, console: Console) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("upcycle")
    runs = client.search_runs(
        [experiment.experiment_id], "tags.mlflow.runName LIKE 'pipeline-%'", max_results=20
    )
    table = Table(title=f"MLflow runs ({tracking_uri})")
    for col in ("run", "id", "status", "loss", "perplexity", "more"):
        table.add_column(col)
    for r in sorted(runs, key=lambda r: r.info.start_time):
        m = r.data.metrics
        loss = f"{m['loss']:.3f}" if "loss" in m else "-"
        ppl = f"{m['perplexity']:,.1f}" if "perplexity" in m else "-"
        more = ""
        if "rewards/margin" in m:
            more = f"margin {m['rewards/margin']:.3f}, accuracy {m['rewards/accuracy']:.2f}"
        elif "acceptance_rate" in m:
            more = f"accepted {m['accepted']:.0f} of {m['samples']:.0f} samples"
        elif "niah_accuracy" in m:
            more = f"needle accuracy {m['niah_accuracy']:.2f}"
        table.add_row(r.info.run_name, r.info.run_id[:8], r.info.status, loss, ppl, more)
    console.print(table)
    console.print(f"view them: mlflow ui --backend-store-uri {tracking_uri}")
