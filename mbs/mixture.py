"""``python -m mbs.mixture --targets sw,yo,ig --budget 128 --objective worst [run overrides...]``: the calibration
mixture that protects the target languages, chosen on predicted damage (mbs/analyze/damage.py) before compressing.

The run overrides (``model=... compressor=... data=... seed=... risk.segments=...``) say which compression is
planned, as ``python run.py`` takes them. A mixture is compressed from cached dense statistics (each calibration
language's ``risk.segments`` segments, one forward per language the first time, none after: they are kept in the
model's cache), never by the engine itself.

The starting points, MBS (the model's training shares over the calibration languages), uniform and English-only, are
each measured on the probes: the log ratio on each target's ``risk.probe`` further calibration segments
(mbs/analyze/damage.py), one forward of the probes each. From the best of them (the anchor) the search takes
multiplicative-weights steps (as group DRO weighs groups) on damage extrapolated from the anchor without a forward
(the anchor's log ratio times the change of each target's output error): each target's weight is multiplied by
exp(η·g), g its part in the objective (worst: (damage / worst)^16, the worst targets; mean: its damage;
share-weighted: share × damage), relative to the largest, with η ≤ 1 and every calibration language kept at one
segment at least; a step that does not lower the objective is undone and η halved. The optimum is then measured
on the probes and kept only if it beats the anchor there, so the result is
never worse on its measured objective than the best starting point. Counts come from the weights by the samplers'
one rule (largest remainder, mbs/data/sampling.py) and sum to the budget exactly. The counts are written as a
mixture file that ``python run.py sampler=optimized sampler.path=<file>`` reads.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import shlex
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

OBJECTIVES = ("worst", "mean", "share-weighted")
WORST_POWER = 16  # how sharply the worst objective's step focuses on the worst targets (a soft group-DRO max)
ETA_RANGE = (1e-3, 1.0)  # step sizes the search tries (a step multiplies a weight by e at most); outside them it stops
# every calibration language keeps a segment, as the samplers' default min_per_language: on the default a search that
# could empty languages put 109 of 128 segments on one (seed 1) and GPTQ broke a language left without any (README)
MIN_SEGMENTS = 1
STARTS = ("mbs", "uniform", "english")

log = logging.getLogger(__name__)


@dataclass
class Problem:
    """What the optimiser is asked: targets, the calibration languages it may use, the budget and the objective."""

    targets: list[str]
    languages: list[str]  # calibration languages the counts may use (English always among them: a starting point)
    budget: int
    objective: str
    shares: dict[str, float] = field(default_factory=dict)  # the model's absolute training shares

    def value(self, damage: Mapping[str, float]) -> float:
        """The objective of predicted damages (lower is better)."""
        values = [damage[t] for t in self.targets]
        if self.objective == "worst":
            return max(values)
        if self.objective == "mean":
            return sum(values) / len(values)
        weights = [self.shares[t] for t in self.targets]
        return sum(w * v for w, v in zip(weights, values)) / sum(weights)

    def parts(self, damage: Mapping[str, float]) -> dict[str, float]:
        """Each target's part in the objective, the largest 1 (the exponent of a multiplicative-weights step)."""
        if self.objective == "worst":  # (d/max)^16: ~1 for the targets at or near the worst, ~0 for the rest
            top = max(damage[t] for t in self.targets)
            raw = {t: (damage[t] / top) ** WORST_POWER if top > 0 else 0.0 for t in self.targets}
        elif self.objective == "mean":
            raw = {t: damage[t] for t in self.targets}
        else:
            raw = {t: self.shares[t] * damage[t] for t in self.targets}
        top = max(raw.values())
        return {t: v / top if top > 0 else 0.0 for t, v in raw.items()}


