"""Model-based quality rules for `data filter`: perplexity under a reference language model of
ours, and a reward model's score (the Qwen2 report scores pretraining data with a model).

    filters:
      perplexity: {model: runs/ref/step_0000100, max: 3000, max_tokens: 512}
      reward: {model: rm/, min: 0.0, prompt: "Write a useful Python module."}

- `perplexity`: exp of the mean next-token loss over the document's first `max_tokens` tokens,
  <|endoftext|> first so its first token is predicted too (the way pretraining sees a document
  after another). High perplexity: text unlike what the reference model learned.
- `reward`: the score head's output for the document as the reply to `prompt`, read as reward
  training reads a reply (upcycle.training.chat_data: the chat template, the reply cut to
  `max_tokens` with the prompt).

The documents a rule scores go through a Ray Data actor pool; each actor loads the model once
(a one-rank process group for its life) and scores its batch in right-padded forwards of
similar lengths (upcycle.training.evaluation). The model forward is called directly, not
through the serving engine: the engine computes the logits of the next token only, and a
perplexity needs every position's. Documents an earlier rule dropped are not scored.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from upcycle.config import ConfigError

MODEL_RULES = ("perplexity", "reward")
DEFAULT_PROMPT = "Write something worth reading."
_FIELDS = {"perplexity": ("model", "min", "max", "max_tokens"),
           "reward": ("model", "min", "max", "max_tokens", "prompt")}  # fmt: skip


@dataclass(frozen=True)
class ModelRule:
    rule: str  # one of MODEL_RULES
    model: str  # what `upcycle serve --model` accepts
    min: float | None = None
    max: float | None = None
    max_tokens: int = 512
    prompt: str = DEFAULT_PROMPT

    @classmethod
    def parse(cls, rule: str, limits: object) -> ModelRule:
        where = f"filters.{rule}"
        if not isinstance(limits, dict) or "model" not in limits:
            raise ConfigError(where, f"give a model and min, max or both; fields: {_FIELDS[rule]}")
        for key in limits:
            if key not in _FIELDS[rule]:
                raise ConfigError(f"{where}.{key}", f"unknown field; fields: {_FIELDS[rule]}")
        if not ("min" in limits or "max" in limits):
            raise ConfigError(where, "give min, max or both")
        for key in ("min", "max"):
            value = limits.get(key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                raise ConfigError(f"{where}.{key}", f"a number, got {value!r}")
        tokens = limits.get("max_tokens", 512)
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 2:
            raise ConfigError(f"{where}.max_tokens", f"an integer >= 2, got {tokens!r}")
        for key in ("model", "prompt"):
            if key in limits and not (isinstance(limits[key], str) and limits[key].strip()):
                raise ConfigError(f"{where}.{key}", f"a non-empty string, got {limits[key]!r}")
        return cls(rule, **limits)

    def checkpoint(self) -> Path:
        """The model's checkpoint, checked to be the kind the rule needs (before any work)."""
        from upcycle.deploy.sources import default_cache_dir, resolve
        from upcycle.platform.checkpoint import read_model_config

        ckpt = resolve(self.model, cache_dir=default_cache_dir())
        cfg = read_model_config(ckpt)
        if cfg.is_reward_model != (self.rule == "reward"):
            want = "a reward model (with a score head)" if self.rule == "reward" else (
                "a language model (a reward model has no next-token logits)")  # fmt: skip
            raise ConfigError(f"filters.{self.rule}.model", f"{self.model}: needs {want}")
        if self.max_tokens > cfg.max_position_embeddings:
            raise ConfigError(f"filters.{self.rule}.max_tokens",
                              f"exceeds the model's context, {cfg.max_position_embeddings}")  # fmt: skip
        if self.rule == "reward":
            from upcycle.training.chat_data import prompt_tokens

            if len(prompt_tokens(self.prompt, "")) >= self.max_tokens:
                raise ConfigError("filters.reward.prompt", "longer than max_tokens")
        return ckpt

    def reason(self, value: float) -> str | None:
        if self.min is not None and not value >= self.min:
            return f"{self.rule} {value:.4g} < min {self.min:g}"
        if self.max is not None and not value <= self.max:
            return f"{self.rule} {value:.4g} > max {self.max:g}"
        return None


class DocumentScorer:
    """A Ray Data actor: one model; scores a batch's documents that no earlier rule dropped,
    adds the rule's column (NaN where not scored) and drops by its bounds."""

    def __init__(self, ckpt: str, rule: dict, threads: int = 1):
        import torch

        from upcycle.dense.tokenizer import get_tokenizer
        from upcycle.moe.model import build_model
        from upcycle.platform.checkpoint import load_checkpoint, read_model_config
        from upcycle.platform.distributed import single_process

        torch.set_num_threads(threads)
        self._process = contextlib.ExitStack()
        self._process.enter_context(single_process())
        self.model = build_model(read_model_config(Path(ckpt))).eval()
        load_checkpoint(self.model, Path(ckpt))
        self.rule, self.tok = ModelRule(**rule), get_tokenizer()

    def __call__(self, batch: dict) -> dict:
        reasons = list(batch["reason"])
        todo = [i for i, r in enumerate(reasons) if not r]
        scores = np.full(len(reasons), np.nan)
        for i, value in zip(todo, self.scores([batch["text"][i] for i in todo]), strict=True):
            scores[i] = value
            reasons[i] = self.rule.reason(value) or ""
        return {**batch, "reason": reasons, self.rule.rule: scores}

    def scores(self, texts: list[str]) -> list[float]:
        from upcycle.training.evaluation import mean_token_losses, score_sequences

        if not texts:
            return []
        n = self.rule.max_tokens
        if self.rule.rule == "perplexity":
            seqs = [[self.tok.eot_id, *ids][:n] for ids in self.tok.encode_batch(texts)]
            return [math.exp(x) for x in mean_token_losses(self.model, seqs, self.tok.eot_id)]
        from upcycle.training.chat_data import fit_reply, prompt_tokens, reply_tokens

        prompt = prompt_tokens(self.rule.prompt, "filters.reward.prompt")
        seqs = [prompt + fit_reply(prompt, reply_tokens(t), n, "filters.reward")[0] for t in texts]
        return score_sequences(self.model, seqs, self.tok.eot_id)
