"""What predicts how much of a language a compressed model keeps, over a sweep directory.

Every finished job and evaluated language is one point. Retention is measured in one of ``METRICS``:
−log(compressed ppl / dense ppl), nats per token (default; 0 = nothing lost, negative = worse), or −(compressed −
dense bits per byte), which does not depend on how finely each language's text is cut into tokens. The factors:
(a) log10 of the language's *absolute* training share (``training_share`` in the rows: its fraction of the model's
whole distribution, not renormalised over the evaluated languages; languages the distribution does not name are left
out and counted) and (b) its cosine similarity to the job's calibration mixture (``results["similarity"]``, per
recorded layer).

The claim under test holds *within* a compression setting: given the calibration data, do languages with more share,
or more similar to it, keep more? Pooling every job's points mixes that with differences *between* jobs (a mixture
sets both how similar every language is to it and how much every language loses), which can give a confident pooled
correlation that no single job shows. So the headline is the within-condition estimate, a condition being one job
(one ``experiment_id``: a calibration mixture / compressor setting and a seed): the factor and retention are centred
within each job (its mean subtracted, over the points that have both), then Spearman and Pearson over all centred
points, and the least-squares fit of centred retention on the centred factors, which equals a fit with one intercept
per job (job fixed effects). Spearman is taken of the centred values, not of ranks within each job, so that ρ, r and
the slopes describe the same points. Each job's own correlations over its languages are reported too, and the pooled
(between + within) estimates stay in the tables, labelled as such.

95% CIs: BCa bootstrap (scipy.stats.bootstrap, seeded) over *languages*, not points: a language appears once per job
with the same share, so its points are not independent; a resampled language brings all its jobs, and the centring is
redone in every resample. Within one job each language is one point. With few languages some resamples hold a single
language and have no correlation, and BCa then has no interval: the estimate is reported with "too few languages for
a CI (n=…)" instead.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from mbs.analyze.similarity_plots import heatmap_title, layer_label, matrix_csv, model_label, plot_heatmap
from mbs.atomic import atomic_write
from mbs.record.accuracy_retention import retention_section
from mbs.record.figures import save_figure
from mbs.record.frame import frame, result_key
from mbs.record.jobs import Job, collect_jobs, format_status


@dataclass(frozen=True)
class Metric:
    """What retention is measured in: ``column`` is the retention column ``retention_frame_of`` adds."""
    name: str
    column: str
    definition: str
    unit: str

    @property
    def label(self) -> str:
        return f"retention: {self.definition}, {self.unit}"


METRICS = {"log_ratio": Metric("log_ratio", "log_retention", "−log(compressed ppl / dense ppl)", "nats per token"),
           "bpb": Metric("bpb", "bpb_retention", "−(compressed − dense bits per byte)", "bits per byte")}
BPB_COLUMNS = ("dense_bpb", "compressed_bpb")
RETENTION = METRICS["log_ratio"].column  # −log ratio = log(dense ppl / compressed ppl)
RETENTION_LABEL = "retention: −log(compressed ppl / dense ppl)"
SHARE = "log10_share"
N_RESAMPLES = 9999
MIN_LANGUAGES = 3
POOLED = "pooled across conditions (includes between-condition differences)"
WITHIN = "within condition (centred per job)"
TWO_WAY = "within condition and language (job and language fixed effects)"
CI_RESAMPLES = "95% CI: BCa bootstrap over languages, each resampled with all its jobs"


def metric_of(name: str) -> Metric:
    if name not in METRICS:
        raise ValueError(f"metric={name!r}: choose one of {', '.join(METRICS)}")
    return METRICS[name]


def similarity_column(index: str) -> str:
    return f"similarity_layer{index}"


def retention_frame_of(df: pd.DataFrame, metric: str = "log_ratio") -> pd.DataFrame:
    """Add retention (−log ratio, and −bits-per-byte difference where the frame has ``dense_bpb`` and
    ``compressed_bpb``) and log10 absolute training share (NaN where the distribution names no share) to a report
    frame (mbs.record.report.frame). ``metric="bpb"`` fails when any point lacks bits per byte, rather than
    analysing a subset of the jobs."""
    m = metric_of(metric)
    df = df.copy()
    df[RETENTION] = -df["log_ratio"]
    if all(c in df for c in BPB_COLUMNS):
        dense, compressed = (pd.to_numeric(df[c], errors="coerce") for c in BPB_COLUMNS)
        df[METRICS["bpb"].column] = -(compressed - dense)
    if m.name == "bpb":
        have = df[m.column] if m.column in df else pd.Series(math.nan, index=df.index)
        if have.isna().all():
            raise ValueError("metric=bpb: the results predate bits per byte (no dense_bpb / compressed_bpb per "
                             "language); rerun the jobs, or use metric=log_ratio")
        if have.isna().any():
            old = list(dict.fromkeys(df.loc[have.isna(), "experiment_id"]))
            raise ValueError(f"metric=bpb: {len(old)} of {df['experiment_id'].nunique()} job(s) have languages "
                             f"without bits per byte (results that predate it?), e.g. {old[0]}; rerun them, or use "
                             "metric=log_ratio")
    share = pd.to_numeric(df["training_share"], errors="coerce")
    df[SHARE] = np.log10(share.where(share > 0))
    return df


def retention_frame(jobs: list[Job], metric: str = "log_ratio") -> pd.DataFrame:
    """The report's per-job, per-language frame plus retention, log10 absolute share and, per recorded layer, the
    similarity of the language to the job's calibration mixture."""
    df = frame(jobs)
    if df.empty:
        return df
    df = retention_frame_of(df, metric)
    sims: dict[str, dict[str, dict[str, float]]] = {}  # experiment key -> layer -> language -> similarity
    for job in jobs:
        if job.results is not None and job.results.similarity:
            sims[result_key(job)] = {i: layer["to_calibration"]
                                     for i, layer in job.results.similarity["layers"].items()}
    layers = list(dict.fromkeys(i for by_layer in sims.values() for i in by_layer))
    for index in layers:
        df[similarity_column(index)] = [sims.get(k, {}).get(index, {}).get(lang, math.nan)
                                        for k, lang in zip(df["experiment_id"], df["language"])]
    df.attrs["layers"] = layers
    return df


