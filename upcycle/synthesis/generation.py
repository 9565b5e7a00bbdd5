"""Batch generation on Ray Data: K samples per prompt from the serving engine, at scale.

Prompts (JSONL, one per line): {"prompt": "raw text" or [ChatML messages], ...any task fields,
which are carried to the output}. A string is completed as it stands (HumanEval's code
prompts); messages get the chat template and the assistant header, as `upcycle serve`'s chat
endpoint does. Ray Data sends groups of prompts to an actor pool; each actor holds one
`ModelRunner` + `Engine`, the same model code and continuous batching as a serving replica, and
runs all K samples of its group's prompts through one engine at once.

Reproducible: sample k of prompt i draws from its own generator seeded from (seed, i, k), and
the groups are fixed by the driver (not by how Ray Data splits blocks; upcycle.synthesis.pool),
so a seed gives the same samples whatever the number of workers. Output, one line per prompt:
the prompt record plus "samples": [{"text", "completion_tokens", "logprob" (summed over the
completion), "finish_reason"}], written to a temporary file renamed onto OUT.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from upcycle.deploy.engine.sampling import SamplingParams
from upcycle.synthesis.pool import map_groups, refuse_existing, write_jsonl
from upcycle.training.chat_data import read_jsonl
from upcycle.training.data import DataError

GROUP = 8  # prompts per Ray Data row: the unit of work of one engine call
# tokens per sequence (prompt + completion) an engine holds unless told, or the model's context
# where that is shorter
GENERATE_LENGTH = 1024


@dataclass(frozen=True)
class GenerateSpec:
    samples: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int = 0
    stop: tuple[str, ...] = ()  # stop strings: a sample ends before the first one

    def check(self) -> None:
        """ValueError naming the field, before any actor starts."""
        if self.samples < 1:
            raise ValueError(f"samples: must be >= 1, got {self.samples}")
        if not 0 <= self.seed < 2**24:
            raise ValueError(f"seed: must be in [0, 2^24), got {self.seed}")
        self.params(0, 0).check()

    def params(self, index: int, k: int) -> SamplingParams:
        # distinct seeds for every (seed, prompt, sample) while K < 2^16 and prompts < 2^24
        seed = (self.seed << 40) | (index << 16) | k
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature,
                              top_p=self.top_p, seed=seed, stop=tuple(self.stop),
                              logprobs=True)  # fmt: skip


def read_prompts(path: Path) -> list[dict]:
    """The prompt records of a JSONL file; a malformed one is named by file:line."""
    records = []
    for number, record in read_jsonl(path):
        prompt = record.get("prompt")
        ok = (isinstance(prompt, str) and prompt) or (
            isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt)
        )
        if not ok:
            raise DataError(f"{path}:{number}: 'prompt' must be a string or a list of messages")
        if "samples" in record:
            raise DataError(f"{path}:{number}: 'samples' is what generation writes; remove it")
        records.append(record)
    return records


def prompt_ids(record: dict) -> list[int]:
    from upcycle.dense.tokenizer import chat_text, get_tokenizer

    tok, prompt = get_tokenizer(), record["prompt"]
    if isinstance(prompt, str):
        return tok.encode(prompt)
    return tok.encode(chat_text(prompt, add_generation_prompt=True), allow_special=True)


class SampleGenerator:
    """A Ray Data actor: one model and engine; each row is a group of prompts."""

    def __init__(self, ckpt: str, runner: dict, spec: dict):
        from upcycle.deploy.app import engine_args
        from upcycle.deploy.engine.batching import Engine
        from upcycle.deploy.engine.runner import ModelRunner, RunnerConfig

        rc = RunnerConfig(**runner)
        self.spec = GenerateSpec(**spec)
        self.engine = Engine(ModelRunner(Path(ckpt), rc).forward, **engine_args(ckpt, rc))

    def __call__(self, row: dict) -> dict:
        group = json.loads(row["group"])
        requests = {}
        for index, record in group:
            ids = prompt_ids(record)
            for k in range(self.spec.samples):
                rid = self.engine.add(ids, self.spec.params(index, k), f"{index}:{k}")
                requests[rid] = {"text": "", "completion_tokens": 0, "logprob": 0.0}
        while self.engine.has_work:
            for out in self.engine.step():
                sample = requests[out.request_id]
                sample["text"] += out.text
                sample["completion_tokens"] = out.completion_tokens
                sample["logprob"] += out.logprob
                if out.finish_reason:
                    sample["finish_reason"] = out.finish_reason
        done = [
            {**record, "samples": [requests[f"{index}:{k}"] for k in range(self.spec.samples)]}
            for index, record in group
        ]
        return {"group": json.dumps([[i, d] for (i, _), d in zip(group, done, strict=True)])}


@dataclass(frozen=True)
class Generated:
    prompts: int
    samples: int
    completion_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds else 0.0


def generate(
    ckpt: Path, runner: dict, prompts: list[dict], spec: GenerateSpec, out: Path, *, workers: int
) -> Generated:
    """Generate with `workers` engine actors on the connected Ray cluster; write OUT."""
    out = refuse_existing(out)
    start = time.monotonic()
    actor = {"ckpt": str(ckpt), "runner": runner, "spec": vars(spec)}
    cpus = runner.get("cpus_per_rank", 1.0)
    done = map_groups(prompts, SampleGenerator, actor, group=GROUP, workers=workers, num_cpus=cpus)
    seconds = time.monotonic() - start
    write_jsonl(out, done)
    tokens = sum(s["completion_tokens"] for r in done for s in r["samples"])
    return Generated(len(done), len(done) * spec.samples, tokens, seconds)
