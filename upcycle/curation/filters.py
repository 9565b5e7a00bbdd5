"""Heuristic quality filters: a measure per rule, thresholds from a recipe, a reason per drop.

The prose rules are Gopher's (Rae et al. 2021, the rules datatrove's GopherQualityFilter and
C4/FineWeb filters apply): word count, mean word length, symbol-to-word ratio, share of lines
ending in punctuation, share of duplicated lines, share of characters in the most frequent word
2-gram, and share of words with a letter. The code rules follow StarCoder's (longest line, mean
line length, share of alphanumeric characters). They are written here as plain functions of the
text rather than taken from datatrove: datatrove's filters are steps of its own pipeline and
executor over its own Document type, and each rule is a few lines whose definition this module
states; datatrove is not a dependency.

A recipe's `filters` section (recipe.py) maps rules to bounds, either or both of `min` and
`max`:

    filters:
      word_count: {min: 50}
      max_line_length: {max: 1000}

A document is dropped by the first rule, in the recipe's order, whose measure is out of bounds;
its reason names the rule, the measure and the bound. Model rules (model_scores.py) run after
the heuristic ones, on the documents those kept.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_PUNCTUATION_END = (".", "!", "?", '"', "'", "\u201d")


def _words(text: str) -> list[str]:
    return text.split()


def word_count(text: str) -> float:
    return len(_words(text))


def mean_word_length(text: str) -> float:
    w = _words(text)
    return sum(map(len, w)) / len(w) if w else 0.0


def symbol_word_ratio(text: str) -> float:
    """('#' + '...' + '\u2026') per word."""
    w = _words(text)
    return (text.count("#") + text.count("...") + text.count("\u2026")) / max(len(w), 1)


def lines_ending_in_punctuation(text: str) -> float:
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    return sum(line.endswith(_PUNCTUATION_END) for line in lines) / max(len(lines), 1)


def duplicate_line_share(text: str) -> float:
    """Share of non-empty lines that repeat an earlier line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (len(lines) - len(set(lines))) / max(len(lines), 1)


def top_2gram_share(text: str) -> float:
    """Share of the words' characters in the most frequent word 2-gram's occurrences."""
    w = re.findall(r"\w+", text.lower())
    if len(w) < 2:
        return 0.0
    gram, count = Counter(zip(w, w[1:], strict=False)).most_common(1)[0]
    return count * (len(gram[0]) + len(gram[1])) / max(sum(map(len, w)), 1)


def alphabetic_word_share(text: str) -> float:
    w = _words(text)
    return sum(any(c.isalpha() for c in x) for x in w) / max(len(w), 1)


def max_line_length(text: str) -> float:
    return max((len(line) for line in text.splitlines()), default=0)


def mean_line_length(text: str) -> float:
    lines = text.splitlines()
    return sum(map(len, lines)) / max(len(lines), 1)


def alphanumeric_share(text: str) -> float:
    return sum(c.isalnum() for c in text) / max(len(text), 1)


RULES: dict[str, Callable[[str], float]] = {
    f.__name__: f
    for f in (
        word_count,
        mean_word_length,
        symbol_word_ratio,
        lines_ending_in_punctuation,
        duplicate_line_share,
        top_2gram_share,
        alphabetic_word_share,
        max_line_length,
        mean_line_length,
        alphanumeric_share,
    )  # fmt: skip
}


@dataclass(frozen=True)
class Bound:
    rule: str
    min: float | None = None
    max: float | None = None

    def reason(self, value: float) -> str | None:
        """Why `value` fails this bound, or None."""
        if self.min is not None and value < self.min:
            return f"{self.rule} {value:.4g} < min {self.min:g}"
        if self.max is not None and value > self.max:
            return f"{self.rule} {value:.4g} > max {self.max:g}"
        return None


def _verdicts(batch: dict, recipe) -> dict:
    """{id, reason ("" if kept)}, and the text where a model rule will read it."""
    reasons = np.array([recipe.reason(t) or "" for t in batch["text"]], dtype=object)
    return {"id": batch["id"], **({"text": batch["text"]} if recipe.models else {}),
            "reason": reasons}  # fmt: skip


def apply(
    docs, recipe, checkpoints: dict[str, Path], *, workers: int = 1
) -> tuple[dict[str, str], dict[str, list[float]]]:
    """(dropped id -> reason, rule -> the scores of the documents it scored) of Ray Data rows
    of documents.COLUMNS under a `recipe.Recipe`: its heuristic rules, then each model rule
    (model_scores.py) with its checkpoint from `checkpoints`, on the documents still in. Only
    ids, reasons and scores come to the driver (`documents.kept_in_id_order` gives the rest)."""
    import ray

    from upcycle.curation.model_scores import DocumentScorer

    checked = docs.map_batches(
        _verdicts,
        batch_size=256,
        compute=ray.data.TaskPoolStrategy(size=workers),
        fn_kwargs={"recipe": recipe},
    )
    for rule in recipe.models:
        checked = checked.map_batches(
            DocumentScorer,
            batch_size=8,
            compute=ray.data.ActorPoolStrategy(size=workers),
            fn_constructor_kwargs={"ckpt": str(checkpoints[rule.rule]), "rule": vars(rule)},
            num_cpus=1,
        )
    dropped, scores = {}, {rule.rule: [] for rule in recipe.models}
    columns = ["id", "reason", *scores]
    for batch in checked.select_columns(columns).iter_batches(batch_size=None):
        for name, values in scores.items():
            values.extend(batch[name][~np.isnan(batch[name])].tolist())  # NaN: not scored
        out = batch["reason"] != ""
        dropped.update(zip(batch["id"][out].tolist(), batch["reason"][out].tolist(), strict=True))
    return dropped, scores
