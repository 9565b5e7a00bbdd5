"""Choosing the next token: greedy, or temperature + top-k + top-p with a per-request seed.

Each request carries its own `torch.Generator`, so a seeded request draws the same tokens
whatever else shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of generation (OpenAI's fields, plus top_k)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one
    stop_token_ids: tuple[int, ...] = field(default=())  # besides the model's end tokens
    ignore_eos: bool = False
    logprobs: bool = False  # report each sampled token's log-probability (under temperature 1)

    def check(self) -> None:
        """Raise ValueError naming the field for values outside what OpenAI's API allows."""
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature: must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0 (0 turns it off), got {self.top_k}")

    def generator(self) -> torch.Generator:
        g = torch.Generator()
        if self.seed is not None:
            g.manual_seed(self.seed)
        else:
            g.seed()
        return g


# The nucleus is looked for among this many top tokens first; a full sort only when it is wider.
_NUCLEUS_PROBE = 1024


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
) -> list[int]:
    """One token per row of `logits` [rows, vocab] (fp32)."""
    out = logits.argmax(-1).tolist()
    for row, (p, g) in enumerate(zip(params, generators, strict=True)):
        if p.temperature == 0.0 or p.top_k == 1:
            continue
        probs = torch.softmax(logits[row] / p.temperature, -1)
        out[row] = _draw(probs, p, g)
    return out


def _draw(probs: torch.Tensor, p: SamplingParams, g: torch.Generator) -> int:
    k = p.top_k or probs.numel()
    if p.top_p < 1.0:
        probe = min(k, _NUCLEUS_PROBE)
        top, ids = probs.topk(probe)
        if probe < k and top.sum() < p.top_p:  # the nucleus is wider than the probe
            top, ids = probs.topk(k)
        # keep the smallest prefix whose mass reaches top_p (the token crossing it included)
        keep = (torch.cumsum(top, 0) - top) < p.top_p
        top, ids = top[keep], ids[keep]
    elif p.top_k:
        top, ids = probs.topk(k)
    else:
        return int(torch.multinomial(probs, 1, generator=g))
    return int(ids[torch.multinomial(top, 1, generator=g)])
