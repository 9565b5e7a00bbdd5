"""`upcycle synthesize evolve`, `constitutional` and `repurpose`: post-training data written by
a model on the generation engine's Ray Data pool (upcycle.jobs.synthesize_text). The sampling,
engine and length options are the same for the three commands."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import typer

from upcycle.jobs.cli.common import ADDRESS_HELP, console, fail, submit_if_remote, synthesize_app

MODEL = typer.Argument(..., help="the writing model: what `upcycle serve --model` accepts")
OUT = typer.Argument(..., help="new folder: the JSONL output and report.json")
INSTRUCTIONS = typer.Argument(
    ..., help="JSONL: {instruction} or {prompt: text or messages} or {messages}"
)
TEMPERATURE = typer.Option(0.7, help="0: greedy; up to 2")
TOP_P = typer.Option(0.95)
MAX_TOKENS = typer.Option(256, help="tokens per written reply")
SEED = typer.Option(0, help="the same seed writes the same data")
WORKERS = typer.Option(1, help="engine actors (Ray Data actor pool)")
MAX_MODEL_LEN = typer.Option(
    None, help="tokens per sequence [default: 1024, or the model's context where shorter]"
)
MIN_WORDS = typer.Option(1, help="a written text with fewer words is dropped")
MAX_WORDS = typer.Option(1024, help="a written text with more words is dropped")
RUN_NAME = typer.Option(None, help="MLflow run name")
ADDRESS = typer.Option(None, help=ADDRESS_HELP)


def _run(job: Callable[[dict], dict], options: dict) -> dict:
    """Submit (with --address) or run `job(common)` here, `common` being the settings every
    command shares, read from its `options` (its parameters); exit 2 naming the bad input."""
    from upcycle.config import ConfigError
    from upcycle.synthesis.generation import GenerateSpec
    from upcycle.synthesis.writer import Lengths

    spec = GenerateSpec(**{k: options[k] for k in ("temperature", "top_p", "max_tokens", "seed")})
    common = {"spec": spec, "engine": {"max_model_len": options["max_model_len"]},
              "workers": options["workers"], "run_name": options["run_name"],
              "lengths": Lengths(options["min_words"], options["max_words"])}  # fmt: skip
    try:
        submit_if_remote(options["address"])
        report = job(common)
    except (ValueError, ConfigError, FileExistsError, FileNotFoundError) as e:
        fail(str(e))
    reasons = ", ".join(f"{k} {n}" for k, n in report["dropped_by_reason"].items()) or "none"
    console.print(f"{report['inputs']} in, dropped {report['dropped']} ({reasons}) in "
                  f"{report['seconds']:.1f} s -> {options['out']}")  # fmt: skip
    return report


@synthesize_app.command("evolve")
def evolve(
    model: str = MODEL,
    instructions: Path = INSTRUCTIONS,
    out: Path = OUT,
    templates: Path = typer.Option(
        None, help="YAML {templates: {name: '... {instruction} ...'}} [default: Evol-Instruct's]"
    ),
    rounds: int = typer.Option(1, help="each round rewrites the last round's survivors"),
    temperature: float = TEMPERATURE,
    top_p: float = TOP_P,
    max_tokens: int = MAX_TOKENS,
    seed: int = SEED,
    workers: int = WORKERS,
    max_model_len: int = MAX_MODEL_LEN,
    min_words: int = MIN_WORDS,
    max_words: int = MAX_WORDS,
    run_name: str = RUN_NAME,
    address: str = ADDRESS,
) -> None:
    """Instruction evolution (Evol-Instruct): rewrite each instruction into a harder one with a
    template drawn per instruction; OUT/prompts.jsonl is a prompt file for `upcycle generate`."""
    from upcycle.jobs.synthesize_text import run_evolve

    report = _run(
        lambda common: run_evolve(
            model, instructions, out, templates=templates, rounds=rounds, **common
        ),
        locals(),
    )
    console.print(f"{report['prompts']} evolved instructions -> {out / 'prompts.jsonl'}")


@synthesize_app.command("constitutional")
def constitutional(
    model: str = MODEL,
    instructions: Path = INSTRUCTIONS,
    out: Path = OUT,
    principles: Path = typer.Option(..., help="YAML {principles: [text, ...]}"),
    revise: bool = typer.Option(False, help="critique the followed reply, then revise it"),
    temperature: float = TEMPERATURE,
    top_p: float = TOP_P,
    max_tokens: int = MAX_TOKENS,
    seed: int = SEED,
    workers: int = WORKERS,
    max_model_len: int = MAX_MODEL_LEN,
    min_words: int = MIN_WORDS,
    max_words: int = MAX_WORDS,
    run_name: str = RUN_NAME,
    address: str = ADDRESS,
) -> None:
    """Constitutional feedback: per instruction a reply that follows the principles and one that
    breaks them; OUT/sft.jsonl (the followed ones) and OUT/dpo.jsonl (followed over broken)."""
    from upcycle.jobs.synthesize_text import run_constitutional

    report = _run(
        lambda common: run_constitutional(
            model, instructions, out, principles=principles, revise=revise, **common
        ),
        locals(),
    )
    console.print(f"{report['sft']} SFT conversations, {report['dpo']} DPO pairs -> {out}")


@synthesize_app.command("repurpose")
def repurpose(
    model: str = MODEL,
    out: Path = OUT,
    sources: list[Path] = typer.Argument(..., help="text / JSONL / Parquet files or folders"),
    text_field: str = typer.Option("text", help="JSONL key or Parquet column holding the text"),
    passage_tokens: int = typer.Option(
        None,
        help="longer texts are cut into passages of whole paragraphs [default: what the "
        "context holds beside the prompt and --max-tokens]",
    ),
    temperature: float = TEMPERATURE,
    top_p: float = TOP_P,
    max_tokens: int = typer.Option(64, help="tokens per written instruction"),
    seed: int = SEED,
    workers: int = WORKERS,
    max_model_len: int = MAX_MODEL_LEN,
    min_words: int = MIN_WORDS,
    max_words: int = typer.Option(64, help="an instruction with more words is dropped"),
    run_name: str = RUN_NAME,
    address: str = ADDRESS,
) -> None:
    """Data repurposing: write the instruction each text (or passage of a long one) answers;
    OUT/sft.jsonl pairs it with the text as the response."""
    from upcycle.jobs.synthesize_text import run_repurpose

    report = _run(
        lambda common: run_repurpose(
            model, sources, out, text_field=text_field, passage_tokens=passage_tokens, **common
        ),
        locals(),
    )
    console.print(f"{report['sft']} SFT conversations -> {out / 'sft.jsonl'}")
