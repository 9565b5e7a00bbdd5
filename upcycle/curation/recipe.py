"""A curation recipe (YAML): what `data filter`, `data dedup` and `data decontaminate` do, a
section each, and what `data curate` runs, in this order, for the sections present.

    filters:                      # data filter: heuristic rules (filters.py), each {min, max},
      word_count: {min: 50}       # and model rules (model_scores.py)
      perplexity: {model: runs/ref/step_0000100, max: 3000}
    dedup: {threshold: 0.7}       # data dedup (dedup.py): estimated Jaccard that joins
    decontaminate:                # data decontaminate (decontaminate.py)
      against: [humaneval, data/heldout]
      ngram: 13

An unknown section, rule or field, or a value of the wrong kind, is a ConfigError naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from upcycle.config import ConfigError
from upcycle.curation.filters import RULES, Bound
from upcycle.curation.model_scores import MODEL_RULES, ModelRule

SECTIONS = ("filters", "dedup", "decontaminate")


@dataclass(frozen=True)
class Dedup:
    threshold: float = 0.7


@dataclass(frozen=True)
class Decontaminate:
    against: tuple[str, ...]
    ngram: int = 13


@dataclass(frozen=True)
class Recipe:
    bounds: tuple[Bound, ...] = ()
    models: tuple[ModelRule, ...] = ()
    dedup: Dedup | None = None
    decontaminate: Decontaminate | None = None

    @property
    def filters(self) -> bool:
        return bool(self.bounds or self.models)

    @classmethod
    def from_dict(cls, data: object, source: str = "recipe") -> Recipe:
        if not isinstance(data, dict) or not data:
            raise ConfigError("recipe", f"a mapping of sections {list(SECTIONS)} ({source})")
        for key in data:
            if key not in SECTIONS:
                raise ConfigError(str(key), f"unknown section; sections: {list(SECTIONS)}")
        bounds, models = _filters(data["filters"]) if "filters" in data else ((), ())
        return cls(bounds, models, _dedup(data["dedup"]) if "dedup" in data else None,
                   _decontaminate(data["decontaminate"]) if "decontaminate" in data else None)  # fmt: skip

    @classmethod
    def load(cls, path: Path) -> Recipe:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError("recipe", f"cannot read {path}: {e}") from None
        return cls.from_dict(data, str(path))

    def reason(self, text: str) -> str | None:
        """Why `text` is dropped by a heuristic rule (the first failing one), or None: kept."""
        for bound in self.bounds:
            why = bound.reason(RULES[bound.rule](text))
            if why:
                return why
        return None

    def as_dict(self) -> dict:
        """The recipe as it reads (for reports and MLflow params)."""
        out: dict = {}
        if self.filters:
            out["filters"] = {b.rule: {k: v for k, v in (("min", b.min), ("max", b.max))
                                       if v is not None} for b in self.bounds}  # fmt: skip
            out["filters"] |= {m.rule: {k: v for k, v in vars(m).items()
                                        if k != "rule" and v is not None} for m in self.models}  # fmt: skip
        if self.dedup:
            out["dedup"] = vars(self.dedup)
        if self.decontaminate:
            out["decontaminate"] = {**vars(self.decontaminate),
                                    "against": list(self.decontaminate.against)}  # fmt: skip
        return out


def _number(where: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(where, f"a number, got {value!r}")
    return value


def _filters(filters: object) -> tuple[tuple[Bound, ...], tuple[ModelRule, ...]]:
    rules = sorted(RULES) + list(MODEL_RULES)
    if not isinstance(filters, dict) or not filters:
        raise ConfigError("filters", f"maps rules to bounds; rules: {rules}")
    bounds, models = [], []
    for rule, limits in filters.items():
        if rule in MODEL_RULES:
            models.append(ModelRule.parse(rule, limits))
            continue
        if rule not in RULES:
            raise ConfigError(f"filters.{rule}", f"unknown rule; rules: {rules}")
        if not isinstance(limits, dict) or not limits:
            raise ConfigError(f"filters.{rule}", "give min, max or both: {min: 1, max: 9}")
        for key, value in limits.items():
            if key not in ("min", "max"):
                raise ConfigError(f"filters.{rule}.{key}", "unknown field; fields: min, max")
            _number(f"filters.{rule}.{key}", value)
        bound = Bound(rule, limits.get("min"), limits.get("max"))
        if bound.min is not None and bound.max is not None and bound.min > bound.max:
            raise ConfigError(f"filters.{rule}", f"min {bound.min} > max {bound.max}")
        bounds.append(bound)
    return tuple(bounds), tuple(models)


def _dedup(section: object) -> Dedup:
    if not isinstance(section, dict):
        raise ConfigError("dedup", "a mapping: {threshold: 0.7}")
    for key in section:
        if key != "threshold":
            raise ConfigError(f"dedup.{key}", "unknown field; fields: threshold")
    threshold = _number("dedup.threshold", section.get("threshold", 0.7))
    if not 0 < threshold <= 1:
        raise ConfigError("dedup.threshold", f"must be in (0, 1], got {threshold}")
    return Dedup(threshold)


def _decontaminate(section: object) -> Decontaminate:
    if not isinstance(section, dict) or "against" not in section:
        raise ConfigError("decontaminate", "a mapping with against: [humaneval, PATH, ...]")
    for key in section:
        if key not in ("against", "ngram"):
            raise ConfigError(f"decontaminate.{key}", "unknown field; fields: against, ngram")
    against = section["against"]
    if not isinstance(against, list) or not against or not all(isinstance(a, str) for a in against):
        raise ConfigError("decontaminate.against", "a list of evaluation sets: humaneval, or paths")
    ngram = section.get("ngram", 13)
    if isinstance(ngram, bool) or not isinstance(ngram, int) or ngram < 1:
        raise ConfigError("decontaminate.ngram", f"an integer >= 1, got {ngram!r}")
    return Decontaminate(tuple(against), ngram)
