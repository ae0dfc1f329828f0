"""How many calibration segments each language gets.

Every sampler only states *weights* over languages; one allocation rule turns weights and a total into integer
counts: renormalise over the requested languages, give each at least ``min_per_language`` segments, split the rest
by largest remainder, and hit the total exactly. Ties break by the order the languages were given, so the same
config always gives the same counts.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mbs.data.languages import check_languages, get_language


def allocate(weights: Mapping[str, float], total: int, min_per_language: int = 1) -> dict[str, int]:
    """Integer counts proportional to ``weights`` that sum to ``total``, each at least ``min_per_language``."""
    langs = list(weights)
    if not langs:
        raise ValueError("no calibration languages given")
    bad = {k: v for k, v in weights.items() if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0)}
    if bad:
        raise ValueError(f"language weights must be finite and >= 0, got {bad}")
    if sum(weights.values()) <= 0:
        raise ValueError(f"language weights sum to zero over {', '.join(langs)}; give at least one a positive share")
    if total < 1:
        raise ValueError(f"number of segments must be >= 1, got {total}")
    if min_per_language < 0:
        raise ValueError(f"min_per_language must be >= 0, got {min_per_language}")
    if min_per_language * len(langs) > total:
        raise ValueError(
            f"{total} segments cannot give {len(langs)} languages at least {min_per_language} each "
            f"(need >= {min_per_language * len(langs)}); raise the total or lower min_per_language"
        )
    # A language whose proportional quota falls below the floor is pinned to it and the rest is re-split among the
    # others, until no quota falls below the floor (weights are finite and >= 0, so this ends).
    pinned: set[str] = set()
    while True:
        free = [k for k in langs if k not in pinned]
        budget = total - min_per_language * len(pinned)
        mass = sum(weights[k] for k in free)
        low = {k for k in free if mass <= 0 or budget * weights[k] / mass < min_per_language}
        if not low or low == set(free):
            break
        pinned |= low
    counts = {k: min_per_language for k in langs}
    if mass > 0:
        quotas = {k: budget * weights[k] / mass for k in free}
        for k in free:
            counts[k] = math.floor(quotas[k])
        leftover = total - sum(counts.values())
        order = sorted(free, key=lambda k: (-(quotas[k] - math.floor(quotas[k])), langs.index(k)))
        for k in order[:leftover]:
            counts[k] += 1
    else:  # every weight left is zero: spread what remains over the requested languages in order
        for i in range(total - sum(counts.values())):
            counts[langs[i % len(langs)]] += 1
    assert sum(counts.values()) == total, (counts, total)
    return counts


@dataclass
class Sampler:
    """Base of all samplers: a total, a floor, and a way to weigh the calibration languages."""

    segments: int = 128
    min_per_language: int = 1

    def weights(self, distribution: Mapping[str, float]) -> dict[str, float]:
        raise NotImplementedError

    def counts(self, distribution: Mapping[str, float]) -> dict[str, int]:
        """Segments per calibration language; raises on bad input before anything expensive runs."""
        return allocate(self.weights(distribution), self.segments, self.min_per_language)


@dataclass
class ProportionalSampler(Sampler):
    """``mbs``: shares of the model's training-language distribution, renormalised over ``languages`` (the run configs
    set them to ``${eval.languages}``; in Python name them, or use :func:`mbs.calibration_mixture`'s default)."""

    languages: list[str] = field(default_factory=list)

    def weights(self, distribution: Mapping[str, float]) -> dict[str, float]:
        langs = check_languages(self.languages, "sampler.languages")
        missing = [k for k in langs if k not in distribution]
        if missing:
            raise ValueError(
                f"the model's language distribution has no share for {', '.join(missing)}; "
                f"it covers: {', '.join(distribution)} (calibrate on those with sampler.languages=[...], or on any "
                f"language with sampler=uniform)"
            )
        return {k: float(distribution[k]) for k in langs}


