"""Language similarity from the engine's statistics, and the retention analysis over a hand-made sweep directory."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from conftest import calibration, tiny
from mbs.analyze import similarity
from mbs.analyze import retention
from mbs.analyze.retention import POOLED, WITHIN, analyze, cluster_bootstrap
from mbs.compress.engine import EngineConfig
from mbs.models.adapter import Adapter
from mbs.record.report import build_report
from mbs.record.jobs import collect_jobs

ROOT = Path(__file__).resolve().parents[1]


def test_self_similarity_is_one_and_the_matrix_symmetric():
    g = torch.Generator().manual_seed(0)
    vectors = {k: torch.rand(16, generator=g) * (i + 1) for i, k in enumerate(["en", "sw", "fr"])}
    m = similarity.cosine_matrix(vectors)
    np.testing.assert_allclose(np.diag(m), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(m, m.T, rtol=0, atol=0)
    assert similarity.cosine(vectors["en"], vectors["sw"]) == pytest.approx(m[0, 1], abs=1e-12)
    assert similarity.cosine(vectors["en"], 3 * vectors["en"]) == pytest.approx(1.0, abs=1e-12)


def test_mixture_vector_is_the_count_weighted_average():
    vectors = {"en": torch.tensor([1.0, 0.0, 2.0]), "sw": torch.tensor([0.0, 4.0, 1.0]), "fr": torch.ones(3)}
    mix = similarity.mixture_vector(vectors, {"en": 3, "sw": 1, "fr": 0})
    np.testing.assert_allclose(mix, [0.75, 1.0, 1.75])
    with pytest.raises(ValueError, match="no activation vector for calibration language"):
        similarity.mixture_vector(vectors, {"yo": 2})


def test_resolve_layers_counts_from_the_end_and_names_the_range():
    assert similarity.resolve_layers([0, -1], 3) == [0, 2]
    with pytest.raises(ValueError) as err:
        similarity.resolve_layers([0, 3], 3)
    assert str(err.value) == ("analysis.layers=[0, 3]: layer 3 is out of range for a model with 3 decoder layers; "
                              "allowed: -3..2")
    with pytest.raises(ValueError, match="same layer twice"):
        similarity.resolve_layers([2, -1], 3)


def test_out_of_range_layer_is_one_line_before_the_model_loads(monkeypatch):
    from conftest import compose_run

    import mbs.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    cfg = compose_run("model=tiny-llama", "analysis.layers=[0,-5]", "eval.languages=[en,sw]")
    with pytest.raises(pipeline.UserError) as err:
        pipeline.prepare(cfg)
    assert str(err.value) == ("analysis.layers=[0, -5]: layer -5 is out of range for a model with 3 decoder "
                              "layers; allowed: -3..2")


def test_vectors_are_the_mean_square_of_the_first_linear_input_per_language(tokenizer):
    """From the engine's observer, equal to a plain hook on q_proj's input of the dense model; a language's vector
    does not depend on which other languages are probed, and the probe changes no weight."""
    model = tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = calibration(tokenizer, {"en": 2, "sw": 2, "fr": 2})
    vectors = similarity.language_vectors(model, probe, [0, 2], EngineConfig(batch_size=2))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    adapter = Adapter(model)
    for layer in (0, 2):
        seen = {}
        q = adapter.layers[layer].self_attn.q_proj
        for language, segments in probe.segments.items():
            handle = q.register_forward_pre_hook(
                lambda m, a, lang=language: seen.setdefault(lang, []).append(a[0].reshape(-1, a[0].shape[-1])))
            with torch.no_grad():
                model(input_ids=segments)
            handle.remove()
            x = torch.cat(seen[language]).double()
            torch.testing.assert_close(vectors[layer][language].double(), x.square().mean(0), rtol=1e-5, atol=1e-7)
    other = similarity.language_vectors(model, calibration(tokenizer, {"en": 2, "yo": 2}), [0],
                                        EngineConfig(batch_size=2))
    assert torch.equal(other[0]["en"], vectors[0]["en"])


# ---- the retention analysis on a hand-made sweep ----

LANGS = ["en", "fr", "hi", "sw", "yo", "xx"]  # xx: no training share
SHARES = {"en": 0.3, "fr": 0.1, "hi": 0.01, "sw": 1e-4, "yo": 1e-6, "xx": None}


def make_sweep(root: Path, conditions: dict[str, dict[str, float]], retention, shares: dict | None = None,
               extra=None) -> dict:
    """One job per condition: {condition: {language: similarity}}; retention(share, similarity) gives each point, or
    retention is {(condition, language): value}. ``shares``: {language: training share or None} (default SHARES);
    ``extra(condition, language)``: more fields for that language's row (e.g. bits per byte)."""
    shares = SHARES if shares is None else shares
    points = {}
    for num, (sampler, sims) in enumerate(conditions.items()):
        job = root / f"{num}_sampler={sampler}"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- sampler={sampler}\n")
        rows = []
        for lang, share in shares.items():
            if isinstance(retention, dict):
                r = retention[(sampler, lang)]
            else:
                r = retention(math.log10(share) if share else 0.0, sims[lang])
            points[(sampler, lang)] = r
            rows.append({"language": lang, "share": 0.1, "training_share": share, "dense_ppl": 10.0,
                         "compressed_ppl": 10.0 * math.exp(-r), "ratio": math.exp(-r), "log_ratio": -r, "tokens": 9,
                         **(extra(sampler, lang) if extra else {})})
        names = list(sims)
        matrix = np.eye(len(names)).tolist()
        results = {"experiment_id": f"exp{num}", "config": {"seed": 0}, "model": {"name": "toy"}, "languages": rows,
                   "compression": {"sparsity": 0.5},
                   "similarity": {"layers": {"0": {"requested": 0, "languages": names, "matrix": matrix,
                                                   "to_calibration": sims}}}}
        (job / "results.json").write_text(json.dumps(results))
    return points