def check_problem(targets: list[str], budget: int, objective: str, languages: list[str],
                  corpus_languages: list[str], corpus: str, distribution: Mapping[str, float]) -> Problem:
    """One-line ValueErrors for targets, budget and objective, before any model loads."""
    from mbs.data.languages import check_languages
    from mbs.data.sampling import absolute_shares

    if objective not in OBJECTIVES:
        raise ValueError(f"--objective={objective!r} is not an objective; allowed: {', '.join(OBJECTIVES)}")
    if not targets:
        raise ValueError("--targets is empty; name at least one target language, e.g. --targets sw,yo")
    targets = check_languages(targets, "--targets")
    languages = check_languages(list(dict.fromkeys(["en", *languages, *targets])), "--languages")
    have = set(corpus_languages)
    for what, codes in (("--targets", targets), ("--languages", languages)):
        missing = [k for k in codes if k not in have]
        if missing:
            raise ValueError(f"{what}: corpus {corpus!r} has no calibration text for {', '.join(missing)}; it has: "
                             f"{', '.join(sorted(have))}")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < len(languages):
        raise ValueError(f"--budget={budget} is below the number of calibration languages ({len(languages)}: "
                         f"{', '.join(languages)}); give at least {len(languages)} segments, or fewer --languages")
    shares = absolute_shares(distribution)
    if objective == "share-weighted":
        unknown = [t for t in targets if not shares.get(t)]
        if unknown:
            raise ValueError(f"--objective=share-weighted needs each target's training share; the model's "
                             f"distribution has none for {', '.join(unknown)}; use --objective worst or mean")
    return Problem(targets, languages, budget, objective, shares)


def starting_points(problem: Problem, distribution: Mapping[str, float]) -> dict[str, dict[str, int]]:
    """MBS (training shares over the calibration languages that have one), uniform and English-only counts."""
    from mbs.data.sampling import ProportionalSampler, UniformSampler

    with_share = [k for k in problem.languages if distribution.get(k)]
    starts = {"uniform": UniformSampler(problem.budget, 1, list(problem.languages)).counts(distribution),
              "english": {"en": problem.budget}}
    if with_share:
        starts["mbs"] = ProportionalSampler(problem.budget, 1, with_share).counts(distribution)
    return {k: starts[k] for k in STARTS if k in starts}


@dataclass
class Candidate:
    counts: dict[str, int]
    damage: dict[str, float]
    value: float


@dataclass
class Search:
    best: Candidate
    starts: dict[str, Candidate]
    steps: list[dict[str, Any]]  # per step: eta, value, accepted
    predictions: int
    probed: int = 0  # mixtures whose damage was measured on the probe segments (the rest extrapolated)
    outcome: str = ""  # how the best was chosen, in words


def optimise(problem: Problem, starts: Mapping[str, Mapping[str, int]],
             predict: Callable[[dict[str, int]], dict[str, float]], iterations: int = 8,
             eta: float = 1.0) -> Search:
    """The best counts found: the best starting point, improved by multiplicative-weights steps (module docstring).
    ``predict`` maps counts to each target's predicted damage."""
    from mbs.data.sampling import allocate

    def evaluate(counts: Mapping[str, int]) -> Candidate:
        counts = {k: int(v) for k, v in counts.items() if v}
        assert sum(counts.values()) == problem.budget, (counts, problem.budget)
        damage = predict(counts)
        return Candidate(counts, damage, problem.value(damage))

    evaluated = {name: evaluate(counts) for name, counts in starts.items()}
    best = min(evaluated.values(), key=lambda c: c.value)
    weights = {k: best.counts.get(k, 0) + 0.5 for k in problem.languages}  # every language can grow from zero
    steps, predictions = [], len(evaluated)
    seen = {tuple(sorted(c.counts.items())) for c in evaluated.values()}
    for _ in range(iterations):
        if not ETA_RANGE[0] <= eta <= ETA_RANGE[1]:  # converged, or no step moves the rounded counts
            break
        parts = problem.parts(best.damage)
        proposal = {k: w * math.exp(eta * parts.get(k, 0.0)) for k, w in weights.items()}
        mass = sum(proposal.values())
        proposal = {k: w / mass for k, w in proposal.items()}
        counts = allocate(proposal, problem.budget, min_per_language=MIN_SEGMENTS)
        key = tuple(sorted((k, v) for k, v in counts.items() if v))
        if key in seen:  # the step rounds to counts already scored: a larger step is needed to move
            weights = proposal
            eta *= 2
            steps.append({"eta": eta / 2, "value": None, "accepted": False, "repeat": True})
            continue
        seen.add(key)
        candidate = evaluate(counts)
        predictions += 1
        accepted = candidate.value < best.value
        steps.append({"eta": eta, "value": candidate.value, "accepted": accepted})
        if accepted:
            best, weights = candidate, proposal
        else:
            eta /= 2
    return Search(best, evaluated, steps, predictions)


class Assessor(Protocol):
    """What :func:`search_mixture` needs of mbs.analyze.damage.DamagePredictor."""

    def assess(self, counts: Mapping[str, int]) -> Any: ...

    def extrapolate(self, anchor: Any, counts: Mapping[str, int]) -> dict[str, float]: ...


