"""What predicts how much of a language a compressed model keeps, over a sweep directory.

Every finished job and evaluated language is one point: retention = −log(compressed ppl / dense ppl) (0 = nothing
lost, negative = worse), against (a) log10 of the language's *absolute* training share (``training_share`` in the
rows: its fraction of the model's whole distribution, not renormalised over the evaluated languages; languages the
distribution does not name are left out and counted) and (b) its cosine similarity to the job's calibration mixture
(``results["similarity"]``, per recorded layer). Spearman and Pearson per factor and a joint least-squares fit of
retention on both factors come with bootstrap 95% CIs (scipy.stats.bootstrap, BCa, seeded) that resample
*languages*, not points: a language appears once per job with the same share, so its points are not independent.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from mbs.analyze.similarity import model_label
from mbs.atomic import atomic_write
from mbs.record.figures import save_figure
from mbs.record.report import frame, result_key
from mbs.sweep import Job, collect_jobs, format_status

RETENTION = "log_retention"  # −log ratio = log(dense ppl / compressed ppl)
RETENTION_LABEL = "retention: −log(compressed ppl / dense ppl)"
SHARE = "log10_share"
N_RESAMPLES = 9999
MIN_LANGUAGES = 3


def similarity_column(index: str) -> str:
    return f"similarity_layer{index}"


def retention_frame_of(df: pd.DataFrame) -> pd.DataFrame:
    """Add retention and log10 absolute training share (NaN where the distribution names no share) to a report
    frame (mbs.record.report.frame)."""
    df = df.copy()
    df[RETENTION] = -df["log_ratio"]
    share = pd.to_numeric(df["training_share"], errors="coerce")
    df[SHARE] = np.log10(share.where(share > 0))
    return df


def retention_frame(jobs: list[Job]) -> pd.DataFrame:
    """The report's per-job, per-language frame plus retention, log10 absolute share and, per recorded layer, the
    similarity of the language to the job's calibration mixture."""
    df = frame(jobs)
    if df.empty:
        return df
    df = retention_frame_of(df)
    sims: dict[str, dict[str, dict[str, float]]] = {}  # experiment key -> layer -> language -> similarity
    for job in jobs:
        if job.results is not None and job.results.get("similarity"):
            sims[result_key(job)] = {i: layer["to_calibration"]
                                     for i, layer in job.results["similarity"]["layers"].items()}
    layers = list(dict.fromkeys(i for by_layer in sims.values() for i in by_layer))
    for index in layers:
        df[similarity_column(index)] = [sims.get(k, {}).get(index, {}).get(lang, math.nan)
                                        for k, lang in zip(df["experiment_id"], df["language"])]
    df.attrs["layers"] = layers
    return df


# ---- statistics ----

def spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import pearsonr

    return float(pearsonr(x, y).statistic)