def synthetic_sweep(root: Path, between: float, within: float, noise: float, seed: int, n_languages: int = 20,
                    n_conditions: int = 6) -> dict:
    """Condition c has mean similarity m_c (0.3..0.9); a language's similarity is m_c + N(0, 0.05²), its retention
    between·m_c + within·(similarity − m_c) + N(0, noise²): ``between`` moves the conditions' means together,
    ``within`` is the relation inside a condition (the planted fixed-effects slope)."""
    rng = np.random.default_rng(seed)
    langs = [f"l{i:02d}" for i in range(n_languages)]
    shares = {lang: float(10 ** rng.uniform(-6, -1)) for lang in langs}
    conditions, retention = {}, {}
    for c, mean in enumerate(np.linspace(0.3, 0.9, n_conditions)):
        sims = {lang: float(mean + rng.normal(0, 0.05)) for lang in langs}
        conditions[f"c{c}"] = sims
        for lang in langs:
            retention[(f"c{c}", lang)] = float(between * mean + within * (sims[lang] - mean) + rng.normal(0, noise))
    make_sweep(root, conditions, retention, shares)
    return retention


SIMS = {
    "english": {"en": 1.0, "fr": 0.9, "hi": 0.7, "sw": 0.6, "yo": 0.5, "xx": 0.55},
    "uniform": {"en": 0.92, "fr": 0.95, "hi": 0.9, "sw": 0.85, "yo": 0.8, "xx": 0.86},
    "sw": {"en": 0.6, "fr": 0.65, "hi": 0.7, "sw": 1.0, "yo": 0.75, "xx": 0.7},
}


