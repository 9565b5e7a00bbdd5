"""Scoring with a reward model at scale: `upcycle reward score`.

Input JSONL, one record per line, of either kind:
- a preference pair {"prompt", "chosen", "rejected"} -> gains "chosen_reward" and "rejected_reward";
- a generated prompt {"prompt", "samples": [{"text", ...}, ...]} (`upcycle generate`) -> each
  sample gains "reward", which `upcycle synthesize rejection --verifier reward` reads (best-of-N).
A (prompt, reply) is read exactly as reward training reads it (upcycle.training.chat_data: the
chat template up to the assistant header, the reply and <|im_end|>, the reply cut to
`max_length`), and its reward is the score head's output at its last token.

Ray Data sends fixed groups of records to an actor pool of `RewardScorer`s (upcycle.synthesis.pool);
each loads the reward model once (one process) and scores its group's sequences in batches of
similar length. Output in input order, appearing whole.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch

from upcycle.synthesis.pool import map_groups, refuse_existing, write_jsonl
from upcycle.training.chat_data import fit_reply, prompt_tokens, read_jsonl, reply_tokens
from upcycle.training.data import DataError
from upcycle.training.evaluation import score_sequences

GROUP = 16  # records per Ray Data row


def read_scorable(path: Path, max_length: int) -> tuple[list[dict], int]:
    """The records of a pairs or generated file and the tokens to score; a malformed record,
    or a prompt that alone exceeds `max_length`, is named by file:line."""
    records, tokens = [], 0
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        if isinstance(record.get("samples"), list) and record["samples"]:
            texts = [s.get("text") if isinstance(s, dict) else None for s in record["samples"]]
        elif "chosen" in record or "rejected" in record:
            texts = [record.get("chosen"), record.get("rejected")]
        else:
            raise DataError(
                f"{where}: neither a pair ('chosen' and 'rejected') nor generated samples "
                "('samples': [{\"text\": ...}])"
            )
        if not all(isinstance(t, str) for t in texts):
            raise DataError(
                f"{where}: every reply ('chosen', 'rejected', samples' 'text') must be a string"
            )
        tokens += sum(map(len, sequences(record, max_length, where)))
        records.append(record)
    return records, tokens


def _replies(record: dict) -> list[str]:
    if "samples" in record:
        return [s["text"] for s in record["samples"]]
    return [record["chosen"], record["rejected"]]


def _with_rewards(record: dict, rewards: list[float]) -> dict:
    if "samples" in record:
        samples = [{**s, "reward": r} for s, r in zip(record["samples"], rewards, strict=True)]
        return {**record, "samples": samples}
    return {**record, "chosen_reward": rewards[0], "rejected_reward": rewards[1]}


def sequences(record: dict, max_length: int, where: str) -> list[list[int]]:
    """The token sequences of a record's replies, as reward training reads them."""
    prompt = prompt_tokens(record["prompt"], where)
    return [prompt + fit_reply(prompt, reply_tokens(t), max_length, where)[0]
            for t in _replies(record)]  # fmt: skip


class RewardScorer:
    """A Ray Data actor: one reward model (a one-rank process group held for the actor's life);
    each row is a group of records."""

    def __init__(self, ckpt: str, max_length: int, threads: int):
        from upcycle.dense.tokenizer import get_tokenizer
        from upcycle.moe.model import build_model
        from upcycle.platform.checkpoint import load_checkpoint, read_model_config
        from upcycle.platform.distributed import single_process

        torch.set_num_threads(threads)
        self._process = contextlib.ExitStack()
        self._process.enter_context(single_process())
        self.model = build_model(read_model_config(Path(ckpt))).eval()
        load_checkpoint(self.model, Path(ckpt))
        self.max_length, self.pad_id = max_length, get_tokenizer().eot_id

    def __call__(self, row: dict) -> dict:
        group = json.loads(row["group"])
        rewards = self.rewards([record for _, record in group], [i for i, _ in group])
        done = [
            [index, _with_rewards(record, r)]
            for (index, record), r in zip(group, rewards, strict=True)
        ]
        return {"group": json.dumps(done)}

    def rewards(self, records: list[dict], numbers: list[int] | None = None) -> list[list[float]]:
        """Each record's rewards (its pair's two, or one per sample); also an actor method, which
        RLHF calls with its rollouts (upcycle.rlhf.scorers)."""
        seqs, counts = [], []
        for at, record in enumerate(records):
            where = f"record {(numbers[at] if numbers else at) + 1}"
            batch = sequences(record, self.max_length, where)
            seqs += batch
            counts.append(len(batch))
        flat = iter(score_sequences(self.model, seqs, self.pad_id))
        return [[next(flat) for _ in range(n)] for n in counts]


def score_file(
    ckpt: Path, records: list[dict], out: Path, *, max_length: int, workers: int, threads: int = 1
) -> float:
    """Score `records` with `workers` scorer actors on the connected Ray cluster, write OUT;
    the seconds it took."""
    out = refuse_existing(out)
    start = time.monotonic()
    actor = {"ckpt": str(ckpt), "max_length": max_length, "threads": threads}
    done = map_groups(records, RewardScorer, actor, group=GROUP, workers=workers, num_cpus=1)
    seconds = time.monotonic() - start
    write_jsonl(out, done)
    return seconds
