"""`upcycle pipeline`: the main job, the whole dense -> MoE path on the embedded defaults.

    prepare a corpus (the Python standard library's source; held-out files kept apart): filter
       by quality rules, deduplicate, decontaminate against the held-out files and HumanEval
    -> pretrain tiny-dense (Ray Train, data parallel)
    -> upcycle it to tiny-moe (qwen2 method, a Ray task)
    -> continue training the MoE (Ray Train, expert parallel)
    -> SFT, then DPO, of the MoE on chat data made from the stdlib's docstrings (Ray Train, EP)
    -> rejection sampling: K samples of arithmetic prompts (Ray Data, the serving engine), the
       exact verifier's accepted ones as SFT/DPO files (MLflow run)
    -> a reward model: the SFT model with a score head trained on the DPO pairs (Ray Train,
       EP), its rewards of those samples (Ray Data) and their best-of-N as SFT/DPO files
    -> online RLHF: online DPO of the DPO model on the arithmetic prompts, scored by the reward
       model (rollout engine and reward model actors, trainer on Ray Train at EP2, weights
       synced in memory every iteration)
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

from upcycle.config import Layout
from upcycle.jobs import pipeline_stages as stages
from upcycle.jobs.pipeline_config import PipelineConfig
from upcycle.platform.tracking import default_tracking_uri


class StageError(RuntimeError):
    """A pipeline stage failed; the message names it."""


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
    rlhf_checkpoint: Path | None = None
    reply: str = ""
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)


def run(cfg: PipelineConfig, console: Console) -> PipelineResult:
    from upcycle.platform.cluster import ensure_ray, quiet_ray_data_console

    cfg = dataclasses.replace(cfg, tracking_uri=cfg.tracking_uri or default_tracking_uri())
    out, result = Path(cfg.out).absolute(), PipelineResult()
    ensure_ray()
    quiet_ray_data_console()  # each stage says what its datasets made

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
        train_files, heldout_files = files[: -cfg.heldout_files], files[-cfg.heldout_files :]
        clean, line = stages.curate(cfg, out / "data" / "curated", train_files, heldout_files)
        console.print(line)
        for folder, part in ((train_data, [clean]), (heldout, heldout_files)):
            if stages.valid(folder):
                console.print(f"{folder}: already prepared")
                continue
            meta = prepare(part, folder, progress=False)
            console.print(f"{folder}: {meta['num_tokens']:,} tokens, {meta['documents']} documents")

    def pretrain() -> None:
        result.dense_checkpoint = stages.train(
            cfg, "pipeline-dense", "tiny-dense", train_data, Layout(), cfg.dense_steps, None
        )

    chat = out / "data" / "chat"

    upcycled = out / "upcycled"

    def upcycle() -> None:
        from upcycle.jobs.convert import run_as_ray_task
        from upcycle.moe.upcycling import UpcycleSettings

        if stages.valid(upcycled):
            console.print(f"{upcycled}: already upcycled")
            return
        run_as_ray_task(
            str(result.dense_checkpoint), "tiny-moe", upcycled, UpcycleSettings("qwen2", seed=0)
        )
        console.print(f"{result.dense_checkpoint} -> tiny-moe (qwen2 method) at {upcycled}")

    def train_moe() -> None:
        result.moe_checkpoint = stages.train(
            cfg, "pipeline-moe", "tiny-moe", train_data, Layout(ep=2), cfg.moe_steps, upcycled
        )

    def sft() -> None:
        from upcycle.jobs import chat_demo

        if not stages.valid(chat):
            sft_data, dpo_data = chat_demo.write(chat, dpo_pairs=cfg.dpo_pairs)
            console.print(
                f"{chat}: {len(sft_data.read_text().splitlines())} docstring chats, "
                f"{len(dpo_data.read_text().splitlines())} preference pairs"
            )
        result.sft_checkpoint = stages.train(
            cfg, "pipeline-sft", "tiny-moe", chat / "sft.jsonl", Layout(ep=2), cfg.sft_steps,
            result.moe_checkpoint, objective="sft",
        )  # fmt: skip

    def dpo() -> None:
        result.dpo_checkpoint = stages.train(
            cfg, "pipeline-dpo", "tiny-moe", chat / "dpo.jsonl", Layout(ep=2), cfg.dpo_steps,
            result.sft_checkpoint, objective="dpo",
        )  # fmt: skip

    def synthesize() -> None:
        result.acceptance = stages.rejection_sampling(cfg, result.dpo_checkpoint, out / "synth")
        console.print(
            f"rejection sampling: {cfg.synth_samples} samples of {cfg.synth_prompts} arithmetic "
            f"prompts, acceptance {result.acceptance:.0%} (exact verifier) -> {out / 'synth'}"
        )

    def reward_model() -> None:
        result.reward_checkpoint = stages.train(
            cfg, "pipeline-reward", "tiny-moe", chat / "dpo.jsonl", Layout(ep=2),
            cfg.reward_steps, result.sft_checkpoint, objective="reward",
        )  # fmt: skip
        pairs = stages.best_of_n(cfg, result.reward_checkpoint, out / "synth")
        console.print(
            f"reward model: {cfg.reward_steps} steps on {chat / 'dpo.jsonl'}; the samples scored, "
            f"best vs worst of each prompt: {pairs} DPO pairs -> {out / 'synth' / 'best-of-n'}"
        )

    def rlhf() -> None:
        prompts = out / "synth" / "prompts.jsonl"
        result.rlhf_checkpoint = stages.rlhf(
            cfg, result.dpo_checkpoint, result.reward_checkpoint, prompts
        )
        console.print(
            f"online RLHF: {cfg.rlhf_iterations} iterations of online DPO on {prompts}, scored by "
            f"the reward model -> {result.rlhf_checkpoint}"
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
    stage("online RLHF: rollouts, reward model, online DPO, weight sync", rlhf)
    stage("evaluate: perplexity, needle in a haystack", evaluate)
    stage("serve and chat", serve_and_chat)
    _print_runs(cfg.tracking_uri, console)
    return result


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
            "log_level": "WARNING",  # the reply is printed below; Serve's INFO lines are not
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
        elif "documents_out" in m:
            more = f"kept {m['documents_out']:.0f} of {m['documents_in']:.0f} documents"
        table.add_row(r.info.run_name, r.info.run_id[:8], r.info.status, loss, ppl, more)
    console.print(table)
    # MLflow 3.17's UI opens in its GenAI view unless the URL (or the last choice, kept in the
    # browser) asks for model training; the experiment's kind tag (tracking.EXPERIMENT_KIND)
    # is what earlier 3.x versions go by.
    console.print(
        f"view them: mlflow ui --backend-store-uri {tracking_uri}, then open "
        f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}"
        "?workflowType=machine_learning"
    )