def test_analysis_returns_scipys_correlations_and_the_exact_joint_fit(tmp_path):
    make_sweep(tmp_path, SIMS, lambda s, sim: 0.1 + 0.05 * s + 0.3 * sim)  # an exact linear relation
    result = analyze(tmp_path, tmp_path / "out", seed=0, n_resamples=200)
    share, sim = result.correlations
    df = result.data
    have = df[df["training_share"].notna()]
    assert share.left_out == ["xx"] and share.n == 15 and share.languages == 5
    assert share.spearman == pytest.approx(stats.spearmanr(np.log10(have["training_share"].astype(float)),
                                                           -have["log_ratio"]).statistic, abs=1e-12)
    assert share.pearson == pytest.approx(stats.pearsonr(np.log10(have["training_share"].astype(float)),
                                                         -have["log_ratio"]).statistic, abs=1e-12)
    assert sim.n == 18 and sim.left_out == []
    assert sim.spearman == pytest.approx(stats.spearmanr(df["similarity_layer0"], -df["log_ratio"]).statistic,
                                         abs=1e-12)
    assert sim.spearman_ci[0] <= sim.spearman <= sim.spearman_ci[1]
    (fit,) = result.fits
    np.testing.assert_allclose(fit.coefficients, [0.1, 0.05, 0.3], atol=1e-9)
    assert fit.r2 == pytest.approx(1.0) and fit.n == 15
    for (lo, hi), value in zip(fit.ci, fit.coefficients):
        assert lo == pytest.approx(value, abs=1e-6) and hi == pytest.approx(value, abs=1e-6)
    (wfit,) = result.within_fits  # the relation is exact within each job too
    np.testing.assert_allclose(wfit.slopes, [0.05, 0.3], atol=1e-9)
    assert wfit.r2 == pytest.approx(1.0) and wfit.conditions == 3
    within_share = result.within[0]
    assert result.sentence.startswith(f"Within a condition (retention in nats per token): share: ρ = "
                                      f"{within_share.spearman:.2f}") and "; similarity: ρ = " in result.sentence
    md = (tmp_path / "out" / "analysis.md").read_text()
    assert f"**{result.sentence}**" in md and f"| share | {POOLED} | 15 | 5 | 3 | xx |" in md
    assert f"| share | {WITHIN} | 15 | 5 | 3 | xx |" in md and "[nan" not in md.lower()
    for name in ("analysis.csv", "analysis_points.csv", "retention_vs_share.png", "retention_vs_share.pdf",
                 "retention_vs_similarity_layer0.png", "similarity_layer0.png", "similarity_layer0.csv"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name


def test_bootstrap_resamples_languages_like_scipy_does_points(tmp_path):
    """With one point per language, resampling languages is scipy's paired bootstrap of the points."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=12), rng.normal(size=12)
    lo, hi = cluster_bootstrap(np.array([f"l{i}" for i in range(12)]),
                               lambda r: stats.spearmanr(x[r], y[r]).statistic, seed=3, n_resamples=500)
    ref = stats.bootstrap((x, y), lambda a, b: stats.spearmanr(a, b).statistic, paired=True, vectorized=False,
                          n_resamples=500, method="BCa", rng=np.random.default_rng(3)).confidence_interval
    assert float(lo) == pytest.approx(ref.low, abs=1e-12) and float(hi) == pytest.approx(ref.high, abs=1e-12)


def test_report_retention_figure_is_the_share_scatter(tmp_path):
    make_sweep(tmp_path, SIMS, lambda s, sim: 0.02 * s + 0.1 * sim)
    report = build_report(tmp_path, tmp_path / "report")
    assert (tmp_path / "report" / "retention.png") in report.files
    assert (tmp_path / "report" / "retention.png").stat().st_size > 0


def test_sweep_without_results_is_one_line(tmp_path):
    (tmp_path / "0_sampler=english" / ".hydra").mkdir(parents=True)
    (tmp_path / "0_sampler=english" / ".hydra" / "overrides.yaml").write_text("- sampler=english\n")
    for target in (tmp_path, tmp_path / "nope"):
        proc = subprocess.run([sys.executable, "-m", "mbs.analyze", str(target)], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"mbs-analyze: sweep directory {target} "), lines


# ---- within-condition estimates ----

def _by(result, scope: str, label: str):
    group = result.within if scope == "within" else result.correlations
    return next(c for c in group if c.label == label)


def test_an_effect_between_conditions_only_is_not_found_within_them(tmp_path):
    """Conditions whose mean similarity and mean retention move together, with similarity independent of retention
    inside each: the pooled correlation is strong, the within-condition one is not."""
    synthetic_sweep(tmp_path, between=2.0, within=0.0, noise=0.2, seed=1)
    result = analyze(tmp_path, tmp_path / "out", seed=0, n_resamples=999)
    pooled, within = _by(result, "pooled", "similarity (layer 0)"), _by(result, "within", "similarity (layer 0)")
    assert pooled.spearman > 0.8 and pooled.spearman_ci[0] > 0.5, pooled
    assert within.spearman_ci[0] < 0 < within.spearman_ci[1] and abs(within.spearman) < 0.2, within
    assert within.pearson_ci[0] < 0 < within.pearson_ci[1], within
    assert within.n == 120 and within.languages == 20 and within.conditions == 6
    (wfit,), (fit,) = result.within_fits, result.fits
    assert wfit.ci[1][0] < 0 < wfit.ci[1][1] and fit.ci[2][0] > 1, (wfit, fit)  # similarity slope
    assert f"similarity: ρ = {within.spearman:.2f} [" in result.sentence
    assert len(result.per_condition) == 6 and all(len(c.correlations) == 2 for c in result.per_condition)
    csv = pd.read_csv(tmp_path / "out" / "analysis.csv")
    assert set(csv["analysis"]) >= {f"correlation, {WITHIN}", f"correlation, {POOLED}",
                                    "per condition: sampler=c0, seed 0", "per condition: sampler=c5, seed 0"}


def test_a_planted_within_condition_effect_is_recovered(tmp_path):
    """Within each condition retention = 0.5·(similarity − condition mean) + noise (σ 0.01, similarity σ 0.05: r ≈
    0.93), while between conditions the means move the other way: the within estimate finds the planted slope, the
    pooled one has the opposite sign."""
    synthetic_sweep(tmp_path, between=-1.0, within=0.5, noise=0.01, seed=2)
    df = retention.retention_frame(collect_jobs(tmp_path))
    factor = "similarity_layer0"
    within = retention.within_correlation(df, factor, "similarity", seed=0, n_resamples=999)
    pooled = retention.correlation(df, factor, "similarity", seed=0, n_resamples=999)
    fit = retention.within_fit(df, [retention.SHARE, factor], ["log10 share", "similarity"], seed=0, n_resamples=999)
    planted_r = 0.5 * 0.05 / math.hypot(0.5 * 0.05, 0.01)
    assert within.pearson == pytest.approx(planted_r, abs=0.05) and within.pearson_ci[0] > 0.8, within
    assert within.spearman_ci[0] > 0.8, within
    assert fit.slopes[1] == pytest.approx(0.5, abs=0.05) and fit.ci[1][0] < 0.5 < fit.ci[1][1], fit
    assert fit.ci[1][0] > 0.4, fit
    assert pooled.spearman < -0.8 and pooled.spearman_ci[1] < 0, pooled


SHARES4 = {"en": 0.3, "fr": 0.1, "hi": 0.01, "sw": 1e-4}
SIMS4 = {"a": {"en": 0.9, "fr": 0.8, "hi": 0.6, "sw": 0.5},
         "b": {"en": 0.7, "fr": 0.75, "hi": 0.65, "sw": 0.9},
         "c": {"en": 0.6, "fr": 0.7, "hi": 0.8, "sw": 0.55}}
RET4 = {"a": {"en": 0.10, "fr": 0.05, "hi": -0.02, "sw": -0.20},
        "b": {"en": 0.30, "fr": 0.32, "hi": 0.20, "sw": 0.25},
        "c": {"en": -0.10, "fr": -0.05, "hi": -0.04, "sw": -0.30}}


def _small_sweep(root: Path, extra=None) -> None:
    make_sweep(root, SIMS4, {(c, lang): r for c, by in RET4.items() for lang, r in by.items()}, SHARES4, extra)


def _centred_by_hand(values: dict[str, dict[str, float]]) -> list[float]:
    out = []
    for by_lang in values.values():
        mean = sum(by_lang.values()) / len(by_lang)
        out += [v - mean for v in by_lang.values()]
    return out


def test_within_condition_estimates_match_a_hand_computation(tmp_path):
    _small_sweep(tmp_path)
    result = analyze(tmp_path, tmp_path / "out", seed=0, n_resamples=999)
    yc = np.array(_centred_by_hand(RET4))
    sc = np.array(_centred_by_hand(SIMS4))
    lc = np.array(_centred_by_hand({c: {k: math.log10(v) for k, v in SHARES4.items()} for c in SIMS4}))
    r_by_hand = float((sc @ yc) / math.sqrt((sc @ sc) * (yc @ yc)))
    within = _by(result, "within", "similarity (layer 0)")
    assert within.pearson == pytest.approx(r_by_hand, abs=1e-12)
    assert within.spearman == pytest.approx(stats.spearmanr(sc, yc).statistic, abs=1e-12)
    assert _by(result, "within", "share").pearson == pytest.approx(float((lc @ yc) / math.sqrt((lc @ lc) * (yc @ yc))),
                                                                   abs=1e-12)
    # the fixed-effects slopes solve the normal equations of the centred values
    X = np.column_stack([lc, sc])
    np.testing.assert_allclose(result.within_fits[0].slopes, np.linalg.solve(X.T @ X, X.T @ yc), atol=1e-12)
    # the pooled estimate is the plain correlation of the raw points
    raw_s = [v for by in SIMS4.values() for v in by.values()]
    raw_y = [v for by in RET4.values() for v in by.values()]
    assert _by(result, "pooled", "similarity (layer 0)").pearson == pytest.approx(stats.pearsonr(raw_s, raw_y)
                                                                                  .statistic, abs=1e-12)
    csv = pd.read_csv(tmp_path / "out" / "analysis.csv")
    for cond, job in zip(SIMS4, result.per_condition):
        assert job.label == f"sampler={cond}, seed 0" and job.languages == 4
        rho = stats.spearmanr(list(SIMS4[cond].values()), list(RET4[cond].values())).statistic
        assert job.correlations[1].spearman == pytest.approx(rho, abs=1e-12)
        row = csv[(csv["analysis"] == f"per condition: sampler={cond}, seed 0")
                  & (csv["factor"] == "similarity (layer 0)") & (csv["statistic"] == "spearman")]
        assert float(row["value"].iloc[0]) == pytest.approx(rho, abs=1e-9)


def test_too_few_languages_for_a_ci_is_said_not_printed_as_nan(tmp_path):
    """4 languages: resamples of one language have no correlation, so BCa has no interval."""
    _small_sweep(tmp_path)
    result = analyze(tmp_path, tmp_path / "out", seed=0, n_resamples=999)
    note = "too few languages for a CI (n=4)"
    md = (tmp_path / "out" / "analysis.md").read_text()
    assert "nan" not in md.lower() and note in md and note in result.sentence
    job_row = next(line for line in md.splitlines() if line.startswith("| sampler=a, seed 0 |"))
    assert job_row.count(note) == 3, job_row  # share ρ, share r, similarity ρ
    pooled_row = next(line for line in md.splitlines() if line.startswith(f"| share | {POOLED} |"))
    assert note in pooled_row
    csv = pd.read_csv(tmp_path / "out" / "analysis.csv")
    per = csv[csv["analysis"].str.startswith("per condition: ")]
    assert len(per) == 12 and per["ci_low"].isna().all() and per["ci_high"].isna().all()
    assert (per["note"] == note).all()
    df = result.data
    notes = {c.experiment_id: retention.estimate_text(c.correlations[1].spearman, c.correlations[1].spearman_ci, 4)
             for c in result.per_condition}
    from matplotlib.legend import Legend

    fig = retention.plot_factor(df, "similarity_layer0", "similarity", "t", ci=result.within[1].spearman_ci,
                                per_condition=notes)
    legend = [t.get_text() for box in fig.axes[0].findobj(Legend) for t in box.get_texts()]
    assert len(legend) == 4, legend  # the within-condition fit, then one entry per job
    assert all(note in text for text in legend), legend
    assert all("nan" not in text.lower() for text in legend), legend


BPB = {c: {lang: 0.2 * sim + 0.01 * i for i, (lang, sim) in enumerate(by.items())}
       for c, by in SIMS4.items()}  # bits per byte lost: grows with similarity, unlike the log ratios' retention


def test_bpb_metric_uses_bits_per_byte(tmp_path, monkeypatch):
    _small_sweep(tmp_path, extra=lambda c, lang: {"dense_bpb": 1.5, "compressed_bpb": 1.5 + BPB[c][lang]})
    result = analyze(tmp_path, tmp_path / "out", seed=0, n_resamples=999, metric="bpb")
    df = result.data
    np.testing.assert_allclose(df["bpb_retention"], -(df["compressed_bpb"] - df["dense_bpb"]), atol=0)
    yc = -np.array(_centred_by_hand(BPB))
    sc = np.array(_centred_by_hand(SIMS4))
    within = _by(result, "within", "similarity (layer 0)")
    assert within.pearson == pytest.approx(float((sc @ yc) / math.sqrt((sc @ sc) * (yc @ yc))), abs=1e-12)
    log_within = retention.within_correlation(df, "similarity_layer0", "s", n_resamples=200)
    assert within.pearson < -0.8 and log_within.pearson > 0.7  # not the log ratio's
    assert result.metric == "bpb" and "retention in bits per byte" in result.sentence
    md = (tmp_path / "out" / "analysis.md").read_text()
    assert "−(compressed − dense bits per byte), in bits per byte" in md
    points = pd.read_csv(tmp_path / "out" / "analysis_points.csv")
    assert {"dense_bpb", "compressed_bpb", "bpb_retention"} <= set(points.columns)


def test_bpb_metric_fails_in_one_line_without_bits_per_byte(tmp_path, monkeypatch):
    _small_sweep(tmp_path)
    with pytest.raises(ValueError, match="^metric=bpb: the results predate bits per byte") as err:
        analyze(tmp_path, tmp_path / "out", metric="bpb", n_resamples=200)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="metric='nope': choose one of log_ratio, bpb"):
        analyze(tmp_path, tmp_path / "out", metric="nope")
    proc = subprocess.run([sys.executable, "-m", "mbs.analyze", str(tmp_path), "--metric", "bpb"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "predate bits per byte" in lines[0], proc.stderr
    # some jobs with bits per byte and some without: no silent subset
    mixed = tmp_path / "mixed"
    _small_sweep(mixed, extra=lambda c, lang: {} if c == "b" else {"dense_bpb": 1.5, "compressed_bpb": 1.6})
    with pytest.raises(ValueError, match=r"^metric=bpb: 1 of 3 job\(s\) have languages without bits per byte"):
        analyze(mixed, mixed / "out", metric="bpb", n_resamples=200)


def test_two_way_fixed_effects_remove_a_language_level_confound(tmp_path):
    """Similarity and retention both follow a per-language offset (as script or tokens per byte would), and within a
    language retention does not move with similarity across jobs: the within-condition estimate is fooled, the
    job-and-language fixed-effects estimate is not; a planted within-language effect is recovered."""
    rng = np.random.default_rng(4)
    langs = [f"l{i:02d}" for i in range(16)]
    offset = dict(zip(langs, rng.normal(0, 1, len(langs))))

    def sweep(root, effect):
        for num in range(5):
            job = root / f"{num}_sampler=s{num}"
            (job / ".hydra").mkdir(parents=True)
            (job / ".hydra" / "overrides.yaml").write_text(f"- sampler=s{num}\n")
            sims = {k: 0.5 + 0.1 * offset[k] + 0.05 * rng.normal() for k in langs}
            rows = []
            for k in langs:
                r = 0.3 * offset[k] + effect * (sims[k] - 0.5 - 0.1 * offset[k]) + 0.01 * rng.normal() - 0.1 * num
                rows.append({"language": k, "training_share": 0.01 * (1 + langs.index(k)), "dense_ppl": 10.0,
                             "compressed_ppl": 10.0 * math.exp(-r), "ratio": math.exp(-r), "log_ratio": -r,
                             "tokens": 9})
            results = {"experiment_id": f"e{num}", "config": {"seed": 0}, "model": {"name": "toy"},
                       "languages": rows, "compression": {"sparsity": 0.5},
                       "similarity": {"layers": {"0": {"requested": 0, "languages": langs,
                                                       "matrix": np.eye(len(langs)).tolist(), "to_calibration": sims}}}}
            (job / "results.json").write_text(json.dumps(results))
        return analyze(root, n_resamples=999)

    confounded = sweep(tmp_path / "a", effect=0.0)
    assert confounded.within[1].spearman > 0.5 and confounded.within[1].spearman_ci[0] > 0
    lo, hi = confounded.two_way[0].spearman_ci
    assert lo < 0 < hi, confounded.two_way[0]
    planted = sweep(tmp_path / "b", effect=2.0)
    assert planted.two_way[0].pearson > 0.9 and planted.two_way[0].pearson_ci[0] > 0.5
    assert "job and language fixed effects" in (tmp_path / "a" / "analysis" / "analysis.md").read_text()


def test_language_effects_within_a_seed_remove_a_language_by_seed_confound():
    """A factor and the measured damage both shift with each (language, seed) pair (as a seed's own probe text would),
    and within a seed the factor follows the damage: one language effect over every seed is fooled by the shifts,
    one language effect per seed (``within="seed"``) recovers the planted relation; the bootstrap still resamples the
    languages."""
    from mbs.analyze.retention import two_way_correlation

    rng = np.random.default_rng(7)
    rows = []
    for seed in range(3):
        for lang in [f"l{i:02d}" for i in range(12)]:
            shift = rng.normal(0, 1)  # this language's offset on this seed, in the factor only
            base = rng.normal(0, 1)
            for job in range(3):
                damage = base + 0.3 * job + rng.normal(0, 0.3)
                rows.append({"experiment_id": f"{job}-{seed}", "language": lang, "seed": seed,
                             "log_retention": -damage, "factor": damage + 5 * shift + rng.normal(0, 0.1)})
    df = pd.DataFrame(rows)
    pooled = two_way_correlation(df, "factor", "factor", n_resamples=500)
    per_seed = two_way_correlation(df, "factor", "factor", n_resamples=500, within="seed")
    assert abs(pooled.spearman) < 0.4
    assert per_seed.spearman < -0.8 and per_seed.spearman_ci[1] < -0.6  # retention is −damage
    assert per_seed.languages == pooled.languages == 12 and per_seed.n == 108
