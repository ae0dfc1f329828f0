"""A sweep's results in one place: every job's results.json → a per-language table (rows: languages with their training
share; columns: conditions; seeds as mean ± 95% CI, t-distribution) in Markdown and CSV, and plots.

A *condition* is a job's overrides minus its seed and minus keys that do not change results (mbs.fingerprint.NON_RESULT_KEYS),
labelled by the overrides that differ between jobs. Works on a partial sweep: it says which jobs are missing or failed.
Every step is a function (collect → frame → aggregate → tables/plots) so notebooks can reuse them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mbs.atomic import atomic_write
from mbs.record.figures import save_figure
from mbs.record.results import LOW_RESOURCE_SHARE, format_share
from mbs.analyze.retention import plot_share, retention_frame_of
from mbs.record.frame import ci95, conditions, frame
from mbs.record.jobs import Job, collect_jobs, format_status
from mbs.record.accuracy_retention import retention_section
from mbs.record.zeroshot_table import zeroshot_section

METRICS = ("dense_ppl", "compressed_ppl", "ratio", "log_ratio", "retention")

def language_order(agg: pd.DataFrame) -> list[str]:
    """Languages by training share, largest first; languages with no stated share last."""
    langs = agg.drop_duplicates("language")
    return list(langs.sort_values(["training_share_pct", "language"], ascending=[False, True],
                                  na_position="last")["language"])


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """Per condition and language: n (seeds), and mean and ci95 of each metric. Languages ordered by training share."""
    out = []
    order = list(dict.fromkeys(df["condition"]))
    described = [c for c in ("model", "method", "sampler", "dense_weights") if c in df]
    for (cond, lang), g in df.groupby(["condition", "language"], sort=False):
        row: dict[str, Any] = {"condition": cond, "language": lang, "training_share_pct": g["training_share_pct"].iloc[0],
                               "n": len(g), **{c: g[c].iloc[0] for c in described}}
        for m in METRICS + ("sparsity",):
            row[m] = g[m].mean()
            row[f"{m}_ci95"] = ci95(g[m])
        out.append(row)
    agg = pd.DataFrame(out)
    agg["_c"] = agg["condition"].map(order.index)
    agg["_l"] = agg["language"].map(language_order(agg).index)
    return agg.sort_values(["_c", "_l"]).drop(columns=["_c", "_l"]).reset_index(drop=True)


def condition_summary(df: pd.DataFrame, low_resource_share: float = LOW_RESOURCE_SHARE) -> pd.DataFrame:
    """Per condition, over seeds: mean/median log ratio, the geometric-mean ratio (exp of the mean log ratio), the
    mean log ratio over low-resource languages (training share below the threshold, a fraction of the model's
    distribution), achieved sparsity; each a mean over runs with its ci95."""
    per_run = []
    for (cond, exp), g in df.groupby(["condition", "experiment_id"], sort=False):
        low = g[g["training_share_pct"] < 100 * low_resource_share]
        per_run.append({"condition": cond, "mean_log_ratio": g["log_ratio"].mean(),
                        "median_log_ratio": g["log_ratio"].median(),
                        "low_resource_mean_log_ratio": low["log_ratio"].mean() if len(low) else math.nan,
                        "sparsity": g["sparsity"].iloc[0]})
    runs = pd.DataFrame(per_run)
    out = []
    for cond, g in runs.groupby("condition", sort=False):
        row: dict[str, Any] = {"condition": cond, "n": len(g)}
        for m in ("mean_log_ratio", "median_log_ratio", "low_resource_mean_log_ratio", "sparsity"):
            row[m], row[f"{m}_ci95"] = g[m].mean(), ci95(g[m])
        row["geomean_ratio"] = math.exp(row["mean_log_ratio"])
        row["low_resource_geomean_ratio"] = math.exp(row["low_resource_mean_log_ratio"])
        out.append(row)
    return pd.DataFrame(out)


def _cell(mean: float, ci: float, fmt: str) -> str:
    if isinstance(mean, float) and math.isnan(mean):
        return "–"
    return format(mean, fmt) + ("" if math.isnan(ci) else " ± " + format(ci, fmt))


def _geomean_cell(mean_log: float, ci: float) -> str:
    """×exp(mean log ratio), with the 95% CI of the mean log ratio mapped through exp (asymmetric)."""
    if math.isnan(mean_log):
        return "–"
    out = f"×{math.exp(mean_log):.3f}"
    return out if math.isnan(ci) else out + f" [{math.exp(mean_log - ci):.3f}, {math.exp(mean_log + ci):.3f}]"


def wide_table(agg: pd.DataFrame) -> pd.DataFrame:
    """Rows: languages (by training share); columns: per condition the compressed ppl, ratio, their ci95 and n."""
    order = language_order(agg)
    langs = agg.drop_duplicates("language").set_index("language").loc[order].reset_index()
    table = langs[["language", "training_share_pct"]].reset_index(drop=True)
    for cond, g in agg.groupby("condition", sort=False):
        g = g.set_index("language")
        for col in ("compressed_ppl", "compressed_ppl_ci95", "ratio", "ratio_ci95", "n"):
            table[f"{cond}: {col}"] = table["language"].map(g[col])
    dense = agg.groupby("language")["dense_ppl"].agg(lambda s: s.iloc[0] if s.nunique() == 1 else math.nan)
    table.insert(2, "dense_ppl", table["language"].map(dense))  # NaN where conditions differ in the dense model
    return table


def markdown(agg: pd.DataFrame, summ: pd.DataFrame, low_resource_share: float) -> str:
    conds = list(dict.fromkeys(agg["condition"]))
    wide = wide_table(agg)
    show_dense = wide["dense_ppl"].notna().all()
    head = ["language", "training share %"] + (["dense ppl"] if show_dense else []) + conds
    lines = ["| " + " | ".join(head) + " |", "|---|---:|" + ("---:|" if show_dense else "") + "---:|" * len(conds)]
    for _, r in wide.iterrows():
        share = r["training_share_pct"]
        cells = [r["language"], format_share(None if math.isnan(share) else share / 100)]
        cells += [f"{r['dense_ppl']:.2f}"] if show_dense else []
        for c in conds:
            ppl = _cell(r[f"{c}: compressed_ppl"], r[f"{c}: compressed_ppl_ci95"], ".2f")
            ratio = _cell(r[f"{c}: ratio"], r[f"{c}: ratio_ci95"], ".3f")
            cells.append(f"{ppl} (×{ratio})")
        lines.append("| " + " | ".join(cells) + " |")
    s = summ.set_index("condition")
    pad = [""] * (2 if show_dense else 1)
    low = f"training share < {format_share(low_resource_share)}%"
    for key, name in (("geomean_ratio", "geometric-mean ratio"), ("mean_log_ratio", "mean log ratio"),
                      ("median_log_ratio", "median log ratio"),
                      ("low_resource_geomean_ratio", f"low-resource geometric-mean ratio ({low})"),
                      ("low_resource_mean_log_ratio", f"low-resource mean log ratio ({low})"),
                      ("sparsity", "achieved sparsity"), ("n", "runs (seeds)")):
        if key == "n":
            vals = [str(int(s.loc[c, key])) for c in conds]
        elif key.endswith("geomean_ratio"):
            log_key = key.replace("geomean_ratio", "mean_log_ratio")
            vals = [_geomean_cell(s.loc[c, log_key], s.loc[c, f"{log_key}_ci95"]) for c in conds]
        else:
            vals = [_cell(s.loc[c, key], s.loc[c, f"{key}_ci95"], ".4f") for c in conds]
        lines.append("| " + " | ".join([f"**{name}**"] + pad + vals) + " |")
    return "\n".join(lines) + "\n"


MAX_BAR_CONDITIONS = 4  # beyond this many conditions the degradation figure is a heatmap


def _common(agg: pd.DataFrame, column: str) -> str:
    values = list(dict.fromkeys(agg[column])) if column in agg else []
    return str(values[0]) if len(values) == 1 and values[0] else ""


def figure_title(agg: pd.DataFrame) -> str:
    """What every condition shares (model, method with its sparsity, sampler), and a note when the 'dense' model is
    itself a de-quantized GGUF file."""
    parts = [p for p in (_common(agg, "model"), _common(agg, "method"), _common(agg, "sampler")) if p]
    title = " · ".join(parts) or "Perplexity ratio by language"
    if _common(agg, "dense_weights"):
        title += f"\n(dense = {_common(agg, 'dense_weights')} weights)"
    return title


def _share_label(language: str, share_pct: float) -> str:
    """``language`` over its training share (two significant figures, to fit under a bar)."""
    return f"{language}\n{'–' if math.isnan(share_pct) else format(share_pct, '.2g') + '%'}"


def _geomeans(agg: pd.DataFrame, low_resource_share: float) -> dict[str, pd.Series]:
    """Per condition, the geometric mean of the ratio over all languages and over the low-resource ones."""
    low = agg[agg["training_share_pct"] < 100 * low_resource_share]
    out = {"all": agg.groupby("condition", sort=False)["log_ratio"].mean().map(math.exp)}
    if len(low) and low["language"].nunique() < agg["language"].nunique():
        out[f"share\n<{format_share(low_resource_share)}%"] = (
            low.groupby("condition", sort=False)["log_ratio"].mean().map(math.exp))
    return out


def _ratio_axis(ax, lo: float, hi: float) -> None:
    """A log ratio axis from lo to hi labelled ×1, ×2, ×5, …; over less than a factor 4 (e.g. 4-bit GPTQ at ×1.1-1.3)
    decades give no tick, so ticks are then placed at round linear steps."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter, NullLocator

    ax.set_ylim(lo, hi)
    if hi / lo >= 4:
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    else:  # the log scale's minor ticks would fall between the linear labels unlabelled (e.g. at ×0.9)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=8, steps=[1, 2, 2.5, 5, 10]))
        ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"×{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def plot_degradation(agg: pd.DataFrame, path: Path | None = None, title: str | None = None,
                     low_resource_share: float = LOW_RESOURCE_SHARE):
    """Perplexity ratio (compressed / dense, log scale) per language, languages ordered by training share (shown
    under each label), plus the geometric mean per condition over all and over low-resource languages. Grouped
    bars for up to MAX_BAR_CONDITIONS conditions (with 95% CIs over seeds, taken on the log ratio), a language ×
    condition heatmap beyond that. Several seeds: the geometric mean of their ratios."""
    import matplotlib

    matplotlib.use("Agg")
    conds = list(dict.fromkeys(agg["condition"]))
    title = title or figure_title(agg)
    if len(conds) > MAX_BAR_CONDITIONS:
        fig = _degradation_heatmap(agg, conds, title, low_resource_share)
    else:
        fig = _degradation_bars(agg, conds, title, low_resource_share)
    if path is not None:
        save_figure(fig, path)
    return fig


