"""Constitutional feedback: per instruction, a reply that follows stated principles and one that
breaks them, as SFT demonstrations and DPO preference pairs (the Qwen2 report's post-training
data, after Bai et al. 2022's Constitutional AI).

The principles are a YAML file {principles: ["...", ...]}. The model answers each instruction
twice, with a system prompt that lists the principles and asks it to follow them, then to break
them. With `revise`, it then critiques the following reply against the principles and rewrites
it from the critique (critique-and-revise); the revision is the demonstration. The principles
are not in the written data: a model trained on it learns the behaviour without the prompt.

Kept when both replies pass `Lengths` (non-empty, not the instruction, within word bounds) and
differ. Output: sft.jsonl {"messages": [user, assistant: the followed (or revised) reply]} and
dpo.jsonl {"prompt": [user], "chosen": followed, "rejected": broken}, the formats `upcycle sft`
and `upcycle dpo` read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from upcycle.config import ConfigError
from upcycle.curation.documents import words
from upcycle.synthesis.writer import Lengths, Writer, read_yaml_key, user

_FOLLOW = "Answer the user. Your reply must follow every one of these principles:\n{rules}"
_BREAK = (
    "Answer the user. Your reply must break these principles (it is an example of what not to "
    "write):\n{rules}"
)
_CRITIQUE = (
    "Principles:\n{rules}\n\nInstruction:\n{instruction}\n\nResponse:\n{reply}\n\nPoint out, "
    "briefly, where the response breaks the principles."
)
_REVISE = (
    "Principles:\n{rules}\n\nInstruction:\n{instruction}\n\nResponse:\n{reply}\n\nCritique:\n"
    "{critique}\n\nRewrite the response so that it follows every principle. Reply with the "
    "rewritten response only."
)


def load_principles(path: Path) -> list[str]:
    """The principles of a YAML file {principles: [text, ...]}."""
    rules = read_yaml_key(path, "principles")
    if not isinstance(rules, list) or not rules:
        raise ConfigError("principles", f"{path}: a non-empty list of principles")
    for i, rule in enumerate(rules):
        if not isinstance(rule, str) or not rule.strip():
            raise ConfigError(f"principles[{i}]", "must be a non-empty string")
    return rules


@dataclass
class Feedback:
    sft: list[dict]
    dpo: list[dict]
    dropped: list[dict]  # {origin, reason}
    inputs: int


def constitutional(writer: Writer, instructions: list[tuple[int, str]], principles: list[str],
                   *, lengths: Lengths, revise: bool = False) -> Feedback:  # fmt: skip
    """Followed and broken replies to (input line, instruction) pairs (module docstring)."""
    rules = "\n".join(f"{i}. {p}" for i, p in enumerate(principles, start=1))
    asks = {
        "follow": [user(t, _FOLLOW.format(rules=rules)) for _, t in instructions],
        "break": [user(t, _BREAK.format(rules=rules)) for _, t in instructions],
    }
    fit = [i for i in range(len(instructions))
           if writer.fits(asks["follow"][i]) and writer.fits(asks["break"][i])]  # fmt: skip
    texts = [instructions[i][1] for i in fit]
    # both replies of every instruction in one call: one actor pool, one model load
    both = writer.reply([asks["follow"][i] for i in fit] + [asks["break"][i] for i in fit])
    follow, broken = both[: len(fit)], both[len(fit) :]
    if revise:
        follow = _revised(writer, rules, texts, follow)
    replies = {i: (f, b) for i, f, b in zip(fit, follow, broken, strict=True)}
    sft, dpo, dropped = [], [], []
    for i, (origin, text) in enumerate(instructions):
        if i not in replies:
            dropped.append({"origin": origin, "reason": "prompt too long"})
            continue
        chosen, rejected = replies[i]
        why = (_named("followed", lengths.reason(chosen, text))
               or _named("broken", lengths.reason(rejected, text))
               or ("same reply" if words(chosen) == words(rejected) else None))  # fmt: skip
        if why:
            dropped.append({"origin": origin, "reason": why})
            continue
        sft.append({"messages": [*user(text), {"role": "assistant", "content": chosen}]})
        dpo.append({"prompt": user(text), "chosen": chosen, "rejected": rejected})
    return Feedback(sft, dpo, dropped, len(instructions))


def _named(which: str, reason: str | None) -> str | None:
    return f"{which} reply {reason}" if reason else None


def _revised(writer: Writer, rules: str, texts: list[str], replies: list[str]) -> list[str]:
    """Each reply critiqued against the principles and rewritten from its critique; a reply
    whose critique or revision does not fit the context stays as it was."""
    critique = [user(_CRITIQUE.format(rules=rules, instruction=t, reply=r))
                for t, r in zip(texts, replies, strict=True)]  # fmt: skip
    ok = [i for i, c in enumerate(critique) if writer.fits(c)]
    critiques = dict(zip(ok, writer.reply([critique[i] for i in ok], salt=1), strict=True))
    revise = {i: user(_REVISE.format(rules=rules, instruction=texts[i], reply=replies[i],
                                     critique=c)) for i, c in critiques.items()}  # fmt: skip
    ok = [i for i, r in revise.items() if writer.fits(r)]
    revised = dict(zip(ok, writer.reply([revise[i] for i in ok], salt=2), strict=True))
    return [revised.get(i, r) for i, r in enumerate(replies)]
