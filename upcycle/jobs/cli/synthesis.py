"""`upcycle generate` (batch sampling), `upcycle reward score` (rewards of pairs or samples),
`upcycle synthesize rejection` (post-training data from the samples a verifier accepts) and
`upcycle synthesize sandbox` (can generated code run in the sandbox on this machine?)."""

from __future__ import annotations

from pathlib import Path

import typer

from upcycle.jobs.cli.common import (
    ADDRESS_HELP,
    SANDBOX_HELP,
    app,
    console,
    fail,
    reward_app,
    submit_if_remote,
    synthesize_app,
)


@synthesize_app.command("rejection")
def rejection(
    generated: Path = typer.Argument(..., help="a generated JSONL file (upcycle generate)"),
    out: Path = typer.Argument(..., help="new folder for sft.jsonl, dpo.jsonl, report.json"),
    verifier: str = typer.Option(
        ...,
        help="exact (final answer), execution (run the tests) or reward (best-of-N on the "
        "samples' rewards: upcycle reward score)",
    ),
    timeout: float = typer.Option(10.0, min=0.1, help="execution: seconds per program"),
    memory_gib: float = typer.Option(1.0, min=0.1, help="execution: address space per program"),
    sandbox: str = typer.Option("bwrap", help=f"execution: {SANDBOX_HELP}"),
    run_name: str = typer.Option(None, help="MLflow run name"),
) -> None:
    """Keep the samples a verifier accepts as SFT conversations, pair accepted with rejected
    samples of the same prompt for DPO, and report acceptance (an MLflow run)."""
    from upcycle.jobs.synthesize import run_rejection
    from upcycle.synthesis.sandbox import Sandbox, SandboxUnavailable

    try:
        box = Sandbox(kind=sandbox, seconds=timeout, memory_bytes=int(memory_gib * 2**30))
        result = run_rejection(generated, out, verifier_name=verifier, sandbox=box,
                               run_name=run_name)  # fmt: skip
    except (ValueError, FileExistsError, SandboxUnavailable) as e:  # DataError: a ValueError
        fail(str(e))
    r = result.report
    console.print(
        f"{r['accepted']} of {r['samples']} samples accepted ({r['acceptance_rate']:.0%}) over "
        f"{r['prompts']} prompts; {r['sft_conversations']} SFT conversations, "
        f"{r['dpo_pairs']} DPO pairs in {out}"
    )


@synthesize_app.command("sandbox")
def sandbox_check(
    kind: str = typer.Option("bwrap", "--sandbox", help=SANDBOX_HELP),
) -> None:
    """Check that generated programs can run in the sandbox on this machine (run it on each kind
    of node that scores execution tasks): a probe program, then how it was isolated, or what is
    missing and how to get it."""
    from upcycle.synthesis.sandbox import Sandbox, SandboxUnavailable, bwrap

    try:
        box = Sandbox(kind=kind)
        box.require()
    except (ValueError, SandboxUnavailable) as e:
        fail(str(e))
    if kind == "process":
        console.print("sandbox: process runs (no boundary: see the warning above)")
        return
    who = ("as root: no user namespace, a random unprivileged uid per run" if bwrap.privileged()
           else "a user namespace, uid 65534 inside")  # fmt: skip
    console.print(
        f"sandbox: bwrap ({bwrap.locate(box.bwrap)}) isolates programs here: {who}; pid, net, "
        f"mount, ipc, uts namespaces; seccomp ({len(bwrap.seccomp_filter()) // 8} BPF "
        "instructions); rlimits"
    )


@app.command("generate")
def generate(
    model: str = typer.Argument(..., help="what `upcycle serve --model` accepts"),
    prompts: Path = typer.Argument(..., help='JSONL: {"prompt": text or messages, ...}'),
    out: Path = typer.Argument(..., help="new JSONL file: each prompt with its samples"),
    samples: int = typer.Option(1, help="samples per prompt (K)"),
    temperature: float = typer.Option(1.0, help="0: greedy; up to 2"),
    top_p: float = typer.Option(1.0),
    max_tokens: int = typer.Option(256, help="completion tokens per sample"),
    seed: int = typer.Option(0, help="the same seed gives the same samples"),
    workers: int = typer.Option(1, help="engine actors (Ray Data actor pool)"),
    max_model_len: int = typer.Option(
        None,
        help="prompt + completion tokens per sequence [default: 1024, or the model's context "
        "where that is shorter]",
    ),
    max_num_seqs: int = typer.Option(16, help="sequences each engine decodes together"),
    address: str = typer.Option(None, help=ADDRESS_HELP),
) -> None:
    """Sample K completions per prompt with the serving engine on a Ray Data actor pool, with
    token counts and summed log-probabilities; prints throughput."""
    from upcycle.config import ConfigError
    from upcycle.jobs.synthesize import run_generate
    from upcycle.synthesis.generation import GenerateSpec

    spec = GenerateSpec(samples=samples, temperature=temperature, top_p=top_p,
                        max_tokens=max_tokens, seed=seed)  # fmt: skip
    engine = {"max_model_len": max_model_len, "max_num_seqs": max_num_seqs}
    try:
        spec.check()
        submit_if_remote(address)
        done = run_generate(model, prompts, out, spec, workers=workers, engine=engine)
    except (ValueError, ConfigError, FileExistsError, FileNotFoundError) as e:
        fail(str(e))
    console.print(
        f"{done.samples} samples of {done.prompts} prompts, {done.completion_tokens:,} tokens "
        f"in {done.seconds:.1f} s: {done.tokens_per_s:,.1f} tokens/s with {workers} worker(s) "
        f"-> {out}"
    )


@reward_app.command("score")
def reward_score(
    model: str = typer.Argument(
        ..., help="a reward model: checkpoint, HF folder, runs:/, models:/"
    ),
    data: Path = typer.Argument(..., help="JSONL: pairs (prompt/chosen/rejected) or samples"),
    out: Path = typer.Argument(..., help="new JSONL file: the records with their rewards"),
    max_length: int = typer.Option(
        None,
        help="tokens per prompt + reply (the reply is cut) [default: 1024, or the model's "
        "context where that is shorter]",
    ),
    workers: int = typer.Option(1, help="scorer actors (Ray Data actor pool)"),
    address: str = typer.Option(None, help=ADDRESS_HELP),
) -> None:
    """Score every reply with a reward model: pairs gain chosen_reward/rejected_reward, samples
    gain reward (then `synthesize rejection --verifier reward` keeps the best of N)."""
    from upcycle.config import ConfigError
    from upcycle.jobs.synthesize import SCORE_LENGTH, run_reward_score

    try:
        submit_if_remote(address)
        done = run_reward_score(model, data, out, max_length=max_length, workers=workers)
    except (ValueError, ConfigError, FileExistsError, FileNotFoundError) as e:
        fail(str(e))
    if max_length is None and done.max_length < SCORE_LENGTH:
        console.print(f"max_length: {done.max_length}, the model's context (the default "
                      f"{SCORE_LENGTH} is longer)")  # fmt: skip
    console.print(
        f"{done.records} records ({done.tokens:,} tokens) scored in {done.seconds:.1f} s: "
        f"{done.tokens / max(done.seconds, 1e-9):,.0f} tokens/s with {workers} worker(s) -> {out}"
    )