def _degradation_bars(agg: pd.DataFrame, conds: list[str], title: str, low_resource_share: float):
    import matplotlib.pyplot as plt
    import numpy as np

    langs = language_order(agg)
    means = _geomeans(agg, low_resource_share)
    n_groups = len(langs) + len(means)
    x = np.concatenate([np.arange(len(langs)), len(langs) + 0.7 + 1.2 * np.arange(len(means))])
    width = 0.8 / len(conds)
    fig, ax = plt.subplots(figsize=(min(12.0, max(5.5, 0.34 * n_groups * max(1.0, len(conds) ** 0.5) + 1.6)), 4.0))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    top = 1.0
    for k, cond in enumerate(conds):
        g = agg[agg["condition"] == cond].set_index("language").reindex(langs)
        values = np.concatenate([np.exp(g["log_ratio"].to_numpy()), [m.get(cond, np.nan) for m in means.values()]])
        ci = np.concatenate([g["log_ratio_ci95"].fillna(0).to_numpy(), np.zeros(len(means))])
        err = np.array([values - values * np.exp(-ci), values * np.exp(ci) - values])
        pos = x + (k - (len(conds) - 1) / 2) * width
        ax.bar(pos, values - 1.0, width, bottom=1.0, color=colors[k % len(colors)], label=cond)
        if ci.any():  # over seeds, per language (the geometric-mean groups carry no interval)
            n = len(langs)
            ax.errorbar(pos[:n], values[:n], yerr=err[:, :n], fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
        for px, v in zip(pos[len(langs):], values[len(langs):]):  # the geometric means carry their value
            if not np.isnan(v):
                ax.annotate(f"×{v:.3g}", (px, max(v, 1.0)), xytext=(0, 2), textcoords="offset points", ha="center",
                            va="bottom", fontsize=6.5, rotation=90 if len(conds) > 2 else 0)
        top = max(top, np.nanmax(values * np.exp(ci)))
    ax.set_yscale("log")
    lo = min(1.0, float(np.nanmin(np.exp(agg["log_ratio"] - agg["log_ratio_ci95"].fillna(0))))) / 1.01
    _ratio_axis(ax, lo, top * (top / lo) ** 0.3)  # headroom for the legend and the geometric-mean labels
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axvline(len(langs) - 0.2, color="grey", linewidth=0.8, linestyle=":")
    labels = [_share_label(lang, agg.loc[agg["language"] == lang, "training_share_pct"].iloc[0]) for lang in langs]
    ax.set_xticks(x, labels + list(means), fontsize=6.5)
    ax.text(float(np.mean(x[len(langs):])), 0.98, "geometric\nmean", transform=ax.get_xaxis_transform(),
            ha="center", va="top", fontsize=7)
    ax.set_xlim(x[0] - 0.6, x[-1] + 0.6)
    ax.set_ylabel("perplexity ratio, compressed / dense\n(log scale)", fontsize=8)
    ax.set_xlabel("language and training share (model's distribution), by share", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", which="major", linewidth=0.4, alpha=0.5)
    ax.set_axisbelow(True)
    if len(conds) > 1:
        ax.legend(fontsize=7, frameon=False, loc="upper left", ncols=min(len(conds), 2))
    fig.tight_layout()
    return fig


def _degradation_heatmap(agg: pd.DataFrame, conds: list[str], title: str, low_resource_share: float):
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import Normalize, TwoSlopeNorm

    langs = language_order(agg)
    means = _geomeans(agg, low_resource_share)
    grid = agg.pivot_table(index="condition", columns="language", values="log_ratio", sort=False).reindex(
        index=conds, columns=langs)
    for name, m in means.items():
        grid[name] = m.reindex(conds).map(math.log)
    values = grid.to_numpy(dtype=float)
    hi, lo = max(float(np.nanmax(values)), 1e-6), float(np.nanmin(values))
    if lo < 0:  # some language improved: diverging around ×1
        norm, cmap = TwoSlopeNorm(vcenter=0.0, vmin=lo, vmax=hi), "RdBu_r"
    else:
        norm, cmap = Normalize(vmin=0.0, vmax=hi), "OrRd"
    cols = values.shape[1]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * cols + 2.5), max(2.4, 0.36 * len(conds) + 1.6)))
    image = ax.imshow(values, cmap=cmap, norm=norm, aspect="auto")
    for (i, j), v in np.ndenumerate(values):
        if not np.isnan(v):
            ratio = math.exp(v)
            ax.text(j, i, f"{ratio:.3g}", ha="center", va="center", fontsize=6,
                    color="white" if (norm(v) > 0.65 or (lo < 0 and norm(v) < 0.2)) else "black")
    ax.axvline(len(langs) - 0.5, color="black", linewidth=1.2)
    labels = [_share_label(lang, agg.loc[agg["language"] == lang, "training_share_pct"].iloc[0]) for lang in langs]
    ax.set_xticks(range(cols), labels + [f"geo.\nmean\n{n}" for n in means], fontsize=6.5)
    ax.set_yticks(range(len(conds)), conds, fontsize=7)
    ax.set_xlabel("language and training share (model's distribution), by share", fontsize=8)
    ax.set_title(title, fontsize=9)
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    ticks: list[float] = []
    for t in (0.5, 0.8, 1, 1.5, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000):
        if norm.vmin <= math.log(t) <= norm.vmax and (not ticks or math.log(t / ticks[-1]) >= 0.1 * (norm.vmax - norm.vmin)):
            ticks.append(t)
    bar.set_ticks([math.log(t) for t in ticks], labels=[f"×{t:g}" for t in ticks])
    bar.set_label("perplexity ratio, compressed / dense (log scale)", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    fig.tight_layout()
    return fig


def plot_retention(df: pd.DataFrame, path: Path) -> None:
    """Retention (−log ppl ratio) against the absolute training share, one point per job and language: the share
    scatter of ``mbs.analyze`` (one piece of code for both; languages with no share are left out and named)."""
    plot_share(retention_frame_of(df), path)


def runs_section(jobs: list[Job], sweep_dir: Path) -> str:
    """Which runs the report came from: per job its directory, status, condition, seed, experiment id and the git
    commit it ran at (``+`` when that checkout had uncommitted changes), so a reader can trace every number."""
    labels = conditions(jobs)
    lines = ["## Runs\n", "| job directory | status | condition | seed | experiment id | commit |",
             "|---|---|---|---:|---|---|"]
    for i, job in enumerate(jobs):
        where = "–"
        if job.directory is not None:
            where = str(job.directory.relative_to(sweep_dir) if job.directory.is_relative_to(sweep_dir)
                        else job.directory)
        res = job.results
        seed = str(res.config.get("seed", "")) if res is not None else ""
        commit = ""
        if res is not None and (res.provenance or {}).get("commit"):
            commit = res.provenance["commit"][:10] + ("+" if res.provenance.get("uncommitted_changes") else "")
        lines.append(f"| `{where}` | {job.status} | {labels[i]} | {seed} | {job.experiment_id or '–'} | "
                     f"{commit or '–'} |")
    return "\n".join(lines) + "\n"


FIGURES = ("## Figures\n\n"
           "Perplexity ratio by language (compressed / dense, log scale; languages by training share):\n\n"
           "![Perplexity ratio by language](degradation.png)\n\n"
           "Retention (dense / compressed perplexity) against training share, one point per run and language:\n\n"
           "![Retention against training share](retention.png)\n\n")


@dataclass
class Report:
    status: str
    complete: bool
    jobs: list[Job]
    data: pd.DataFrame
    aggregated: pd.DataFrame | None
    files: list[Path]


def build_report(sweep_dir: str | Path, out: str | Path | None = None,
                 low_resource_share: float = LOW_RESOURCE_SHARE) -> Report:
    """Collect a sweep directory and write report.md, report.csv (wide), report_long.csv and the plots into out
    (default <sweep_dir>/report)."""
    sweep_dir = Path(sweep_dir)
    out = Path(out) if out else sweep_dir / "report"
    jobs = collect_jobs(sweep_dir)
    status, complete = format_status(jobs, sweep_dir)
    df = frame(jobs)
    if df.empty:
        return Report(status, complete, jobs, df, None, [])
    out.mkdir(parents=True, exist_ok=True)
    agg = aggregate(df)
    summ = condition_summary(df, low_resource_share)
    md = (f"# Sweep report: {sweep_dir}\n\n```\n{status}\n```\n\n"
          "Cells: compressed perplexity (×ratio to dense); with several seeds, mean ± 95% CI (t-distribution). "
          "Training share: the language's share of the model's whole training distribution, in percent. "
          "Ratio: compressed / dense perplexity; log ratio: its natural log; geometric-mean ratio: exp of the mean "
          "log ratio over languages.\n\n"
          + markdown(agg, summ, low_resource_share) + "\n" + FIGURES)
    zeroshot = zeroshot_section(jobs, conditions(jobs))  # its own section, only when jobs ran eval.tasks
    accuracy = retention_section(jobs)  # only when some language has zero-shot accuracy and perplexity
    md += (zeroshot[0] + "\n" if zeroshot else "") + (accuracy[0] + "\n" if accuracy else "") \
        + runs_section(jobs, sweep_dir)
    files = [out / "report.md", out / "report.csv", out / "report_long.csv", out / "summary.csv",
             out / "degradation.png", out / "retention.png"]
    atomic_write(files[0], md)
    atomic_write(files[1], wide_table(agg).to_csv(index=False, float_format="%.10g"))
    atomic_write(files[2], agg.to_csv(index=False, float_format="%.10g"))
    atomic_write(files[3], summ.to_csv(index=False, float_format="%.10g"))
    plot_degradation(agg, files[4], low_resource_share=low_resource_share)
    plot_retention(df, files[5])
    if zeroshot:
        files.append(out / "zeroshot.csv")
        atomic_write(files[-1], zeroshot[1].to_csv(index=False, float_format="%.10g"))
    if accuracy:
        files.append(out / "accuracy_retention.csv")
        atomic_write(files[-1], accuracy[1].to_csv(index=False, float_format="%.10g"))
    return Report(status, complete, jobs, df, agg, files)