def search_mixture(problem: Problem, starts: Mapping[str, Mapping[str, int]], predictor: Assessor,
                   iterations: int = 8) -> Search:
    """Every start measured on the probes; from the best (the anchor), multiplicative-weights steps on damage
    extrapolated from it without a forward (:meth:`DamagePredictor.extrapolate`); the optimum measured on the probes
    and kept only if it beats the anchor there. So the result is never worse on its probe-measured objective than the
    best starting point, and the search costs (starts + 1) probe forwards."""
    assessed = {name: predictor.assess(counts) for name, counts in starts.items()}
    measured = {name: Candidate({k: int(v) for k, v in starts[name].items() if v}, a.log_ratio,
                                problem.value(a.log_ratio)) for name, a in assessed.items()}
    anchor = min(measured, key=lambda name: measured[name].value)
    inner = optimise(problem, {anchor: starts[anchor]}, lambda c: predictor.extrapolate(assessed[anchor], c),
                     iterations)
    best, probed = measured[anchor], len(measured)
    outcome = f"no step improved the extrapolated {problem.objective} damage of the best start ({anchor})"
    if inner.best.counts != measured[anchor].counts:
        damage = predictor.assess(inner.best.counts).log_ratio
        probed += 1
        candidate = Candidate(inner.best.counts, damage, problem.value(damage))
        if candidate.value < best.value:
            best, outcome = candidate, f"the search's optimum, measured on the probes, beat the best start ({anchor})"
        else:
            outcome = (f"the search's optimum, measured on the probes ({candidate.value:.4g}), did not beat the best "
                       f"start ({anchor}, {best.value:.4g}): the start is kept")
    return Search(best, measured, inner.steps, inner.predictions + len(measured), probed, outcome)


def mixture_text(search: Search, problem: Problem, command: str, setup: Mapping[str, Any]) -> str:
    """The mixture file (YAML): ``per_language`` for ``sampler=optimized``, and what it was chosen on."""
    import yaml

    body = {"per_language": search.best.counts, "segments": problem.budget, "objective": problem.objective,
            "targets": problem.targets, "calibration_languages": problem.languages, **setup,
            "predicted_damage": {"optimized": search.best.damage,
                                 **{k: c.damage for k, c in search.starts.items()}},
            "objective_value": {"optimized": search.best.value, **{k: c.value for k, c in search.starts.items()}},
            "starting_points": {k: c.counts for k, c in search.starts.items()}}
    return (f"# written by: {command}\n# use with: python run.py sampler=optimized sampler.path=<this file> "
            f"(and the same model, compressor and data)\n" + yaml.safe_dump(body, sort_keys=False, allow_unicode=True))


def comparison_table(search: Search, problem: Problem) -> str:
    """Predicted damage of each target, and the objective, for the optimum beside MBS, uniform and English-only."""
    rows = {"optimized": search.best, **search.starts}
    lines = [f"| mixture | {problem.objective} | " + " | ".join(problem.targets) + " |",
             "|---|---:|" + "---:|" * len(problem.targets)]
    for name, c in rows.items():
        lines.append(f"| {name} | {c.value:.4g} | " + " | ".join(f"{c.damage[t]:.4g}" for t in problem.targets) + " |")
    return "\n".join(lines)


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    from mbs.data.sampling import MIXTURE_FILE

    parser = argparse.ArgumentParser(prog="python -m mbs.mixture", description=__doc__.split("\n\n")[0],
                                     epilog="Any other argument is a run override (model=..., compressor=..., "
                                            "data=..., seed=..., risk.segments=...), as python run.py takes it.")
    parser.add_argument("--targets", required=True, help="comma-separated languages to protect, e.g. sw,yo,ig")
    parser.add_argument("--budget", required=True, type=int, help="calibration segments in all")
    parser.add_argument("--objective", default="worst", help=f"one of {', '.join(OBJECTIVES)} (default worst)")
    parser.add_argument("--languages", default=None,
                        help="comma-separated calibration languages the mixture may use (default: eval.languages "
                             "and the targets; English is always one)")
    parser.add_argument("--iterations", type=int, default=8,
                        help="multiplicative-weights steps, each at most one more scored mixture (default 8)")
    parser.add_argument("--out", default=MIXTURE_FILE, help="the mixture file to write (default %(default)s)")
    return parser.parse_known_args(argv)


def split(text: str | None) -> list[str]:
    return [k.strip() for k in (text or "").split(",") if k.strip()]


