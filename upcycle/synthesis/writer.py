"""A model that writes: chat replies from the generation engine's Ray Data pool, for the jobs
that ask a model to write post-training data (instruction evolution, constitutional feedback,
data repurposing), with the checks every such output passes.

`Writer.load` resolves the model and the engine settings without Ray (bad input fails before
any actor starts); `reply(conversations)` sends one chat prompt per item through
`SampleGenerator` actors (generation.py: the serving engine and its continuous batching) and
returns each item's text, in order. A call is one actor pool: a job that asks in several rounds
(evolve's rounds, critique then revision) loads the model once per round, which at the pool's
scale is small beside the generation itself. Samples are seeded per item and per call (`salt`),
so a job's output does not depend on the number of workers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from upcycle.config import ConfigError
from upcycle.curation.documents import words
from upcycle.synthesis.generation import (
    GENERATE_LENGTH,
    GROUP,
    GenerateSpec,
    SampleGenerator,
    prompt_ids,
)
from upcycle.synthesis.pool import map_groups
from upcycle.training.data import DataError


@dataclass(frozen=True)
class Lengths:
    """Bounds on a written text's words; a text outside them, empty, or the same words as its
    source is dropped with the reason."""

    min_words: int = 1
    max_words: int = 1024

    def check(self) -> None:
        if not 1 <= self.min_words <= self.max_words:
            raise ValueError(
                f"min_words, max_words: need 1 <= min_words <= max_words, got "
                f"{self.min_words}, {self.max_words}"
            )

    def reason(self, text: str, source: str) -> str | None:
        """Why `text`, written from `source`, is dropped; None: kept."""
        w = words(text)
        if not w:
            return "empty"
        if w == words(source):
            return "copy"
        if len(w) < self.min_words:
            return f"short: {len(w)} words < {self.min_words}"
        if len(w) > self.max_words:
            return f"long: {len(w)} words > {self.max_words}"
        return None


def read_yaml_key(path: Path, key: str) -> object:
    """The value of a YAML file that is a mapping with the one key `key`; ConfigError(key)
    otherwise (a template or principles file)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(key, f"cannot read {path}: {e}") from None
    if not isinstance(data, dict) or set(data) != {key}:
        raise ConfigError(key, f"{path}: a mapping with one key, {key}")
    return data[key]


def instruction_of(record: dict, where: str) -> str:
    """The instruction of a prompt or conversation record: `instruction`, `prompt` (a string, or
    its messages' last user turn) or `messages` (the first user turn)."""
    if "instruction" in record:
        value = record["instruction"]
    elif "prompt" in record:
        value = _user_turn(record["prompt"], -1)
    else:
        value = _user_turn(record.get("messages"), 0)
    if not isinstance(value, str) or not value.strip():
        raise DataError(
            f"{where}: needs an instruction: 'instruction' or 'prompt' (a string or messages "
            "with a user turn), or 'messages' with a user turn"
        )
    return value


def _user_turn(value, which: int):
    """A string as it is; of a list of messages, the `which`-th user turn's content."""
    if not isinstance(value, list):
        return value
    turns = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "user"]
    return turns[which] if turns else None


def user(text: str, system: str | None = None) -> list[dict]:
    """A one-turn conversation."""
    head = [{"role": "system", "content": system}] if system else []
    return [*head, {"role": "user", "content": text}]


@dataclass(frozen=True)
class Writer:
    """A resolved model and engine settings, and the sampling every reply uses."""

    ckpt: Path
    runner: dict  # RunnerConfig fields
    spec: GenerateSpec
    workers: int
    vocab_limit: int

    @classmethod
    def load(cls, model: str, spec: GenerateSpec, *, workers: int, engine: dict) -> Writer:
        """The model (what `upcycle serve --model` accepts) and engine settings (the serve
        spec's engine section; max_model_len None or absent: GENERATE_LENGTH, or the model's
        context where that is shorter), checked; no Ray needed."""
        from upcycle.deploy.app import engine_limits, resolve_model
        from upcycle.deploy.spec import ServeSpec

        spec.check()
        if workers < 1:
            raise ValueError(f"workers: must be >= 1, got {workers}")
        engine = {k: v for k, v in engine.items() if v is not None}
        serve_spec = ServeSpec.parse({"model": model, "engine": engine}, "command line")
        serve_spec, ckpt, _cfg = resolve_model(serve_spec, max_model_len=GENERATE_LENGTH)
        vocab_limit, _ = engine_limits(str(ckpt))
        return cls(ckpt, serve_spec.engine.model_dump(), spec, workers, vocab_limit)

    def check(self, record: dict, index: int = 0) -> None:
        """ValueError ("field: why") if the engine cannot take `record` ({"prompt": ...})."""
        from upcycle.deploy.engine.batching import check_request

        check_request(prompt_ids(record), self.spec.params(index, 0),
                      max_model_len=self.runner["max_model_len"],
                      vocab_limit=self.vocab_limit)  # fmt: skip

    def fits(self, conversation: list[dict]) -> bool:
        """Whether the engine can take `conversation` with `max_tokens` to spare."""
        try:
            self.check({"prompt": conversation})
        except ValueError:
            return False
        return True

    def reply(self, conversations: list[list[dict]], *, salt: int = 0) -> list[str]:
        """The reply to each conversation (stripped), in order, from the connected Ray
        cluster; `salt` gives one call's samples seeds of their own."""
        if not conversations:
            return []
        spec = dataclasses.replace(self.spec, seed=(self.spec.seed + salt) % 2**24)
        actor = {"ckpt": str(self.ckpt), "runner": self.runner, "spec": vars(spec)}
        done = map_groups([{"prompt": c} for c in conversations], SampleGenerator, actor,
                          group=GROUP, workers=self.workers,
                          num_cpus=self.runner.get("cpus_per_rank", 1.0))  # fmt: skip
        return [r["samples"][0]["text"].strip() for r in done]
