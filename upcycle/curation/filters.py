"""Heuristic quality filters: a measure per rule, thresholds from a recipe, a reason per drop.

The prose rules are Gopher's (Rae et al. 2021, the rules datatrove's GopherQualityFilter and
C4/FineWeb filters apply): word count, mean word length, symbol-to-word ratio, share of lines
ending in punctuation, share of duplicated lines, share of characters in the most frequent word
2-gram, and share of words with a letter. The code rules follow StarCoder's (longest line, mean
line length, share of alphanumeric characters). They are written here as plain functions of the
text rather than taken from datatrove: datatrove's filters are steps of its own pipeline and
executor over its own Document type, and each rule is a few lines whose definition this module
states; datatrove is not a dependency.

A recipe (YAML) maps rules to bounds, either or both of `min` and `max`:

    filters:
      word_count: {min: 50}
      max_line_length: {max: 1000}

A document is dropped by the first rule, in the recipe's order, whose measure is out of bounds;
its reason names the rule, the measure and the bound.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from upcycle.config import ConfigError

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


@dataclass(frozen=True)
class Recipe:
    bounds: tuple[Bound, ...]

    @classmethod
    def from_dict(cls, data: object, source: str = "recipe") -> Recipe:
        if not isinstance(data, dict) or set(data) != {"filters"}:
            raise ConfigError("filters", f"a recipe is a mapping with one key, filters ({source})")
        filters = data["filters"]
        if not isinstance(filters, dict) or not filters:
            raise ConfigError("filters", f"maps rules to bounds; rules: {sorted(RULES)}")
        bounds = []
        for rule, limits in filters.items():
            if rule not in RULES:
                raise ConfigError(f"filters.{rule}", f"unknown rule; rules: {sorted(RULES)}")
            if not isinstance(limits, dict) or not limits:
                raise ConfigError(f"filters.{rule}", "give min, max or both: {min: 1, max: 9}")
            for key, value in limits.items():
                if key not in ("min", "max"):
                    raise ConfigError(f"filters.{rule}.{key}", "unknown field; fields: min, max")
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ConfigError(f"filters.{rule}.{key}", f"a number, got {value!r}")
            bound = Bound(rule, limits.get("min"), limits.get("max"))
            if bound.min is not None and bound.max is not None and bound.min > bound.max:
                raise ConfigError(f"filters.{rule}", f"min {bound.min} > max {bound.max}")
            bounds.append(bound)
        return cls(tuple(bounds))

    @classmethod
    def load(cls, path: Path) -> Recipe:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(str(path), f"cannot read the recipe: {e}") from None
        return cls.from_dict(data, str(path))

    def reason(self, text: str) -> str | None:
        """Why `text` is dropped (the first failing rule), or None: kept."""
        for bound in self.bounds:
            why = bound.reason(RULES[bound.rule](text))
            if why:
                return why
        return None


def _verdicts(batch: dict, recipe: Recipe) -> dict:
    return {**batch, "reason": [recipe.reason(t) or "" for t in batch["text"]]}


def apply(docs, recipe: Recipe, *, workers: int = 1) -> tuple[list[dict], dict[str, str]]:
    """(kept rows, dropped id -> reason) of Ray Data rows {id, text, record}."""
    import ray

    checked = docs.map_batches(
        _verdicts,
        batch_size=32,
        compute=ray.data.TaskPoolStrategy(size=workers),
        fn_kwargs={"recipe": recipe},
    )
    kept, dropped = [], {}
    for row in checked.iter_rows():
        if row["reason"]:
            dropped[row["id"]] = row["reason"]
        else:
            kept.append({k: row[k] for k in ("id", "text", "record")})
    return kept, dropped