def main(argv: list[str] | None = None) -> int:
    """Check everything, load the model, search, print the comparison, write the mixture file; bad input is one line
    on stderr and exit code 2, before the model loads."""
    argv = sys.argv[1:] if argv is None else argv
    args, overrides = parse(argv)
    try:
        return _main(args, overrides, " ".join(["python -m mbs.mixture", *argv]))
    except ValueError as err:
        print(f"mbs.mixture: {err}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace, overrides: list[str], command: str) -> int:
    from mbs.analyze import damage
    from mbs.api import compose
    from mbs.config import build
    from mbs.compress.cached import LanguageStatistics
    from mbs.fingerprint import weights_fingerprint
    from mbs.models.loading import load_model, model_cache, model_skeleton
    from mbs.pipeline import UserError, prepare

    if args.iterations < 0:
        raise ValueError(f"--iterations={args.iterations} must be >= 0")
    bad = [o for o in overrides if o.startswith("-")]
    if bad:
        raise ValueError(f"unknown option {bad[0]}; options: --targets, --budget, --objective, --languages, "
                         f"--iterations, --out (anything else is a run override such as model=...)")
    try:
        cfg = compose(*overrides)
    except Exception as err:  # noqa: BLE001 - Hydra's composition errors: one line
        raise ValueError(str(err).splitlines()[0]) from None
    run = build(cfg)
    from mbs.data.generated import SelfCorpus

    if isinstance(run.data, SelfCorpus):
        raise ValueError("data=self: the mixture search predicts damage from segments drawn from a corpus's text, "
                         "and data=self generates its segments with the model; search with data=udhr (or another "
                         "corpus) and run the mixture with data=self")
    problem = check_problem(split(args.targets), args.budget, args.objective,
                            split(args.languages) or list(run.eval.languages), run.data.languages(), run.data.name,
                            run.model.distribution or {})
    reason = damage.unsupported(run.compressor, model_skeleton(run.model))
    if reason:
        raise ValueError(f"cannot predict this compression's damage: {reason}")
    try:
        prepared = prepare(cfg)  # the segment source exactly as a run builds it; every other input checked
    except UserError as err:
        raise ValueError(str(err)) from None
    run = prepared.run
    Path(args.out).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    starts = starting_points(problem, run.model.distribution or {})
    t0 = time.perf_counter()
    model = load_model(run.model, seed=run.seed)
    statistics = LanguageStatistics(model, prepared.source, weights_fingerprint(model), model_cache(run.model),
                                    run.engine.device, force=run.force, pool=run.risk.segments)
    predictor = damage.DamagePredictor(model, run.compressor, statistics, problem.targets, run.risk.segments,
                                       run.risk.probe, run.engine.device, run.eval.dtype)
    if predictor.skipped:
        raise ValueError("--targets: " + "; ".join(predictor.skipped.values()))
    search = search_mixture(problem, starts, predictor, args.iterations)
    seconds = time.perf_counter() - t0
    setup = {"model": run.model.name, "compressor": {"method": type(run.compressor).__name__.lower(),
                                                    **_fields(run.compressor)},
             "data": run.data.name, "seed": run.seed, "risk_segments": run.risk.segments, "risk_probe": run.risk.probe,
             "overrides": overrides, "predictions": search.predictions, "probed": search.probed,
             "outcome": search.outcome, "seconds": round(seconds, 1)}
    text = mixture_text(search, problem, command, setup)
    from mbs.atomic import atomic_write_all

    out = Path(args.out).expanduser()
    atomic_write_all({out: text})
    print(f"predicted damage ({damage.METHOD}), objective {problem.objective} over {', '.join(problem.targets)}; "
          f"{search.predictions} mixtures scored ({search.probed} on the probes, the rest extrapolated) in "
          f"{seconds:.1f}s; {search.outcome}")
    print(comparison_table(search, problem))
    print("optimized counts: " + ", ".join(f"{k} {v}" for k, v in search.best.counts.items()))
    print(f"wrote {out}; use it with: python run.py sampler=optimized sampler.path={shlex.quote(str(out))} "
          f"{' '.join(shlex.quote(o) for o in overrides)}".rstrip())
    print("experimental: the probes are calibration text, and a language's damage there can differ from its damage "
          "on other text by more than a change of mixture moves it; on the embedded default --objective worst chased "
          "the probes' worst language and lost to uniform on the evaluation windows (README, Predicted damage); "
          "compress and evaluate the optimized mixture beside MBS and uniform before relying on it")
    return 0


def _fields(compressor: Any) -> dict[str, Any]:
    import dataclasses

    return {f.name: getattr(compressor, f.name) for f in dataclasses.fields(compressor)}


if __name__ == "__main__":
    sys.exit(main())
