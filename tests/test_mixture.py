"""The mixture optimiser (mbs/mixture.py) and sampler=optimized."""

import pytest
import yaml

import mbs.mixture as mixture
from conftest import compose_run
from mbs.mixture import Problem, check_problem, optimise, search_mixture, starting_points

DISTRIBUTION = {"en": 0.5, "fr": 0.3, "sw": 0.15, "yo": 0.05}
LANGUAGES = ["en", "fr", "sw", "yo"]


def synthetic(counts):
    """A damage that falls as a language gets more of the budget (and a little as its neighbour does)."""
    total = sum(counts.values())
    share = {k: counts.get(k, 0) / total for k in LANGUAGES}
    return {k: 1.0 / (0.05 + share[k] + 0.3 * share["fr" if k == "en" else "en"]) for k in LANGUAGES}


@pytest.mark.parametrize("objective", ["worst", "mean", "share-weighted"])
@pytest.mark.parametrize("budget", [4, 13, 128])
def test_the_optimum_spends_the_budget_exactly_and_beats_or_ties_every_start(objective, budget):
    problem = check_problem(["sw", "yo"], budget, objective, LANGUAGES, LANGUAGES, "toy", DISTRIBUTION)
    starts = starting_points(problem, DISTRIBUTION)
    assert set(starts) == {"mbs", "uniform", "english"}
    search = optimise(problem, starts, synthetic, iterations=12)
    assert sum(search.best.counts.values()) == budget
    assert all(isinstance(v, int) and v > 0 for v in search.best.counts.values())
    assert set(search.best.counts) <= set(LANGUAGES)
    assert search.best.value <= min(c.value for c in search.starts.values())
    assert search.best.value == pytest.approx(problem.value(synthetic(search.best.counts)))
    if budget >= 13:  # room to move: the search finds better than every start on this damage
        assert search.best.value < min(c.value for c in search.starts.values())
    if search.best.counts not in [dict(c) for c in starts.values()]:  # a step's counts keep every language
        assert set(search.best.counts) == set(LANGUAGES)


class FakePredictor:
    """Measured damage is ``synthetic``; extrapolation is that (truthful) or its opposite (misleading)."""

    def __init__(self, misleading: bool) -> None:
        self.misleading, self.assessed = misleading, []

    def assess(self, counts):
        self.assessed.append(dict(counts))
        return type("A", (), {"log_ratio": synthetic(counts)})()

    def extrapolate(self, anchor, counts):
        damage = synthetic(counts)
        return {k: 1.0 / v for k, v in damage.items()} if self.misleading else damage


@pytest.mark.parametrize("misleading", [False, True], ids=["truthful", "misleading"])
def test_the_search_is_never_worse_than_the_best_start_measured_on_the_probes(misleading):
    problem = check_problem(["sw", "yo"], 64, "worst", LANGUAGES, LANGUAGES, "toy", DISTRIBUTION)
    starts = starting_points(problem, DISTRIBUTION)
    predictor = FakePredictor(misleading)
    search = search_mixture(problem, starts, predictor, iterations=8)
    best_start = min(c.value for c in search.starts.values())
    assert sum(search.best.counts.values()) == 64
    assert search.best.value == pytest.approx(problem.value(synthetic(search.best.counts)))  # measured, not guessed
    assert search.best.value <= best_start
    assert search.probed == len(predictor.assessed) <= len(starts) + 1  # the starts and at most the optimum
    if misleading:  # every step it takes leads away; what it finds loses on the probes and the start is kept
        assert search.best.value == best_start
        assert "did not beat" in search.outcome or "no step" in search.outcome
    else:
        assert search.best.value < best_start and "beat the best start" in search.outcome


def test_objectives_are_what_they_say():
    damage = {"sw": 0.2, "yo": 0.4}
    shares = {"sw": 0.3, "yo": 0.1}
    assert Problem(["sw", "yo"], LANGUAGES, 8, "worst", shares).value(damage) == 0.4
    assert Problem(["sw", "yo"], LANGUAGES, 8, "mean", shares).value(damage) == pytest.approx(0.3)
    assert Problem(["sw", "yo"], LANGUAGES, 8, "share-weighted", shares).value(damage) == pytest.approx(0.25)


@pytest.mark.parametrize("args, message", [
    (["--targets", "sw,xx"], "'xx'"),
    (["--targets", "sw", "--budget", "2"], "--budget=2 is below the number of calibration languages (3: en, sw, yo)"),
    (["--targets", "sw", "--objective", "best"], "--objective='best' is not an objective; allowed: worst, mean, "
                                                 "share-weighted"),
    (["--targets", ""], "--targets is empty"),
    (["--targets", "sw", "compressor=sparsegpt"], "cannot predict this compression's damage: compressor sparsegpt"),
])
def test_bad_input_is_one_line_before_the_model_loads(args, message, monkeypatch, capsys, tmp_path):
    import mbs.models.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = ["--budget", "16", *args, "model=tiny-llama", "eval.languages=[en,sw,yo]", "--out", str(tmp_path / "m.yaml")]
    assert mixture.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "m.yaml").exists()


def test_the_written_mixture_is_what_sampler_optimized_calibrates_on(tmp_path, capsys):
    out = tmp_path / "mix.yaml"
    assert mixture.main(["--targets", "sw,yo", "--budget", "12", "--objective", "worst", "--iterations", "3",
                         "--out", str(out), "model=tiny-llama", "eval.languages=[en,sw,yo,fr]", "risk.segments=2",
                         "logger=none"]) == 0
    printed = capsys.readouterr().out
    written = yaml.safe_load(out.read_text())
    counts = written["per_language"]
    assert sum(counts.values()) == 12 and written["objective"] == "worst" and written["targets"] == ["sw", "yo"]
    values = written["objective_value"]
    assert set(values) == {"optimized", "mbs", "uniform", "english"}
    assert values["optimized"] <= min(values["mbs"], values["uniform"], values["english"])
    assert values["optimized"] == max(written["predicted_damage"]["optimized"][t] for t in ("sw", "yo"))
    for name in ("| optimized |", "| mbs |", "| uniform |", "| english |", f"wrote {out}"):
        assert name in printed
    from mbs.pipeline import plan
    from mbs.config import build

    run = build(compose_run("model=tiny-llama", "sampler=optimized", f"sampler.path={out}"))
    assert plan(run) == counts
    from mbs.fingerprint import experiment_id

    before = experiment_id(compose_run("model=tiny-llama", "sampler=optimized", f"sampler.path={out}"))
    out.write_text(out.read_text().replace("objective: worst", "objective: worst  # edited"))
    assert experiment_id(compose_run("model=tiny-llama", "sampler=optimized", f"sampler.path={out}")) != before


def test_sampler_optimized_without_a_file_says_how_to_make_one(tmp_path):
    from mbs.config import build
    from mbs.pipeline import plan

    run = build(compose_run("model=tiny-llama", "sampler=optimized", f"sampler.path={tmp_path / 'none.yaml'}"))
    with pytest.raises(ValueError, match="no such file; write one with python -m mbs.mixture"):
        plan(run)
    (tmp_path / "bad.yaml").write_text("segments: 3\n")
    run = build(compose_run("model=tiny-llama", "sampler=optimized", f"sampler.path={tmp_path / 'bad.yaml'}"))
    with pytest.raises(ValueError, match="has no per_language mapping"):
        plan(run)