def ols(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Intercept and slopes of y on the columns of X."""
    design = np.column_stack([np.ones(len(y)), X])
    return np.linalg.lstsq(design, y, rcond=None)[0]


def cluster_bootstrap(clusters: np.ndarray, statistic: Callable[[np.ndarray], Any], seed: int,
                      n_resamples: int = N_RESAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """95% BCa interval of ``statistic(rows)`` when whole clusters (languages) are resampled with replacement."""
    from scipy.stats import bootstrap

    labels = list(dict.fromkeys(clusters))
    rows = [np.flatnonzero(clusters == c) for c in labels]

    def of_clusters(sample: np.ndarray) -> Any:
        return statistic(np.concatenate([rows[int(i)] for i in sample]))

    with warnings.catch_warnings():  # a resample of one language has no correlation: NaN, reported as such
        warnings.simplefilter("ignore", category=RuntimeWarning)
        warnings.filterwarnings("ignore", message=".*(constant|BCa confidence interval cannot).*")
        res = bootstrap((np.arange(len(labels)),), of_clusters, vectorized=False, n_resamples=n_resamples,
                        confidence_level=0.95, method="BCa", rng=np.random.default_rng(seed))
    low, high = np.array(res.confidence_interval.low, float), np.array(res.confidence_interval.high, float)
    dist = np.asarray(res.bootstrap_distribution, float)
    constant = np.ptp(dist, axis=-1) <= 1e-12 * np.maximum(1.0, np.abs(dist).max(axis=-1))
    low, high = np.where(constant, dist[..., 0], low), np.where(constant, dist[..., 0], high)  # BCa gives NaN there
    return low, high


@dataclass
class Correlation:
    factor: str
    label: str
    n: int
    languages: int
    left_out: list[str]  # languages without a value of the factor (e.g. no training share)
    spearman: float
    spearman_ci: tuple[float, float]
    pearson: float
    pearson_ci: tuple[float, float]

    def sentence(self) -> str:
        lo, hi = self.spearman_ci
        return f"{self.label}: ρ = {self.spearman:.2f} [{lo:.2f}, {hi:.2f}]"


def correlation(df: pd.DataFrame, factor: str, label: str, seed: int = 0,
                n_resamples: int = N_RESAMPLES) -> Correlation:
    usable = df[df[factor].notna()]
    left_out = sorted(set(df["language"]) - set(usable["language"]))
    x, y, clusters = usable[factor].to_numpy(float), usable[RETENTION].to_numpy(float), usable["language"].to_numpy()
    if usable["language"].nunique() < MIN_LANGUAGES:
        raise ValueError(f"{label}: {usable['language'].nunique()} language(s) have a value; a correlation over "
                         f"languages needs at least {MIN_LANGUAGES}")
    cis = {}
    for name, fn in (("spearman", spearman), ("pearson", pearson)):
        lo, hi = cluster_bootstrap(clusters, lambda r, fn=fn: fn(x[r], y[r]), seed, n_resamples)
        cis[name] = (float(lo), float(hi))
    return Correlation(factor, label, len(usable), usable["language"].nunique(), left_out, spearman(x, y),
                       cis["spearman"], pearson(x, y), cis["pearson"])


@dataclass
class JointFit:
    factors: list[str]
    labels: list[str]
    n: int
    coefficients: list[float]  # intercept, then one per factor
    ci: list[tuple[float, float]]
    standardized: list[float]  # per factor: slope with both sides z-scored (comparable across factors)
    r2: float


def joint_fit(df: pd.DataFrame, factors: list[str], labels: list[str], seed: int = 0,
              n_resamples: int = N_RESAMPLES) -> JointFit:
    """retention = b0 + Σ b_k·factor_k by least squares over the points that have every factor."""
    usable = df.dropna(subset=factors)
    if usable["language"].nunique() < MIN_LANGUAGES:
        raise ValueError(f"joint fit: {usable['language'].nunique()} language(s) have every factor; it needs at "
                         f"least {MIN_LANGUAGES}")
    X, y = usable[factors].to_numpy(float), usable[RETENTION].to_numpy(float)
    coef = ols(X, y)
    residual = y - np.column_stack([np.ones(len(y)), X]) @ coef
    r2 = 1 - float(residual @ residual) / float(((y - y.mean()) ** 2).sum())
    zX, zy = (X - X.mean(0)) / X.std(0), (y - y.mean()) / y.std()
    lo, hi = cluster_bootstrap(usable["language"].to_numpy(), lambda r: ols(X[r], y[r]), seed, n_resamples)
    return JointFit(factors, labels, len(usable), coef.tolist(), list(zip(lo.tolist(), hi.tolist())),
                    ols(zX, zy)[1:].tolist(), r2)


# ---- figures ----

def _place_labels(ax, anchors: list[tuple[float, float, str]], fontsize: float = 5.5) -> int:
    """Label anchors without overlaps: each label tries a few offsets around its point and is kept at the first
    that overlaps no earlier label and stays inside the axes; returns how many found no place."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    r = 2.5 * fig.dpi / 72  # a marker's half-width, in pixels
    dots = [ax.transData.transform((x, y)) for x, y, _ in anchors]
    placed: list = [Bbox([[px - r, py - r], [px + r, py + r]]) for px, py in dots]  # labels must not hide points
    offsets = [(3, 2, "left", "bottom"), (3, -2, "left", "top"), (-3, 2, "right", "bottom"),
               (-3, -2, "right", "top"), (0, 5, "center", "bottom"), (0, -5, "center", "top"),
               (6, 8, "left", "bottom"), (-6, -8, "right", "top")]
    missed = 0
    for x, y, text in anchors:
        for dx, dy, ha, va in offsets:
            label = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                                fontsize=fontsize, color="0.25")
            box = label.get_window_extent(renderer).expanded(1.05, 1.1)
            fits = (box.x0 >= inside.x0 and box.x1 <= inside.x1 and box.y0 >= inside.y0 and box.y1 <= inside.y1
                    and not any(box.overlaps(other) for other in placed))
            if fits:
                placed.append(box)
                break
            label.remove()
        else:
            missed += 1
    return missed


