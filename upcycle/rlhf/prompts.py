"""The prompts of an RLHF run: read and checked once, then a fixed slice per iteration.

A prompt record is what `upcycle generate` reads ({"prompt": text or ChatML messages, ...task
fields}); the verifier scorers need their task fields (`answer`, or `tests`). Iteration i takes
the next `prompts_per_iteration` prompts of one seeded permutation (a new permutation for each
pass over the file), so a resumed run samples exactly the prompts the first run would have.
"""

from __future__ import annotations

import random
from pathlib import Path

from upcycle.config import ConfigError, ModelConfig
from upcycle.synthesis.generation import prompt_ids, read_prompts

_TASK_FIELDS = {"exact": "answer", "execution": "tests"}


def read_tasks(path: Path, job, cfg: ModelConfig) -> list[dict]:
    """The prompt records with their token ids (`ids`); a record that a scorer or the model
    cannot take is named by file:line."""
    if not path.is_file():
        raise ConfigError("prompts", f"{path} is not a file (JSONL of {{'prompt': ...}})")
    tasks = []
    for number, record in enumerate(read_prompts(path), start=1):
        where = f"{path}:{number}"
        needed = _TASK_FIELDS.get(job.scorer)
        if needed and needed not in record:
            raise ConfigError(
                "prompts", f"{where}: scorer {job.scorer!r} needs each prompt's {needed!r}"
            )
        ids = prompt_ids(record)
        if bad := [t for t in ids if t >= cfg.vocab_size]:
            raise ConfigError(
                "prompts", f"{where}: token ids {bad[:4]} outside the policy's vocabulary "
                f"({cfg.vocab_size})",
            )  # fmt: skip
        if len(ids) + job.rollout.max_tokens > cfg.max_position_embeddings:
            raise ConfigError(
                "rollout.max_tokens",
                f"{where}: {len(ids)} prompt tokens + {job.rollout.max_tokens} exceed the "
                f"policy's max_position_embeddings ({cfg.max_position_embeddings})",
            )
        tasks.append({**record, "ids": ids})
    if len(tasks) < job.prompts_per_iteration:
        raise ConfigError(
            "prompts_per_iteration",
            f"{job.prompts_per_iteration} exceeds the {len(tasks)} prompts in {path}",
        )
    return tasks


def iteration_prompts(count: int, per_iteration: int, iteration: int, seed: int) -> list[int]:
    """The indices of the prompts iteration `iteration` samples from."""
    first = iteration * per_iteration
    out = []
    for at in range(first, first + per_iteration):
        epoch, offset = divmod(at, count)
        order = list(range(count))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.append(order[offset])
    return out
