"""Needle in a haystack: does the model retrieve one fact planted at a given depth of a long
context? (Qwen2 report, long-context evaluation.)

For each context length L (tokens) and depth d (0: the start of the context, 1: its end), each
trial builds one ChatML user turn of exactly L tokens: held-out text (the prepared shards, from a
random offset, control tokens dropped) with the needle "The secret number is NNNNN." inserted
after round(d * haystack) tokens, then the question. The model answers greedily through the
serving engine (with Dual Chunk Attention when `dual_chunk_length` is set, so L may exceed the
trained length); a trial retrieves the needle when the number appears in the first 12 answer
tokens. Accuracy per (length, depth) cell is the share of its trials that retrieved it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from upcycle.config import ConfigError
from upcycle.dense.tokenizer import IM_END, IM_START, Tokenizer, get_tokenizer

NEEDLE = "The secret number is {number}."
QUESTION = "What is the secret number? Answer with the number only."
ANSWER_TOKENS = 12


@dataclass(frozen=True)
class NeedleSpec:
    lengths: tuple[int, ...] = (256, 512, 1024)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    trials: int = 2  # prompts per cell (different haystack offsets and numbers)
    seed: int = 0
    dual_chunk_length: int = 0  # serving engine's DCA setting (0: plain attention)

    def runner_config(self):
        """The serving engine's settings for this grid (checked against the model with
        `.check(cfg)` before any work)."""
        from upcycle.deploy.engine.runner import RunnerConfig

        return RunnerConfig(
            max_num_seqs=4,
            max_model_len=max(self.lengths) + ANSWER_TOKENS,
            max_step_tokens=512,
            dual_chunk_length=self.dual_chunk_length,
        )

    def __post_init__(self) -> None:
        if not self.lengths or min(self.lengths) < 1:
            raise ConfigError("lengths", f"need positive context lengths, got {self.lengths}")
        if not self.depths or not all(0 <= d <= 1 for d in self.depths):
            raise ConfigError("depths", f"need depths in [0, 1], got {self.depths}")
        if self.trials < 1:
            raise ConfigError("trials", f"must be >= 1, got {self.trials}")


@dataclass(frozen=True)
class Trial:
    length: int
    depth: float
    number: int
    needle_at: int  # token index of the needle in the prompt
    answer: str = ""

    @property
    def retrieved(self) -> bool:
        return str(self.number) in self.answer


@dataclass(frozen=True)
class NeedleResult:
    spec: NeedleSpec
    trials: list[Trial] = field(default_factory=list)

    def accuracy(self) -> np.ndarray:
        """[lengths, depths] share of trials that retrieved the needle."""
        grid = np.zeros((len(self.spec.lengths), len(self.spec.depths)))
        for t in self.trials:
            grid[self.spec.lengths.index(t.length), self.spec.depths.index(t.depth)] += t.retrieved
        return grid / self.spec.trials

    def metrics(self) -> dict[str, float]:
        grid = self.accuracy()
        out = {"niah_accuracy": float(grid.mean())}
        for i, length in enumerate(self.spec.lengths):
            out[f"niah_accuracy/len_{length}"] = float(grid[i].mean())
            for j, depth in enumerate(self.spec.depths):
                out[f"niah/len_{length}/depth_{depth:g}"] = float(grid[i, j])
        return out


def build_prompt(
    tok: Tokenizer, haystack: np.ndarray, length: int, depth: float, number: int
) -> tuple[list[int], int]:
    """A `length`-token prompt with the needle after `depth` of the haystack; (ids, needle index)."""
    head = tok.encode(f"{IM_START}user\n", allow_special=True)
    tail = tok.encode(f"\n{QUESTION}{IM_END}\n{IM_START}assistant\n", allow_special=True)
    needle = tok.encode(f" {NEEDLE.format(number=number)} ")
    room = length - len(head) - len(needle) - len(tail)
    if room < 1:
        raise ConfigError(
            "lengths",
            f"{length} tokens cannot hold the needle and the question; use >= {length - room + 1}",
        )
    if room > len(haystack):
        raise ConfigError("data", f"{len(haystack):,} haystack tokens, fewer than {room:,} needed")
    at = round(depth * room)
    hay = haystack[:room].tolist()
    return head + hay[:at] + needle + hay[at:] + tail, len(head) + at


def run_grid(ckpt: Path, data: Path, spec: NeedleSpec) -> NeedleResult:
    """Every (length, depth, trial) prompt through one serving engine; greedy answers."""
    from upcycle.deploy.engine.batching import Engine
    from upcycle.deploy.engine.runner import ModelRunner
    from upcycle.deploy.engine.sampling import SamplingParams
    from upcycle.platform.checkpoint import read_model_config
    from upcycle.platform.cpu import apply_cpu_patches
    from upcycle.training.data import TokenDataset

    apply_cpu_patches()
    tok = get_tokenizer()
    tokens = TokenDataset(Path(data)).tokens
    haystack_all = tokens[tokens < tok.eot_id]  # text only: no document or chat markers
    rng = np.random.default_rng(spec.seed)
    trials, prompts = [], []
    for length in spec.lengths:
        for depth in spec.depths:
            for _ in range(spec.trials):
                start = int(rng.integers(0, max(1, len(haystack_all) - length)))
                number = int(rng.integers(10_000, 100_000))
                ids, at = build_prompt(tok, haystack_all[start:], length, depth, number)
                trials.append(Trial(length, depth, number, at))
                prompts.append(ids)
    rc = spec.runner_config()
    cfg = read_model_config(Path(ckpt))
    rc.check(cfg)
    runner = ModelRunner(Path(ckpt), rc)
    engine = Engine(
        runner.forward,
        num_blocks=runner.num_blocks,
        block_size=rc.block_size,
        max_num_seqs=rc.max_num_seqs,
        max_model_len=rc.max_model_len,
        max_step_tokens=rc.max_step_tokens,
        eos_ids=(tok.eot_id, tok.im_end_id),
        vocab_limit=min(cfg.vocab_size, tok.vocab_size),
        decode=tok.decode,
    )
    greedy = SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0)
    for i, ids in enumerate(prompts):
        engine.add(ids, greedy, request_id=str(i))
    answers = {str(i): "" for i in range(len(prompts))}
    while engine.has_work:
        for out in engine.step():
            answers[out.request_id] += out.text
    done = [
        Trial(t.length, t.depth, t.number, t.needle_at, answers[str(i)])
        for i, t in enumerate(trials)
    ]
    return NeedleResult(spec, done)