def condition_labels(df: pd.DataFrame) -> dict[str, str]:
    """Per experiment_id: its condition and seed ("sampler=english, seed 0"); the id is added where two jobs would
    otherwise read the same."""
    labels = {}
    for eid, g in df.groupby("experiment_id", sort=False):
        seed = g["seed"].iloc[0] if "seed" in g else None
        if seed is None or (isinstance(seed, float) and math.isnan(seed)):
            labels[eid] = str(g["condition"].iloc[0])
        else:
            labels[eid] = f"{g['condition'].iloc[0]}, seed {int(seed) if float(seed).is_integer() else seed}"
    counts = pd.Series(list(labels.values())).value_counts()
    return {eid: f"{label} ({eid})" if counts[label] > 1 else label for eid, label in labels.items()}


# ---- statistics ----

def spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import pearsonr

    return float(pearsonr(x, y).statistic)


def _corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson along the last axis (NaN where a side is constant): the bootstrap's fast path."""
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1))


def spearman_pearson(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """[Spearman, Pearson] along the last axis (Spearman = Pearson of average ranks, as scipy's)."""
    from scipy.stats import rankdata

    return np.stack([_corr(rankdata(x, axis=-1), rankdata(y, axis=-1)), _corr(x, y)])


def ols(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Intercept and slopes of y on the columns of X."""
    design = np.column_stack([np.ones(len(y)), X])
    return np.linalg.lstsq(design, y, rcond=None)[0]


def centred(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """``values`` (points, or points × columns) minus the mean of their group's values; ``groups``: integer codes.
    Differences within rounding of zero are set to zero, so that a group of equal values is exactly constant."""
    values = np.asarray(values, float)
    counts = np.maximum(np.bincount(groups), 1)
    cols = values.reshape(len(values), -1)
    means = np.column_stack([np.bincount(groups, weights=c, minlength=len(counts)) / counts for c in cols.T])
    out = cols - means[groups]
    out[np.abs(out) <= 1e-12 * np.maximum(1.0, np.abs(cols).max(0))] = 0.0
    return out.reshape(values.shape)


def _interval(res: Any) -> tuple[np.ndarray, np.ndarray]:
    low, high = np.array(res.confidence_interval.low, float), np.array(res.confidence_interval.high, float)
    dist = np.asarray(res.bootstrap_distribution, float)
    constant = np.ptp(dist, axis=-1) <= 1e-12 * np.maximum(1.0, np.abs(dist).max(axis=-1))
    low, high = np.where(constant, dist[..., 0], low), np.where(constant, dist[..., 0], high)  # BCa gives NaN there
    return low, high


def _quiet_bootstrap(*args: Any, **kwargs: Any) -> Any:
    from scipy.stats import bootstrap

    with warnings.catch_warnings():  # a resample of one language has no correlation: NaN, reported as such
        warnings.simplefilter("ignore", category=RuntimeWarning)
        warnings.filterwarnings("ignore", message=".*(constant|BCa confidence interval cannot).*")
        return bootstrap(*args, **kwargs)


def cluster_bootstrap(clusters: np.ndarray, statistic: Callable[[np.ndarray], Any], seed: int,
                      n_resamples: int = N_RESAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """95% BCa interval of ``statistic(rows)`` when whole clusters (languages) are resampled with replacement."""
    labels = list(dict.fromkeys(clusters))
    rows = [np.flatnonzero(clusters == c) for c in labels]

    def of_clusters(sample: np.ndarray) -> Any:
        return statistic(np.concatenate([rows[int(i)] for i in sample]))

    res = _quiet_bootstrap((np.arange(len(labels)),), of_clusters, vectorized=False, n_resamples=n_resamples,
                           confidence_level=0.95, method="BCa", rng=np.random.default_rng(seed))
    return _interval(res)


def paired_bootstrap(x: np.ndarray, y: np.ndarray, seed: int,
                     n_resamples: int = N_RESAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """95% BCa intervals of [Spearman, Pearson] of paired points resampled with replacement: cluster_bootstrap when
    each language is one point (one job), vectorized."""
    res = _quiet_bootstrap((np.asarray(x, float), np.asarray(y, float)), spearman_pearson, paired=True,
                           vectorized=True, n_resamples=n_resamples, confidence_level=0.95, method="BCa",
                           rng=np.random.default_rng(seed))
    return _interval(res)


def _finite(ci: tuple[float, float]) -> bool:
    return all(map(math.isfinite, ci))


def too_few(languages: int) -> str:
    return f"too few languages for a CI (n={languages})"


def estimate_text(value: float, ci: tuple[float, float], languages: int, digits: int = 2) -> str:
    """``0.43 [0.21, 0.60]``, or ``0.43, too few languages for a CI (n=5)`` where the CI could not be computed."""
    if not math.isfinite(value):
        return f"n/a ({languages} language(s))"
    if _finite(ci):
        return f"{value:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return f"{value:.{digits}f}, {too_few(languages)}"


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
    scope: str = POOLED  # POOLED, WITHIN, or "per condition: <label>"
    conditions: int = 1  # jobs the points come from

    def sentence(self) -> str:
        return f"{self.label}: ρ = {estimate_text(self.spearman, self.spearman_ci, self.languages)}"


def _usable(df: pd.DataFrame, factors: list[str], metric: str) -> pd.DataFrame:
    return df.dropna(subset=[*factors, metric_of(metric).column])


def _need_languages(usable: pd.DataFrame, what: str) -> None:
    if usable["language"].nunique() < MIN_LANGUAGES:
        raise ValueError(f"{what}: {usable['language'].nunique()} language(s) have a value; a correlation over "
                         f"languages needs at least {MIN_LANGUAGES}")


def correlation(df: pd.DataFrame, factor: str, label: str, seed: int = 0, n_resamples: int = N_RESAMPLES,
                metric: str = "log_ratio") -> Correlation:
    """Spearman and Pearson of retention with ``factor`` over every job's points together: between-condition
    differences included."""
    usable = _usable(df, [factor], metric)
    left_out = sorted(set(df["language"]) - set(usable["language"]))
    _need_languages(usable, label)
    x, y = usable[factor].to_numpy(float), usable[metric_of(metric).column].to_numpy(float)
    lo, hi = cluster_bootstrap(usable["language"].to_numpy(), lambda r: spearman_pearson(x[r], y[r]), seed,
                               n_resamples)
    return Correlation(factor, label, len(usable), usable["language"].nunique(), left_out, spearman(x, y),
                       (float(lo[0]), float(hi[0])), pearson(x, y), (float(lo[1]), float(hi[1])), POOLED,
                       usable["experiment_id"].nunique())


def _within_statistic(languages: np.ndarray, groups: np.ndarray, X: np.ndarray, y: np.ndarray,
                      of_centred: Callable[[np.ndarray, np.ndarray], np.ndarray], width: int) -> Callable:
    """statistic(rows) for cluster_bootstrap: centre X and y within each job of the resample, then ``of_centred``;
    NaN for a resample of one language (no relation across languages)."""
    codes = pd.factorize(languages)[0]

    def statistic(rows: np.ndarray) -> np.ndarray:
        if np.unique(codes[rows]).size < 2:
            return np.full(width, math.nan)
        g = groups[rows]
        return of_centred(centred(X[rows], g), centred(y[rows], g))

    return statistic


def within_correlation(df: pd.DataFrame, factor: str, label: str, seed: int = 0, n_resamples: int = N_RESAMPLES,
                       metric: str = "log_ratio") -> Correlation:
    """Spearman and Pearson of condition-centred retention with the condition-centred factor over all jobs' points:
    the relation inside a compression setting, free of differences between settings."""
    usable = _usable(df, [factor], metric)
    left_out = sorted(set(df["language"]) - set(usable["language"]))
    _need_languages(usable, label)
    groups = pd.factorize(usable["experiment_id"])[0]
    x, y = usable[factor].to_numpy(float), usable[metric_of(metric).column].to_numpy(float)
    xc, yc = centred(x, groups), centred(y, groups)
    with warnings.catch_warnings():  # constant centred values (one language per job): NaN, reported as such
        warnings.simplefilter("ignore")
        rho, r = spearman(xc, yc), pearson(xc, yc)
    statistic = _within_statistic(usable["language"].to_numpy(), groups, x, y, spearman_pearson, 2)
    lo, hi = cluster_bootstrap(usable["language"].to_numpy(), statistic, seed, n_resamples)
    return Correlation(factor, label, len(usable), usable["language"].nunique(), left_out, rho,
                       (float(lo[0]), float(hi[0])), r, (float(lo[1]), float(hi[1])), WITHIN, int(groups.max()) + 1)


def two_way_residuals(values: np.ndarray, groups: np.ndarray, units: np.ndarray) -> np.ndarray:
    """``values`` (points × columns) minus their least-squares fit on one intercept per job (``groups``) and one per
    language (``units``): what varies within a language across jobs beyond what every language of a job shares."""
    design = np.column_stack([np.eye(groups.max() + 1)[groups], np.eye(units.max() + 1)[units]])
    fit = design @ np.linalg.lstsq(design, values, rcond=None)[0]
    out = values - fit
    out[np.abs(out) <= 1e-12 * np.maximum(1.0, np.abs(values).max(0))] = 0.0
    return out


def two_way_correlation(df: pd.DataFrame, factor: str, label: str, seed: int = 0, n_resamples: int = N_RESAMPLES,
                        metric: str = "log_ratio", within: str | None = None) -> Correlation:
    """Spearman and Pearson of retention with ``factor`` after removing job and language fixed effects: does a
    language keep more in the jobs whose mixture is more similar to it, whatever it keeps on average (its script,
    tokens per byte, share) and whatever a job costs every language? Needs a factor that varies within a language
    across jobs (similarity; not the share). ``within`` (a column, e.g. the seed): one language effect per value of
    it, so only jobs that share it are compared within a language. The bootstrap resamples languages (with all their
    rows); a language drawn twice counts as two."""
    usable = _usable(df, [factor], metric)
    left_out = sorted(set(df["language"]) - set(usable["language"]))
    _need_languages(usable, label)
    groups = pd.factorize(usable["experiment_id"])[0]
    languages = pd.factorize(usable["language"])[0]
    codes = languages if within is None else pd.factorize(usable["language"].astype(str) + "\x00"
                                                          + usable[within].astype(str))[0]
    xy = usable[[factor, metric_of(metric).column]].to_numpy(float)

    def statistic(rows: np.ndarray) -> np.ndarray:
        draw = np.zeros(len(rows), dtype=int)  # which draw of its language each row belongs to
        seen: dict[int, int] = {}
        for k, row in enumerate(rows):
            seen[row] = seen.get(row, -1) + 1
            draw[k] = seen[row]
        units = pd.factorize(codes[rows] * len(rows) + draw)[0]
        if np.unique(languages[rows]).size < 2:
            return np.full(2, math.nan)
        res = two_way_residuals(xy[rows], pd.factorize(groups[rows])[0], units)
        return spearman_pearson(res[:, 0], res[:, 1])

    estimate = statistic(np.arange(len(usable)))
    lo, hi = cluster_bootstrap(usable["language"].to_numpy(), statistic, seed, n_resamples)
    return Correlation(factor, label, len(usable), usable["language"].nunique(), left_out, float(estimate[0]),
                       (float(lo[0]), float(hi[0])), float(estimate[1]), (float(lo[1]), float(hi[1])), TWO_WAY,
                       int(groups.max()) + 1)


@dataclass
class ConditionCorrelations:
    """One job's correlations over its languages (one point per language)."""
    label: str
    experiment_id: str
    languages: int
    correlations: list[Correlation]


def per_condition(df: pd.DataFrame, factors: list[tuple[str, str]], seed: int = 0, n_resamples: int = N_RESAMPLES,
                  metric: str = "log_ratio") -> list[ConditionCorrelations]:
    """Per job and factor (column, label): Spearman and Pearson across its languages with a bootstrap CI over them;
    the estimate alone (CI NaN) below MIN_LANGUAGES languages or where the bootstrap has no interval."""
    col = metric_of(metric).column
    labels = condition_labels(df)
    out = []
    for eid, g in df.groupby("experiment_id", sort=False):
        g = g[g[col].notna()]
        corrs = []
        for factor, label in factors:
            u = g[g[factor].notna()]
            x, y = u[factor].to_numpy(float), u[col].to_numpy(float)
            n = u["language"].nunique()
            est = spearman_pearson(x, y) if n >= 2 else np.full(2, math.nan)
            lo = hi = np.full(2, math.nan)
            if n >= MIN_LANGUAGES:
                lo, hi = paired_bootstrap(x, y, seed, n_resamples)
            corrs.append(Correlation(factor, label, len(u), n, sorted(set(g["language"]) - set(u["language"])),
                                     float(est[0]), (float(lo[0]), float(hi[0])), float(est[1]),
                                     (float(lo[1]), float(hi[1])), f"per condition: {labels[eid]}", 1))
        out.append(ConditionCorrelations(labels[eid], str(eid), g["language"].nunique(), corrs))
    return out


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
              n_resamples: int = N_RESAMPLES, metric: str = "log_ratio") -> JointFit:
    """retention = b0 + Σ b_k·factor_k by least squares over the points that have every factor, all jobs pooled
    (between-condition differences included)."""
    usable = _usable(df, factors, metric)
    if usable["language"].nunique() < MIN_LANGUAGES:
        raise ValueError(f"joint fit: {usable['language'].nunique()} language(s) have every factor; it needs at "
                         f"least {MIN_LANGUAGES}")
    X, y = usable[factors].to_numpy(float), usable[metric_of(metric).column].to_numpy(float)
    coef = ols(X, y)
    residual = y - np.column_stack([np.ones(len(y)), X]) @ coef
    r2 = 1 - float(residual @ residual) / float(((y - y.mean()) ** 2).sum())
    zX, zy = (X - X.mean(0)) / X.std(0), (y - y.mean()) / y.std()
    lo, hi = cluster_bootstrap(usable["language"].to_numpy(), lambda r: ols(X[r], y[r]), seed, n_resamples)
    return JointFit(factors, labels, len(usable), coef.tolist(), list(zip(lo.tolist(), hi.tolist())),
                    ols(zX, zy)[1:].tolist(), r2)


@dataclass
class WithinFit:
    """retention = a_job + Σ b_k·factor_k: one intercept per job (fixed effects), slopes shared."""
    factors: list[str]
    labels: list[str]
    n: int
    languages: int
    conditions: int
    slopes: list[float]
    ci: list[tuple[float, float]]
    standardized: list[float]  # per factor: slope with both centred sides z-scored
    r2: float  # within R²: of the centred retention


def _slopes(Xc: np.ndarray, yc: np.ndarray) -> np.ndarray:
    return np.linalg.lstsq(Xc, yc, rcond=None)[0]


def within_fit(df: pd.DataFrame, factors: list[str], labels: list[str], seed: int = 0,
               n_resamples: int = N_RESAMPLES, metric: str = "log_ratio") -> WithinFit:
    """The job fixed-effects fit, as least squares of condition-centred retention on the condition-centred factors
    (the same slopes): how retention moves with the factors inside a compression setting."""
    usable = _usable(df, factors, metric)
    if usable["language"].nunique() < MIN_LANGUAGES:
        raise ValueError(f"within-condition fit: {usable['language'].nunique()} language(s) have every factor; it "
                         f"needs at least {MIN_LANGUAGES}")
    groups = pd.factorize(usable["experiment_id"])[0]
    X, y = usable[factors].to_numpy(float), usable[metric_of(metric).column].to_numpy(float)
    Xc, yc = centred(X, groups), centred(y, groups)
    slopes = _slopes(Xc, yc)
    residual = yc - Xc @ slopes
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = 1 - float(residual @ residual) / float(yc @ yc)
    spread = np.append(Xc.std(0), yc.std())
    standardized = (_slopes(Xc / spread[:-1], yc / spread[-1]) if (spread > 0).all()
                    else np.full(len(factors), math.nan))
    statistic = _within_statistic(usable["language"].to_numpy(), groups, X, y, _slopes, len(factors))
    lo, hi = cluster_bootstrap(usable["language"].to_numpy(), statistic, seed, n_resamples)
    return WithinFit(factors, labels, len(usable), usable["language"].nunique(), int(groups.max()) + 1,
                     slopes.tolist(), list(zip(lo.tolist(), hi.tolist())), standardized.tolist(), r2)


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
                log_share: bool = False, ci: tuple[float, float] | None = None, label_per_language: bool = False,
                metric: str = "log_ratio", per_condition: dict[str, str] | None = None):
    """Retention against one factor *within* conditions: with several jobs, each job's mean retention is subtracted
    (and, for a factor other than the share, its mean factor too), so that the figure shows what the headline
    measures; the line has the within-condition (fixed-effects) slope, and the legend gives the within-condition
    Spearman ρ (with ``ci`` when given) and n. One colour per job, its own ρ from ``per_condition`` (experiment_id ->
    text) when given. With one job the retention is drawn as measured. ``log_share``: the factor is log10 of a
    share, drawn as a share in % on a log axis (not centred: the share of a language is the same in every job).
    ``label_per_language``: one label per language (at its highest point), else one per point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = metric_of(metric)
    usable = _usable(df, [factor], metric)
    left_out = sorted(set(df["language"]) - set(usable["language"]))
    jobs = list(dict.fromkeys(usable["experiment_id"]))
    labels = condition_labels(usable) if not usable.empty else {}
    centre = len(jobs) > 1
    groups = pd.factorize(usable["experiment_id"])[0]
    x, y = usable[factor].to_numpy(float), usable[m.column].to_numpy(float)
    xc, yc = (centred(x, groups), centred(y, groups)) if len(usable) else (x, y)
    shown_x = x if log_share or not centre else xc
    shown_y = yc if centre else y
    colours = plt.get_cmap("tab10" if len(jobs) <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(7.5, 5.6))
    show = (lambda v: 100 * 10 ** np.asarray(v)) if log_share else (lambda v: np.asarray(v))
    notes = per_condition or {}
    many = len(jobs) > 20  # beyond this the legend would outgrow the figure; analysis.md has every job
    handles = []
    for k, eid in enumerate(jobs):
        sel = groups == k
        text = labels[eid] + (f": ρ = {notes[eid]}" if eid in notes else "")
        handles.append(ax.scatter(show(shown_x[sel]), shown_y[sel], s=16, color=colours(k % colours.N), label=text,
                                  alpha=0.85, edgecolors="none", zorder=3))
    languages = usable["language"].nunique()
    if len(usable) >= 3 and np.ptp(x) > 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rho = spearman(xc, yc)
        grid = np.linspace(x.min(), x.max(), 100) if (log_share or not centre) else np.linspace(xc.min(), xc.max(), 100)
        if centre:
            slope = float(xc @ yc / (xc @ xc)) if xc @ xc > 0 else 0.0
            line = slope * (grid - x.mean()) if log_share else slope * grid
            what = "within-condition fit (one intercept per job)"
        else:
            b0, slope = ols(x[:, None], y)
            line = b0 + slope * grid
            what = "least-squares fit"
        interval = "" if ci is None else (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if _finite(ci) else f", {too_few(languages)}")
        stats_text = "\n".join([f"{what}: Spearman ρ{' of job-centred values' if centre else ''} = "
                                 f"{rho:.2f}{interval}",
                                *([CI_RESAMPLES] if ci is not None and _finite(ci) else []),
                                f"n = {len(x)} points, {languages} languages, {len(jobs)} "
                                + ("jobs" if len(jobs) > 1 else "job")])
        handles.insert(0, ax.plot(show(grid), line, color="black", linewidth=1, zorder=2, label=stats_text)[0])
    ax.axhline(0.0, color="0.6", linewidth=0.6, linestyle=":", zorder=1)
    if log_share:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel if log_share or not centre else f"{xlabel}\nminus the job's mean over its languages")
    if centre:
        ax.set_ylabel(f"retention minus the job's mean, {m.unit}\n(retention = {m.definition})")
    else:
        ax.set_ylabel(f"{m.label}\n(0 = nothing lost)")
    named = ": " + ", ".join(left_out) if len(left_out) <= 8 else ""
    ax.set_title(title + (f"\n({len(left_out)} language(s) with no value left out{named})" if left_out else ""),
                 fontsize=9)
    ax.margins(x=0.06, y=0.08)
    fig.tight_layout()
    if handles:  # below the x-axis label, whatever its height: the fit's statistics, then one entry per job
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        to_axes = ax.transAxes.inverted()
        top = to_axes.transform((0.0, ax.xaxis.get_tightbbox(renderer).y0))[1] - 0.02
        fit, dots = (handles[:1], handles[1:]) if len(handles) > len(jobs) else ([], handles)
        if fit:
            legend = ax.legend(handles=fit, fontsize=6.5, loc="upper left", bbox_to_anchor=(0.0, top),
                               frameon=False)
            if many:
                legend.set_title(f"{len(jobs)} jobs, one colour each; each job's ρ is in analysis.md",
                                 prop={"size": 6.5})
            fig.canvas.draw()
            top = to_axes.transform((0.0, legend.get_window_extent(renderer).y0))[1]
        if dots and not many:
            if fit:  # keep the first legend beside the second, unclipped, so that the saved figure includes it
                ax.add_artist(legend)
                legend.set_clip_on(False)
            ax.legend(handles=dots, fontsize=6.5, loc="upper left", bbox_to_anchor=(0.0, top),
                      ncol=1 if len(dots) <= 6 else 2, frameon=False)
    if usable.empty:
        anchors = []
    else:
        points = pd.DataFrame({"x": show(shown_x), "y": shown_y, "language": usable["language"].to_numpy()})
        if label_per_language:
            points = points.loc[points.groupby("language")["y"].idxmax()]
        anchors = [(float(r.x), float(r.y), r.language) for r in points.itertuples()]
    _place_labels(ax, sorted(anchors, key=lambda a: -a[1]))
    if path is not None:
        save_figure(fig, path)
    return fig


SHARE_XLABEL = "training share of the language, % of the model's whole distribution (log scale)"


def plot_share(df: pd.DataFrame, path: Path | None = None, ci: tuple[float, float] | None = None,
               title: str = "Retention vs training share", metric: str = "log_ratio",
               per_condition: dict[str, str] | None = None):
    """The share scatter (also the sweep report's retention.png), within conditions."""
    return plot_factor(df, SHARE, SHARE_XLABEL, title, path, log_share=True, ci=ci, label_per_language=True,
                       metric=metric, per_condition=per_condition)


# ---- one sweep ----

@dataclass
class Analysis:
    status: str
    data: pd.DataFrame
    correlations: list[Correlation]  # pooled across conditions: share, then one per similarity layer
    fits: list[JointFit]  # pooled, one per similarity layer
    sentence: str  # the within-condition headline
    files: list[Path]
    within: list[Correlation] = field(default_factory=list)  # the headline estimates, same order as correlations
    within_fits: list[WithinFit] = field(default_factory=list)
    per_condition: list[ConditionCorrelations] = field(default_factory=list)
    metric: str = "log_ratio"
    two_way: list[Correlation] = field(default_factory=list)  # similarity, job and language fixed effects


def _heatmap_source(jobs: list[Job], index: str) -> tuple[dict[str, Any] | None, float]:
    """The layer record covering the most languages, and the largest disagreement of any other job's matrix with it
    on their common languages (0 when every job probed the same dense model the same way)."""
    records = [j.results.similarity["layers"][index] for j in jobs
               if j.results is not None and (j.results.similarity or {}).get("layers", {}).get(index)]
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


def _cell(value: float, ci: tuple[float, float], languages: int) -> str:
    return estimate_text(value, ci, languages, digits=3)


WITHIN_FIT = "within condition (one intercept per job)"


def analyze(sweep_dir: str | Path, out: str | Path | None = None, seed: int = 0,
            n_resamples: int = N_RESAMPLES, metric: str = "log_ratio") -> Analysis:
    """Collect a sweep directory and write analysis.md, analysis.csv (statistics), analysis_points.csv (one row per
    job and language), the scatters and the similarity heatmaps into out (default <sweep_dir>/analysis).
    ``metric``: what retention is measured in (``METRICS``: "log_ratio", nats per token, or "bpb", bits per byte)."""

    m = metric_of(metric)
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ValueError(f"sweep directory {sweep_dir} does not exist")
    jobs = collect_jobs(sweep_dir)
    status, _ = format_status(jobs, sweep_dir)
    df = retention_frame(jobs, m.name)
    if df.empty:
        raise ValueError(f"sweep directory {sweep_dir} has no finished job (no results.json below it); "
                         "run the sweep first, or give the directory a multirun wrote")
    out = Path(out) if out else sweep_dir / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    models = _models(jobs)
    requested, statistics = {}, []
    for job in jobs:
        record = (job.results.similarity if job.results else None) or {}
        statistics.append(record.get("statistic"))
        for index, layer in record.get("layers", {}).items():
            requested.setdefault(index, layer.get("requested"))
    statistic = next((x for x in statistics if x), None)  # results before analysis.statistic record none
    layers = df.attrs["layers"]
    names = {i: layer_label(i, requested.get(i)) for i in layers}
    factors = [(SHARE, "share")] + [(similarity_column(i), f"similarity ({names[i]})") for i in layers]
    kw = dict(seed=seed, n_resamples=n_resamples, metric=m.name)
    corrs = [correlation(df, f, label, **kw) for f, label in factors]
    within = [within_correlation(df, f, label, **kw) for f, label in factors]
    two_way = [two_way_correlation(df, f, label, **kw) for f, label in factors[1:]]
    pairs = [([SHARE, similarity_column(i)], ["log10 share", f"similarity ({names[i]})"]) for i in layers]
    fits = [joint_fit(df, f, labels, **kw) for f, labels in pairs]
    within_fits = [within_fit(df, f, labels, **kw) for f, labels in pairs]
    conditions = per_condition(df, factors, **kw)

    def notes(k: int) -> dict[str, str]:
        return {c.experiment_id: estimate_text(c.correlations[k].spearman, c.correlations[k].spearman_ci,
                                               c.correlations[k].languages) for c in conditions}

    files = [out / "analysis.md", out / "analysis.csv", out / "analysis_points.csv"]
    plot_share(df, out / "retention_vs_share.png", within[0].spearman_ci,
               title=f"{models}\nretention vs training share, within each condition", metric=m.name,
               per_condition=notes(0))
    files.append(out / "retention_vs_share.png")
    heatmap_notes = []
    for k, (i, c) in enumerate(zip(layers, within[1:]), start=1):
        path = out / f"retention_vs_similarity_layer{i}.png"
        plot_factor(df, similarity_column(i), f"cosine similarity to the job's calibration mixture ({names[i]} input)",
                    f"{models}\nretention vs similarity to the calibration mixture, within each condition", path,
                    ci=c.spearman_ci, metric=m.name, per_condition=notes(k))
        files.append(path)
        record, gap = _heatmap_source(jobs, i)
        if record is not None:
            heat = out / f"similarity_layer{i}.png"
            title = heatmap_title(models, i, requested.get(i), statistic)
            save_figure(plot_heatmap(record["languages"], record["matrix"], title), heat)
            atomic_write(heat.with_suffix(".csv"), matrix_csv(record["languages"], record["matrix"]))
            files += [heat, heat.with_suffix(".csv")]
            heatmap_notes.append(f"- {names[i]}: the largest difference between jobs' matrices on common languages "
                                 f"is {gap:.2e} (the probe is the same in every job).")

    sentence = f"Within a condition (retention in {m.unit}): " + within[0].sentence()
    if len(within) > 1:
        sim = within[1]
        sentence += (f"; similarity: ρ = {estimate_text(sim.spearman, sim.spearman_ci, sim.languages)} (similarity "
                     f"at the input of {names[layers[0]]})")
    points = ["condition", "seed", "experiment_id", "language", "training_share", SHARE, "dense_ppl",
              "compressed_ppl", "log_ratio", RETENTION]
    if METRICS["bpb"].column in df:
        points += [*BPB_COLUMNS, METRICS["bpb"].column]
    points += [similarity_column(i) for i in layers]
    atomic_write(files[2], df[points].to_csv(index=False, float_format="%.10g"))
    table = _statistics_table(within, corrs, within_fits, fits, conditions, m, two_way)
    atomic_write(files[1], table.to_csv(index=False, float_format="%.10g"))
    markdown = _markdown(sweep_dir, status, models, sentence, within, corrs, within_fits, fits, conditions,
                         heatmap_notes, n_resamples, seed, m, files[3:], two_way)
    accuracy = retention_section(jobs)  # only when some language has zero-shot accuracy and perplexity
    if accuracy:
        markdown += accuracy[0]
        files.append(out / "accuracy_retention.csv")
        atomic_write(files[-1], accuracy[1].to_csv(index=False, float_format="%.10g"))
    atomic_write(files[0], markdown)
    return Analysis(status, df, corrs, fits, sentence, files, within, within_fits, conditions, m.name, two_way)


def _ci_columns(ci: tuple[float, float], languages: int) -> dict[str, Any]:
    lo, hi = ci
    return {"ci_low": lo, "ci_high": hi, "note": "" if _finite(ci) else too_few(languages)}


def _statistics_table(within: list[Correlation], corrs: list[Correlation], within_fits: list[WithinFit],
                      fits: list[JointFit], conditions: list[ConditionCorrelations], metric: Metric,
                      two_way: list[Correlation] = ()) -> pd.DataFrame:
    """analysis.csv: one row per estimate; an empty CI with a note where the bootstrap has none."""
    rows = []
    for scope, group in ((WITHIN, within), (POOLED, corrs), (TWO_WAY, two_way)):
        for c in group:
            for stat in ("spearman", "pearson"):
                rows.append({"analysis": f"correlation, {scope}", "factor": c.label, "statistic": stat,
                             "value": getattr(c, stat), **_ci_columns(getattr(c, f"{stat}_ci"), c.languages),
                             "n": c.n, "languages": c.languages, "conditions": c.conditions})
    for f in within_fits:
        name = f"joint fit, {WITHIN_FIT}: retention ({metric.unit}) ~ {' + '.join(f.labels)}"
        common = {"analysis": name, "n": f.n, "languages": f.languages, "conditions": f.conditions}
        for label, value, ci in zip(f.labels, f.slopes, f.ci):
            rows.append({**common, "factor": label, "statistic": "coefficient", "value": value,
                         **_ci_columns(ci, f.languages)})
        for label, value in zip(f.labels, f.standardized):
            rows.append({**common, "factor": label, "statistic": "standardized", "value": value})
        rows.append({**common, "factor": "", "statistic": "within R2", "value": f.r2})
    for w, f in zip(within_fits, fits):  # the same points: every factor present
        name = f"joint fit, {POOLED}: retention ({metric.unit}) ~ {' + '.join(f.labels)}"
        for label, value, ci in zip(["intercept", *f.labels], f.coefficients, f.ci):
            rows.append({"analysis": name, "factor": label, "statistic": "coefficient", "value": value,
                         **_ci_columns(ci, w.languages), "n": f.n, "languages": w.languages,
                         "conditions": w.conditions})
        for label, value in zip(f.labels, f.standardized):
            rows.append({"analysis": name, "factor": label, "statistic": "standardized", "value": value, "n": f.n,
                         "languages": w.languages, "conditions": w.conditions})
        rows.append({"analysis": name, "factor": "", "statistic": "R2", "value": f.r2, "n": f.n,
                     "languages": w.languages, "conditions": w.conditions})
    for cond in conditions:
        for c in cond.correlations:
            for stat in ("spearman", "pearson"):
                rows.append({"analysis": c.scope, "experiment_id": cond.experiment_id, "factor": c.label,
                             "statistic": stat, "value": getattr(c, stat),
                             **_ci_columns(getattr(c, f"{stat}_ci"), c.languages), "n": c.n,
                             "languages": c.languages, "conditions": 1})
    columns = ["analysis", "experiment_id", "factor", "statistic", "value", "ci_low", "ci_high", "note", "n",
               "languages", "conditions"]
    return pd.DataFrame(rows).reindex(columns=columns)


def _markdown(sweep_dir: Path, status: str, models: str, sentence: str, within: list[Correlation],
              corrs: list[Correlation], within_fits: list[WithinFit], fits: list[JointFit],
              conditions: list[ConditionCorrelations], heatmap_notes: list[str], n_resamples: int, seed: int,
              metric: Metric, figures: list[Path], two_way: list[Correlation] = ()) -> str:
    lines = [f"# Retention analysis: {sweep_dir}", "", "```", status, "```", "", f"Model(s): {models}.", "",
             f"**{sentence}**", "",
             f"Each point is one finished job and one evaluated language. Retention = {metric.definition}, in "
             f"{metric.unit} (0 = nothing lost). Share = the language's absolute training share (fraction of the "
             "model's whole distribution), log10. Similarity = cosine of the language's activation vector with the "
             "job's calibration-mixture vector (results.json `similarity`). A condition is one job (one calibration "
             "mixture / compressor setting and seed).", "",
             "*Within condition* (the headline): retention and the factor are centred within each job (the job's "
             "mean over its languages subtracted), then Spearman ρ and Pearson r over all centred points; ρ is the "
             "rank correlation of the centred values (not of ranks within each job). The joint fit within condition "
             "has one intercept per job (job fixed effects; the same slopes as least squares on the centred values). "
             f"*{POOLED[0].upper() + POOLED[1:]}*: the same over the raw points, where a factor whose job means "
             "move with the jobs' mean retention shows a correlation even when no single job has one. "
             f"*{TWO_WAY[0].upper() + TWO_WAY[1:]}* (similarity only; the share does not vary within a language): "
             "retention and similarity with one intercept per job and one per language removed, so what is left is "
             "whether a language keeps more in the jobs whose mixture is more similar to it, whatever that language "
             "keeps on average (its script, tokens per byte, share).", "",
             "95% CIs: BCa bootstrap over languages (scipy.stats.bootstrap, "
             f"{n_resamples} resamples, seed {seed}): a language is resampled with all its jobs, the centring redone "
             "in each resample; within one job each language is one point. Where some resample holds a single "
             "language the bootstrap has no interval, and the estimate is given with \"too few languages for a CI "
             "(n = languages)\".", "",
             "| factor | estimate | points | languages | jobs | left out | Spearman ρ [95% CI] | Pearson r [95% CI] |",
             "|---|---|---:|---:|---:|---|---:|---:|"]
    by_factor = {t.factor: t for t in two_way}
    for w, c in zip(within, corrs):
        for scope, x in ((WITHIN, w), (POOLED, c), (TWO_WAY, by_factor.get(w.factor))):
            if x is None:
                continue
            lines.append(f"| {x.label} | {scope} | {x.n} | {x.languages} | {x.conditions} | "
                         f"{', '.join(x.left_out) or '–'} | {_cell(x.spearman, x.spearman_ci, x.languages)} | "
                         f"{_cell(x.pearson, x.pearson_ci, x.languages)} |")
    if fits:
        lines += ["", f"Joint least-squares fit, retention = b0 + b1·log10(share) + b2·similarity, retention in "
                  f"{metric.unit} (b1 per tenfold share, b2 per unit of cosine); within condition b0 is one "
                  "intercept per job and R² is of the centred retention. Standardized: both sides z-scored, so the "
                  "two slopes compare.", "",
                  "| similarity of | estimate | points | b0 [95% CI] | b1 (log10 share) [95% CI] | "
                  "b2 (similarity) [95% CI] | standardized b1 / b2 | R² |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for w, f in zip(within_fits, fits):
            layer = f.labels[1].removeprefix('similarity (').removesuffix(')')
            cells = [_cell(v, ci, w.languages) for v, ci in zip(w.slopes, w.ci)]
            lines.append(f"| {layer} | {WITHIN_FIT} | {w.n} | one per job | {' | '.join(cells)} | "
                         f"{w.standardized[0]:.3f} / {w.standardized[1]:.3f} | {w.r2:.3f} |")
            cells = [_cell(v, ci, w.languages) for v, ci in zip(f.coefficients, f.ci)]
            lines.append(f"| {layer} | {POOLED} | {f.n} | {' | '.join(cells)} | "
                         f"{f.standardized[0]:.3f} / {f.standardized[1]:.3f} | {f.r2:.3f} |")
    else:
        lines += ["", "No job recorded language similarity (analysis.layers=[]): only the share factor is analysed."]
    if conditions:
        sims = [c.label for c in conditions[0].correlations[1:]]
        lines += ["", "Per condition: each job on its own, correlations across its languages (one point each; 95% "
                  "CI: BCa bootstrap over its languages).", "",
                  "| condition | languages | share ρ [95% CI] | share r [95% CI] | "
                  + " | ".join(f"{s} ρ [95% CI]" for s in sims) + " |",
                  "|---|---:|---:|---:|" + "---:|" * len(sims)]
        for cond in conditions:
            share, *rest = cond.correlations
            count = str(cond.languages) + (f" ({share.languages} with a share)"
                                           if share.languages != cond.languages else "")
            cells = [_cell(share.spearman, share.spearman_ci, share.languages),
                     _cell(share.pearson, share.pearson_ci, share.languages),
                     *(_cell(c.spearman, c.spearman_ci, c.languages) for c in rest)]
            lines.append(f"| {cond.label} | {count} | {' | '.join(cells)} |")
    if heatmap_notes:
        lines += ["", "Similarity heatmaps:", *heatmap_notes]
    lines += ["", "Figures: " + ", ".join(f"`{p.name}`" for p in figures if p.suffix == ".png")
              + " (within conditions: each job's mean retention subtracted when there are several jobs).", ""]
    return "\n".join(lines)
