"""Language similarity from the engine's statistics, and the retention analysis over a hand-made sweep directory."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from conftest import calibration, tiny
from mbs.analyze import similarity
from mbs.analyze.retention import analyze, cluster_bootstrap
from mbs.compress.engine import EngineConfig
from mbs.models.adapter import Adapter
from mbs.record.report import build_report

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
    from test_config import compose_run

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


def make_sweep(root: Path, conditions: dict[str, dict[str, float]], retention) -> dict:
    """One job per condition: {condition: {language: similarity}}; retention(share, similarity) gives each point."""
    points = {}
    for num, (sampler, sims) in enumerate(conditions.items()):
        job = root / f"{num}_sampler={sampler}"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- sampler={sampler}\n")
        rows = []
        for lang in LANGS:
            share = SHARES[lang]
            r = retention(math.log10(share) if share else 0.0, sims[lang])
            points[(sampler, lang)] = r
            rows.append({"language": lang, "share": 0.1, "training_share": share, "dense_ppl": 10.0,
                         "compressed_ppl": 10.0 * math.exp(-r), "ratio": math.exp(-r), "log_ratio": -r, "tokens": 9})
        names = list(sims)
        matrix = np.eye(len(names)).tolist()
        results = {"experiment_id": f"exp{num}", "config": {"seed": 0}, "model": {"name": "toy"}, "languages": rows,
                   "compression": {"sparsity": 0.5},
                   "similarity": {"layers": {"0": {"requested": 0, "languages": names, "matrix": matrix,
                                                   "to_calibration": sims}}}}
        (job / "results.json").write_text(json.dumps(results))
    return points


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
    assert result.sentence.startswith(f"share: ρ = {share.spearman:.2f} [") and "; similarity: ρ = " in result.sentence
    md = (tmp_path / "out" / "analysis.md").read_text()
    assert result.sentence in md and "| share | 15 | 5 | xx |" in md
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