@dataclass
class TemperatureSampler(ProportionalSampler):
    """``temperature``: shares^alpha, renormalised by allocate() (XLM-R and mT5 sample languages with alpha=0.3).

    alpha=1 is ``mbs`` (proportional), alpha=0 is ``uniform``; values in between lift low-resource languages."""

    alpha: float = 0.3

    def weights(self, distribution: Mapping[str, float]) -> dict[str, float]:
        if not (math.isfinite(self.alpha) and 0 <= self.alpha <= 1):
            raise ValueError(f"sampler.alpha={self.alpha} must be in [0, 1] (1 = proportional, 0 = uniform)")
        return {k: w ** self.alpha for k, w in super().weights(distribution).items()}  # 0**0 = 1: alpha=0 is uniform


@dataclass
class UniformSampler(Sampler):
    """``uniform`` and ``english``: equal weight over ``languages``."""

    languages: list[str] = field(default_factory=list)

    def weights(self, distribution: Mapping[str, float]) -> dict[str, float]:
        return dict.fromkeys(check_languages(self.languages, "sampler.languages"), 1.0)


@dataclass
class MonolingualSampler(Sampler):
    """``monolingual``: every segment from one ``language``."""

    language: str = "en"

    def weights(self, distribution: Mapping[str, float]) -> dict[str, float]:
        return {get_language(self.language).code: 1.0}


@dataclass
class CountsSampler(Sampler):
    """``counts``: explicit per-language segment counts; ``segments`` must equal their sum (0, the default as in
    conf/sampler/counts.yaml, means their sum)."""

    segments: int = 0
    per_language: dict[str, int] = field(default_factory=dict)

    def weights(self, distribution: Mapping[str, float]) -> dict[str, float]:
        return {k: float(v) for k, v in self.per_language.items()}

    def counts(self, distribution: Mapping[str, float]) -> dict[str, int]:
        langs = check_languages(list(self.per_language), "sampler.per_language")
        counts = {k: self.per_language[k] for k in langs}
        if not counts or any(not isinstance(v, int) or v < 0 for v in counts.values()) or not sum(counts.values()):
            raise ValueError(f"sampler.per_language must map languages to integers >= 0 with a positive sum, got {counts}")
        if self.segments not in (0, sum(counts.values())):
            raise ValueError(
                f"sampler.segments={self.segments} but sampler.per_language sums to {sum(counts.values())}; "
                f"set sampler.segments={sum(counts.values())} (or 0)"
            )
        return counts


MIXTURE_FILE = "optimized_mixture.yaml"  # where ``python -m mbs.mixture`` writes and ``sampler=optimized`` reads


@dataclass
class OptimizedSampler(Sampler):
    """``optimized``: the per-language counts ``python -m mbs.mixture`` wrote to ``path`` (its ``per_language``);
    ``segments`` must equal their sum (0: their sum). The file's bytes are part of the experiment id."""

    segments: int = 0
    path: str = MIXTURE_FILE

    def weights(self, distribution: Mapping[str, float]) -> dict[str, float]:
        return {k: float(v) for k, v in self.read().items()}

    def read(self) -> dict[str, int]:
        import yaml

        file = Path(self.path).expanduser()
        if not file.is_file():
            raise ValueError(f"sampler.path={self.path}: no such file; write one with python -m mbs.mixture "
                             f"(--out {self.path}) or point sampler.path at the file it wrote")
        try:
            per_language = (yaml.safe_load(file.read_text(encoding="utf-8")) or {}).get("per_language")
        except (yaml.YAMLError, AttributeError, UnicodeDecodeError) as err:
            raise ValueError(f"sampler.path={self.path} is not a mixture file python -m mbs.mixture wrote "
                             f"({type(err).__name__})") from None
        if not isinstance(per_language, dict):
            raise ValueError(f"sampler.path={self.path} has no per_language mapping; it is not a mixture file "
                             f"python -m mbs.mixture wrote")
        return {str(k): v for k, v in per_language.items()}

    def counts(self, distribution: Mapping[str, float]) -> dict[str, int]:
        return CountsSampler(segments=self.segments, per_language=self.read()).counts(distribution)


def absolute_shares(distribution: Mapping[str, float]) -> dict[str, float]:
    """The model's own training shares as fractions of its whole distribution (not of the evaluated languages)."""
    mass = sum(float(v) for v in distribution.values())
    return {k: float(v) / mass for k, v in distribution.items()} if mass > 0 else {}
