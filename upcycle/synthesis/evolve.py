"""Instruction evolution (Evol-Instruct, Xu et al. 2023): a model rewrites instructions into
harder ones, the Qwen2 report's way of adding constraints and steps to existing instructions.

Each round, every instruction still in play gets one rewriting template, drawn by a generator
seeded from (seed, instruction, round), so the draw does not depend on the number of workers.
A template is a prompt with an `{instruction}` slot; the defaults are Evol-Instruct's in-depth
operations (add a constraint, deepen, concretise, more reasoning steps) and its in-breadth one
(a new instruction of the same kind). A rewrite is kept when it passes `Lengths` (non-empty,
not a copy of what it rewrote, within word bounds), and is what the next round rewrites;
one dropped, or whose prompt does not fit the engine's context, ends its line there.

Output records (the prompt format `upcycle generate`, `rlhf` and `synthesize constitutional`
read): {"prompt": [{"role": "user", "content": rewrite}], "evolved_from": the instruction
rewritten, "template": name, "round": r (1 = from the input), "origin": the input's line}.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from upcycle.config import ConfigError
from upcycle.synthesis.writer import Lengths, Writer, read_yaml_key, user

_REWRITER = (
    "I want you to act as a Prompt Rewriter. Rewrite the given prompt into a more complex "
    "version that a person can still understand and answer. {how} Add at most 20 words. "
    "Reply with the rewritten prompt only.\n\n#Given Prompt#:\n{{instruction}}\n\n"
    "#Rewritten Prompt#:"
)
DEFAULT_TEMPLATES = {
    "constraints": _REWRITER.format(how="Add one more constraint or requirement to it."),
    "deepen": _REWRITER.format(how="Increase the depth and breadth of the inquiry it makes."),
    "concretize": _REWRITER.format(how="Replace general concepts with more specific ones."),
    "reasoning": _REWRITER.format(
        how="If it can be solved in a few simple steps, ask explicitly for several steps of "
        "reasoning."
    ),
    "breadth": (
        "I want you to act as a Prompt Creator. Draw inspiration from the given prompt to create "
        "a brand new prompt of the same domain and a similar length, but rarer. Reply with the "
        "created prompt only.\n\n#Given Prompt#:\n{instruction}\n\n#Created Prompt#:"
    ),
}


def load_templates(path: Path | None) -> dict[str, str]:
    """Name -> template from a YAML file {templates: {name: "... {instruction} ..."}}; None: the
    defaults."""
    if path is None:
        return dict(DEFAULT_TEMPLATES)
    templates = read_yaml_key(path, "templates")
    if not isinstance(templates, dict) or not templates:
        raise ConfigError("templates", f"{path}: maps names to prompts with an {{instruction}}")
    for name, text in templates.items():
        if not isinstance(text, str) or "{instruction}" not in text:
            raise ConfigError(f"templates.{name}", "must be a string with an {instruction} slot")
        try:
            text.format(instruction="")
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(
                f"templates.{name}",
                f"only {{instruction}} may be in braces ({e!r}); write a "
                "literal brace twice: {{ }}",
            ) from None
    return templates


@dataclass
class Evolved:
    kept: list[dict]  # output records (module docstring)
    dropped: list[dict]  # {origin, round, template, reason}
    inputs: int


def evolve(writer: Writer, instructions: list[tuple[int, str]], templates: dict[str, str], *,
           rounds: int, lengths: Lengths, seed: int) -> Evolved:  # fmt: skip
    """`rounds` rounds of rewriting of (input line, instruction) pairs."""
    if rounds < 1:
        raise ValueError(f"rounds: must be >= 1, got {rounds}")
    names = sorted(templates)
    kept, dropped = [], []
    current = list(instructions)
    for r in range(1, rounds + 1):
        picked = [names[random.Random(f"{seed}:{origin}:{r}").randrange(len(names))]
                  for origin, _ in current]  # fmt: skip
        asks = [user(templates[n].format(instruction=text))
                for n, (_, text) in zip(picked, current, strict=True)]  # fmt: skip
        fit = [i for i, ask in enumerate(asks) if writer.fits(ask)]
        replies = dict(zip(fit, writer.reply([asks[i] for i in fit], salt=r), strict=True))
        survivors = []
        for i, ((origin, text), name) in enumerate(zip(current, picked, strict=True)):
            reply = replies.get(i)
            why = "prompt too long" if reply is None else lengths.reason(reply, text)
            if why:
                dropped.append({"origin": origin, "round": r, "template": name, "reason": why})
                continue
            kept.append({"prompt": user(reply), "evolved_from": text, "template": name,
                         "round": r, "origin": origin})  # fmt: skip
            survivors.append((origin, reply))
        current = survivors
    return Evolved(kept, dropped, len(instructions))