def plot_factor(df: pd.DataFrame, factor: str, xlabel: str, title: str, path: Path | None = None,
                log_share: bool = False, ci: tuple[float, float] | None = None, label_per_language: bool = False):
    """Retention against one factor: one colour per condition, one least-squares line over all points, Spearman ρ
    (with its CI when given) in the legend. ``log_share``: the factor is log10 of a share, drawn as a share in %
    on a log axis. ``label_per_language``: one label per language (at its highest point), else one per point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usable = df[df[factor].notna()]
    left_out = sorted(set(df["language"]) - set(usable["language"]))
    conds = list(dict.fromkeys(usable["condition"]))
    colours = plt.get_cmap("tab10" if len(conds) <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(7.5, 5.6))
    show = (lambda v: 100 * 10 ** np.asarray(v)) if log_share else (lambda v: np.asarray(v))
    for k, cond in enumerate(conds):
        g = usable[usable["condition"] == cond]
        ax.scatter(show(g[factor]), g[RETENTION], s=16, color=colours(k % colours.N), label=cond, alpha=0.85,
                   edgecolors="none", zorder=3)
    x, y = usable[factor].to_numpy(float), usable[RETENTION].to_numpy(float)
    if len(usable) >= 3 and np.ptp(x) > 0:
        b0, b1 = ols(x[:, None], y)
        grid = np.linspace(x.min(), x.max(), 100)
        rho = spearman(x, y)
        shown_ci = ci is not None and all(map(math.isfinite, ci))
        text = f"least-squares fit; Spearman ρ = {rho:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if shown_ci else "")
        ax.plot(show(grid), b0 + b1 * grid, color="black", linewidth=1, zorder=2, label=text + f" (n = {len(x)})")
    ax.axhline(0.0, color="0.6", linewidth=0.6, linestyle=":", zorder=1)
    if log_share:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(RETENTION_LABEL + "\n(0 = nothing lost)")
    named = ": " + ", ".join(left_out) if len(left_out) <= 8 else ""
    ax.set_title(title + (f"\n({len(left_out)} language(s) with no value left out{named})" if left_out else ""),
                 fontsize=9)
    if not usable.empty:
        ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    ax.margins(x=0.06, y=0.08)
    fig.tight_layout()
    if usable.empty:
        anchors = []
    elif label_per_language:
        top = usable.loc[usable.groupby("language")[RETENTION].idxmax()]
        anchors = [(float(show(r[factor])), r[RETENTION], r["language"]) for _, r in top.iterrows()]
    else:
        anchors = [(float(show(r[factor])), r[RETENTION], r["language"]) for _, r in usable.iterrows()]
    _place_labels(ax, sorted(anchors, key=lambda a: -a[1]))
    if path is not None:
        save_figure(fig, path)
    return fig


SHARE_XLABEL = "training share of the language, % of the model's whole distribution (log scale)"


def plot_share(df: pd.DataFrame, path: Path | None = None, ci: tuple[float, float] | None = None,
               title: str = "Retention vs training share"):
    """The share scatter (also the sweep report's retention.png)."""
    return plot_factor(df, SHARE, SHARE_XLABEL, title, path, log_share=True, ci=ci, label_per_language=True)


# ---- one sweep ----

@dataclass
class Analysis:
    status: str
    data: pd.DataFrame
    correlations: list[Correlation]
    fits: list[JointFit]
    sentence: str
    files: list[Path]


def _heatmap_source(jobs: list[Job], index: str) -> tuple[dict[str, Any] | None, float]:
    """The layer record covering the most languages, and the largest disagreement of any other job's matrix with it
    on their common languages (0 when every job probed the same dense model the same way)."""
    records = [j.results["similarity"]["layers"][index] for j in jobs
               if j.results is not None and (j.results.get("similarity") or {}).get("layers", {}).get(index)]
    if not records:
        return None, math.nan
    best = max(records, key=lambda r: len(r["languages"]))
    pos = {k: i for i, k in enumerate(best["languages"])}
    m = np.asarray(best["matrix"])
    gap = 0.0
    for r in records:
        idx = [pos[k] for k in r["languages"]]
        gap = max(gap, float(np.abs(np.asarray(r["matrix"]) - m[np.ix_(idx, idx)]).max()))
    return best, gap


def _models(jobs: list[Job]) -> str:
    return ", ".join(dict.fromkeys(model_label(j.results) for j in jobs if j.results is not None))


def _ci(lo: float, hi: float) -> str:
    return f"[{lo:.3f}, {hi:.3f}]"


def analyze(sweep_dir: str | Path, out: str | Path | None = None, seed: int = 0,
            n_resamples: int = N_RESAMPLES) -> Analysis:
    """Collect a sweep directory and write analysis.md, analysis.csv (statistics), analysis_points.csv (one row per
    job and language), the scatters and the similarity heatmaps into out (default <sweep_dir>/analysis)."""
    from mbs.analyze.similarity import heatmap_title, layer_label, matrix_csv, plot_heatmap

    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ValueError(f"sweep directory {sweep_dir} does not exist")
    jobs = collect_jobs(sweep_dir)
    status, _ = format_status(jobs, sweep_dir)
    df = retention_frame(jobs)
    if df.empty:
        raise ValueError(f"sweep directory {sweep_dir} has no finished job (no results.json below it); "
                         "run the sweep first, or give the directory a multirun wrote")
    out = Path(out) if out else sweep_dir / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    models = _models(jobs)
    requested = {}
    for job in jobs:
        for index, layer in ((job.results or {}).get("similarity") or {}).get("layers", {}).items():
            requested.setdefault(index, layer.get("requested"))
    layers = df.attrs["layers"]
    names = {i: layer_label(i, requested.get(i)) for i in layers}
    corrs = [correlation(df, SHARE, "share", seed, n_resamples)]
    corrs += [correlation(df, similarity_column(i), f"similarity ({names[i]})", seed, n_resamples) for i in layers]
    fits = [joint_fit(df, [SHARE, similarity_column(i)], ["log10 share", f"similarity ({names[i]})"], seed,
                      n_resamples) for i in layers]

    files = [out / "analysis.md", out / "analysis.csv", out / "analysis_points.csv"]
    plot_share(df, out / "retention_vs_share.png", corrs[0].spearman_ci,
               title=f"{models}\nretention vs training share")
    files.append(out / "retention_vs_share.png")
    heatmap_notes = []
    for i, c in zip(layers, corrs[1:]):
        path = out / f"retention_vs_similarity_layer{i}.png"
        plot_factor(df, similarity_column(i), f"cosine similarity to the job's calibration mixture ({names[i]} input)",
                    f"{models}\nretention vs similarity to the calibration mixture", path, ci=c.spearman_ci)
        files.append(path)
        record, gap = _heatmap_source(jobs, i)
        if record is not None:
            heat = out / f"similarity_layer{i}.png"
            title = heatmap_title(models, i, requested.get(i))
            save_figure(plot_heatmap(record["languages"], record["matrix"], title), heat)
            atomic_write(heat.with_suffix(".csv"), matrix_csv(record["languages"], record["matrix"]))
            files += [heat, heat.with_suffix(".csv")]
            heatmap_notes.append(f"- {names[i]}: the largest difference between jobs' matrices on common languages "
                                 f"is {gap:.2e} (the probe is the same in every job).")

    share = corrs[0]
    sentence = share.sentence()
    if len(corrs) > 1:
        sim = corrs[1]
        lo, hi = sim.spearman_ci
        sentence += f"; similarity: ρ = {sim.spearman:.2f} [{lo:.2f}, {hi:.2f}]"
        sentence += f" (similarity at the input of {names[layers[0]]})"
    points = ["condition", "seed", "experiment_id", "language", "training_share", SHARE, "dense_ppl",
              "compressed_ppl", "log_ratio", RETENTION] + [similarity_column(i) for i in layers]
    atomic_write(files[2], df[points].to_csv(index=False, float_format="%.10g"))
    atomic_write(files[1], _statistics_table(corrs, fits).to_csv(index=False, float_format="%.10g"))
    atomic_write(files[0], _markdown(sweep_dir, status, models, sentence, corrs, fits, heatmap_notes, n_resamples,
                                     seed, files[3:]))
    return Analysis(status, df, corrs, fits, sentence, files)


def _statistics_table(corrs: list[Correlation], fits: list[JointFit]) -> pd.DataFrame:
    rows = []
    for c in corrs:
        for stat in ("spearman", "pearson"):
            lo, hi = getattr(c, f"{stat}_ci")
            rows.append({"analysis": "correlation", "factor": c.label, "statistic": stat, "value": getattr(c, stat),
                         "ci_low": lo, "ci_high": hi, "n": c.n, "languages": c.languages})
    for f in fits:
        model = " + ".join(f.labels)
        for name, value, (lo, hi) in zip(["intercept", *f.labels], f.coefficients, f.ci):
            rows.append({"analysis": f"joint fit: retention ~ {model}", "factor": name, "statistic": "coefficient",
                         "value": value, "ci_low": lo, "ci_high": hi, "n": f.n})
        for name, value in zip(f.labels, f.standardized):
            rows.append({"analysis": f"joint fit: retention ~ {model}", "factor": name, "statistic": "standardized",
                         "value": value, "n": f.n})
        rows.append({"analysis": f"joint fit: retention ~ {model}", "factor": "", "statistic": "R2", "value": f.r2,
                     "n": f.n})
    return pd.DataFrame(rows)


def _markdown(sweep_dir: Path, status: str, models: str, sentence: str, corrs: list[Correlation],
              fits: list[JointFit], heatmap_notes: list[str], n_resamples: int, seed: int, figures: list[Path]) -> str:
    lines = [f"# Retention analysis: {sweep_dir}", "", "```", status, "```", "", f"Model(s): {models}.", "",
             f"**{sentence}**", "",
             "Each point is one finished job and one evaluated language. Retention = −log(compressed ppl / dense ppl) "
             "(0 = nothing lost). Share = the language's absolute training share (fraction of the model's whole "
             "distribution), log10. Similarity = cosine of the language's activation vector with the job's "
             "calibration-mixture vector (results.json `similarity`). 95% CIs: BCa bootstrap over languages "
             f"(scipy.stats.bootstrap, {n_resamples} resamples, seed {seed}).", "",
             "| factor | points | languages | left out | Spearman ρ [95% CI] | Pearson r [95% CI] |",
             "|---|---:|---:|---|---:|---:|"]
    for c in corrs:
        lines.append(f"| {c.label} | {c.n} | {c.languages} | {', '.join(c.left_out) or '–'} | "
                     f"{c.spearman:.3f} {_ci(*c.spearman_ci)} | {c.pearson:.3f} {_ci(*c.pearson_ci)} |")
    if fits:
        lines += ["", "Joint least-squares fit, retention = b0 + b1·log10(share) + b2·similarity "
                  "(standardized: both sides z-scored, so the two slopes compare):", "",
                  "| similarity of | points | b0 [95% CI] | b1 (log10 share) [95% CI] | b2 (similarity) [95% CI] | "
                  "standardized b1 / b2 | R² |", "|---|---:|---:|---:|---:|---:|---:|"]
        for f in fits:
            cells = [f"{v:.4f} {_ci(*ci)}" for v, ci in zip(f.coefficients, f.ci)]
            lines.append(f"| {f.labels[1].removeprefix('similarity (').removesuffix(')')} | {f.n} | {' | '.join(cells)} | "
                         f"{f.standardized[0]:.3f} / {f.standardized[1]:.3f} | {f.r2:.3f} |")
    else:
        lines += ["", "No job recorded language similarity (analysis.layers=[]): only the share factor is analysed."]
    if heatmap_notes:
        lines += ["", "Similarity heatmaps:", *heatmap_notes]
    lines += ["", "Figures: " + ", ".join(f"`{p.name}`" for p in figures if p.suffix == ".png"), ""]
    return "\n".join(lines)
