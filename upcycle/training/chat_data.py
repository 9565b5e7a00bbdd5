"""Post-training samples from JSONL: ChatML conversations (SFT) and preference pairs (DPO and
reward models).

SFT, one conversation per line: {"messages": [{"role": "user", "content": "..."},
{"role": "assistant", "content": "..."}, ...]}. The loss covers the assistant's tokens only
(`Tokenizer.chat_tokens`). Conversations are packed, in an order shuffled by the seed, into rows
of `seq_length` tokens; each token carries its conversation's segment id, so attention stays
inside the conversation and positions restart at 0 (`Batch.attention_mask`, `Batch.positions`).
Unpacked (`sft.pack: false`), each conversation has a row of its own, padded.

DPO, one pair per line: {"prompt": "..." or [messages], "chosen": "...", "rejected": "..."}.
A sample is one pair; it becomes two rows (prompt + chosen, prompt + rejected), and a micro-batch
of k pairs is 2k rows: the k chosen rows, then the k rejected rows. The loss mask covers the
response (and its `<|im_end|>`), whose summed log-probabilities DPO compares; `Batch.lengths`
says where each row ends, for a reward model's score at its last token.

Offline post-training sets are small next to a pretraining corpus, so each rank tokenizes the
file at job start (tiktoken) instead of a `upcycle data prepare` pass; the samples depend only
on the file and the seed, so every rank builds the same ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from upcycle.dense.tokenizer import chat_text, get_tokenizer
from upcycle.training.data import Batch, DataError


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (a JSONL file, one example per line)")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: each line must be a JSON object")
        records.append((number, record))
    if not records:
        raise DataError(f"{path}: no examples")
    return records


def _messages(value, where: str, field: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: '{field}' must be a non-empty list of messages")
    return value


def _chat(messages: list, where: str) -> tuple[list[int], list[bool]]:
    try:
        return get_tokenizer().chat_tokens(messages)
    except (ValueError, AttributeError, TypeError) as e:
        raise DataError(f"{where}: {e}") from None


class PackedConversations:
    """SFT samples: rows of `seq_length` tokens packed with whole conversations (or, with
    `pack=False`, one conversation per row)."""

    def __init__(self, path: Path, seq_length: int, seed: int, *, pack: bool = True):
        self.path, self.seq_length, self.pack = Path(path), seq_length, pack
        examples = []
        self.truncated = 0
        for number, record in read_jsonl(path):
            where = f"{path}:{number}"
            if "messages" not in record:
                raise DataError(f"{where}: missing 'messages' (a list of {{role, content}})")
            ids, mask = _chat(_messages(record["messages"], where, "messages"), where)
            if not any(mask):
                raise DataError(f"{where}: no assistant message, so nothing to learn from")
            if len(ids) > seq_length:
                self.truncated += 1
                ids, mask = ids[:seq_length], mask[:seq_length]
            examples.append((ids, mask))
        order = np.random.default_rng(seed).permutation(len(examples))
        self.rows: list[list[tuple[list[int], list[bool]]]] = [[]]
        used = 0
        for i in order:
            ids, mask = examples[i]
            if used + len(ids) > seq_length or (used and not pack):
                self.rows.append([])
                used = 0
            self.rows[-1].append((ids, mask))
            used += len(ids)
        self.num_examples = len(examples)

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices: list[int]) -> Batch:
        n, s = len(indices), self.seq_length
        eot = get_tokenizer().eot_id
        tokens = torch.full((n, s), eot, dtype=torch.long)
        labels = torch.full((n, s), eot, dtype=torch.long)
        loss_mask = torch.zeros(n, s)
        segments = torch.full((n, s), -1, dtype=torch.long)  # padding: a segment of its own
        for r, index in enumerate(indices):
            at = 0
            for seg, (ids, mask) in enumerate(self.rows[index]):
                k = len(ids)
                tokens[r, at : at + k] = torch.tensor(ids)
                labels[r, at : at + k - 1] = torch.tensor(ids[1:])
                loss_mask[r, at : at + k - 1] = torch.tensor(mask[1:], dtype=torch.float)
                segments[r, at : at + k] = seg
                at += k
        return Batch(
            tokens=tokens,
            labels=labels,
            loss_mask=loss_mask,
            segments=segments if self.pack else None,  # one conversation: plain causal
        )

    def too_few(self, needed: int) -> str:
        return (
            f"{self.path}: {self.num_examples} conversations pack into {len(self)} rows of "
            f"{self.seq_length} tokens, fewer than one global batch ({needed}); add examples "
            "or lower train.seq_length / layout.global_batch_size"
        )


class PreferencePairs:
    """DPO and reward samples: (prompt, chosen, rejected) triples, each two rows of
    `seq_length` tokens."""

    def __init__(self, path: Path, seq_length: int):
        self.path, self.seq_length = Path(path), seq_length
        self.pairs = []
        self.truncated = 0
        for number, record in read_jsonl(path):
            where = f"{path}:{number}"
            for field in ("prompt", "chosen", "rejected"):
                if field not in record:
                    raise DataError(f"{where}: missing '{field}'")
            for field in ("chosen", "rejected"):
                if not isinstance(record[field], str):
                    raise DataError(f"{where}: '{field}' must be a string (the assistant reply)")
            prompt = prompt_tokens(record["prompt"], where)
            rows = []
            for field in ("chosen", "rejected"):
                response, cut = fit_reply(prompt, reply_tokens(record[field]), seq_length, where)
                self.truncated += cut
                rows.append((prompt, response))
            self.pairs.append(tuple(rows))

    def __len__(self) -> int:
        return len(self.pairs)

    def batch(self, indices: list[int]) -> Batch:
        """Rows [chosen of each pair..., rejected of each pair...]."""
        rows = [self.pairs[i][0] for i in indices] + [self.pairs[i][1] for i in indices]
        return Batch(**response_rows(rows, self.seq_length, get_tokenizer().eot_id))

    def too_few(self, needed: int) -> str:
        return (
            f"{self.path}: {len(self)} pairs, fewer than one global batch ({needed}); add pairs "
            "or lower layout.global_batch_size"
        )


def response_rows(rows: list[tuple[list[int], list[int]]], seq_length: int, pad: int) -> dict:
    """(prompt, response) token lists as right-padded rows: `tokens`, `labels` (the next
    tokens), `loss_mask` (the labels that are the response) and `lengths` (real tokens)."""
    n = len(rows)
    tokens = torch.full((n, seq_length), pad, dtype=torch.long)
    labels = torch.full((n, seq_length), pad, dtype=torch.long)
    loss_mask = torch.zeros(n, seq_length)
    for r, (prompt, response) in enumerate(rows):
        ids = prompt + response
        tokens[r, : len(ids)] = torch.tensor(ids)
        labels[r, : len(ids) - 1] = torch.tensor(ids[1:])
        loss_mask[r, len(prompt) - 1 : len(ids) - 1] = 1.0
    lengths = torch.tensor([len(p) + len(r) for p, r in rows])
    return dict(tokens=tokens, labels=labels, loss_mask=loss_mask, lengths=lengths)


def prompt_tokens(prompt: str | list, where: str) -> list[int]:
    """A pair's or sample's prompt (a string is one user message) as the conversation so far,
    ending with the assistant header; errors name `where`."""
    messages = _messages(prompt, where, "prompt")
    return get_tokenizer().encode(_chat_prompt(messages, where), allow_special=True)


def reply_tokens(text: str) -> list[int]:
    """An assistant reply as the model reads it: its tokens, then <|im_end|>."""
    tok = get_tokenizer()
    return tok.encode(text) + [tok.im_end_id]


def fit_reply(
    prompt: list[int], reply: list[int], seq_length: int, where: str
) -> tuple[list[int], bool]:
    """`reply` cut so prompt + reply fit `seq_length` (and whether it was cut); a prompt that
    alone does not fit is an error naming `where`."""
    if len(prompt) >= seq_length:
        raise DataError(
            f"{where}: the prompt alone is {len(prompt)} tokens, not below the sequence length "
            f"({seq_length}); raise it or shorten the prompt"
        )
    cut = len(prompt) + len(reply) > seq_length
    return reply[: seq_length - len(prompt)], cut


def _chat_prompt(messages: list, where: str) -> str:
    try:
        return chat_text(messages, add_generation_prompt=True)
    except (ValueError, AttributeError, TypeError) as e:
        raise DataError(f"{where}: {e}") from None
