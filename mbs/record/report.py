"""A sweep's results in one place: every job's results.json → a per-language table (rows: languages with their training
share; columns: conditions; seeds as mean ± 95% CI, t-distribution) in Markdown and CSV, and plots.

A *condition* is a job's overrides minus its seed and minus keys that do not change results (mbs.sweep.NON_RESULT_KEYS),
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
from mbs.record.results import LOW_RESOURCE_SHARE
from mbs.sweep import NON_RESULT_KEYS, Job, collect_jobs, format_status

SEED_KEYS = ("seed",)
METRICS = ("dense_ppl", "compressed_ppl", "ratio", "log_ratio", "retention")


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _counts_for_condition(override: str) -> bool:
    key = _key(override)
    return key not in SEED_KEYS and not any(key == k or key.startswith(k + ".") or key.startswith(k + "/")
                                            for k in NON_RESULT_KEYS)


def conditions(jobs: list[Job]) -> dict[int, str]:
    """Label of each job (by index): its condition-relevant overrides that are not shared by every job."""
    kept = [[o for o in job.overrides if _counts_for_condition(o)] for job in jobs]
    common = set.intersection(*(set(k) for k in kept)) if kept else set()
    return {i: " ".join(o for o in k if o not in common) or "all" for i, k in enumerate(kept)}


def frame(jobs: list[Job]) -> pd.DataFrame:
    """One row per finished job and language (a result reached by two jobs, e.g. a resumed one, counts once)."""
    labels = conditions(jobs)
    rows, seen = [], set()
    for i, job in enumerate(jobs):
        if job.results is None:
            continue
        res = job.results
        key = res.get("experiment_id") or str(job.results_path)
        if key in seen:
            continue
        seen.add(key)
        for r in res["languages"]:
            rows.append({"condition": labels[i], "seed": res["config"].get("seed"), "experiment_id": key,
                         "language": r["language"], "share": r["share"], "dense_ppl": r["dense_ppl"],
                         "compressed_ppl": r["compressed_ppl"], "ratio": r["ratio"], "log_ratio": r["log_ratio"],
                         "retention": r["dense_ppl"] / r["compressed_ppl"],
                         "sparsity": res["compression"]["sparsity"]})
    return pd.DataFrame(rows)


def ci95(values: pd.Series) -> float:
    """Half-width of the 95% confidence interval of the mean (Student t, n-1 dof); NaN for one value."""
    from scipy.stats import t

    n = int(values.count())
    return float(t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """Per condition and language: n (seeds), and mean and ci95 of each metric. Languages ordered by share."""
    out = []
    order = list(dict.fromkeys(df["condition"]))
    for (cond, lang), g in df.groupby(["condition", "language"], sort=False):
        row: dict[str, Any] = {"condition": cond, "language": lang, "share": g["share"].iloc[0], "n": len(g)}
        for m in METRICS + ("sparsity",):
            row[m] = g[m].mean()
            row[f"{m}_ci95"] = ci95(g[m])
        out.append(row)
    agg = pd.DataFrame(out)
    agg["_c"] = agg["condition"].map(order.index)
    return agg.sort_values(["_c", "share", "language"], ascending=[True, False, True]).drop(columns="_c")


def condition_summary(df: pd.DataFrame, low_resource_share: float = LOW_RESOURCE_SHARE) -> pd.DataFrame:
    """Per condition, over seeds: mean/median log ratio, mean over low-resource languages (share < threshold),
    achieved sparsity; each a mean with ci95."""
    per_run = []
    for (cond, exp), g in df.groupby(["condition", "experiment_id"], sort=False):
        low = g[g["share"] < low_resource_share]
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
        out.append(row)
    return pd.DataFrame(out)


def _cell(mean: float, ci: float, fmt: str) -> str:
    if isinstance(mean, float) and math.isnan(mean):
        return "–"
    return format(mean, fmt) + ("" if math.isnan(ci) else " ± " + format(ci, fmt))


def wide_table(agg: pd.DataFrame) -> pd.DataFrame:
    """Rows: languages (by share); columns: per condition the compressed ppl, ratio, their ci95 and n."""
    langs = agg.drop_duplicates("language").sort_values(["share", "language"], ascending=[False, True])
    table = langs[["language", "share"]].reset_index(drop=True)
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
    head = ["language", "share %"] + (["dense ppl"] if show_dense else []) + conds
    lines = ["| " + " | ".join(head) + " |", "|---|---:|" + ("---:|" if show_dense else "") + "---:|" * len(conds)]
    for _, r in wide.iterrows():
        cells = [r["language"], f"{100 * r['share']:.3f}"] + ([f"{r['dense_ppl']:.2f}"] if show_dense else [])
        for c in conds:
            ppl = _cell(r[f"{c}: compressed_ppl"], r[f"{c}: compressed_ppl_ci95"], ".2f")
            ratio = _cell(r[f"{c}: ratio"], r[f"{c}: ratio_ci95"], ".3f")
            cells.append(f"{ppl} (×{ratio})")
        lines.append("| " + " | ".join(cells) + " |")
    s = summ.set_index("condition")
    pad = [""] * (2 if show_dense else 1)
    for key, name in (("mean_log_ratio", "mean log ratio"), ("median_log_ratio", "median log ratio"),
                      ("low_resource_mean_log_ratio", f"low-resource mean log ratio (share < {100 * low_resource_share:g}%)"),
                      ("sparsity", "achieved sparsity"), ("n", "runs (seeds)")):
        vals = [str(int(s.loc[c, key])) if key == "n" else _cell(s.loc[c, key], s.loc[c, f"{key}_ci95"], ".4f")
                for c in conds]
        lines.append("| " + " | ".join([f"**{name}**"] + pad + vals) + " |")
    return "\n".join(lines) + "\n"


def plot_degradation(agg: pd.DataFrame, path: Path | None = None, title: str = "Perplexity ratio by language"):
    """Grouped bars from 1 (no change): compressed/dense perplexity per language (ordered by training share) and
    condition, with 95% CIs over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    langs = list(agg.drop_duplicates("language").sort_values(["share", "language"], ascending=[False, True])["language"])
    conds = list(dict.fromkeys(agg["condition"]))
    x = np.arange(len(langs))
    width = 0.8 / max(1, len(conds))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(langs) * max(1, len(conds)) ** 0.5 + 2), 4.2))
    for k, cond in enumerate(conds):
        g = agg[agg["condition"] == cond].set_index("language").reindex(langs)
        err = g["ratio_ci95"].fillna(0).to_numpy()
        ax.bar(x + (k - (len(conds) - 1) / 2) * width, g["ratio"].to_numpy() - 1.0, width, bottom=1.0,
               yerr=err if err.any() else None, label=cond, capsize=2)  # bars grow from 1 = no change
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(x, langs, rotation=60, ha="right")
    ax.set_ylabel("perplexity ratio (compressed / dense)")
    ax.set_xlabel("language (by training share, descending)")
    ax.set_title(title)
    if len(conds) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_retention(agg: pd.DataFrame, path: Path) -> None:
    """Retention (dense/compressed perplexity; 1 = nothing lost) against training share, log scale. Languages with no
    stated share cannot go on a log axis: they are left out and counted in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    shown = agg[agg["share"] > 0]
    for cond, g in shown.groupby("condition", sort=False):
        g = g.sort_values("share")
        ax.errorbar(100 * g["share"], g["retention"], yerr=g["retention_ci95"].fillna(0), marker="o", ms=4,
                    capsize=2, label=cond)
        for _, r in g.iterrows():
            ax.annotate(r["language"], (100 * r["share"], r["retention"]), fontsize=6, alpha=0.7)
    ax.set_xscale("log")
    ax.set_xlabel("training share % (log scale)")
    ax.set_ylabel("retention (dense ppl / compressed ppl)")
    left_out = sorted(set(agg.loc[agg["share"] <= 0, "language"]))
    ax.set_title("Retention vs training share" + (f" ({len(left_out)} languages with no share left out)"
                                                  if left_out else ""))
    if shown["condition"].nunique() > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


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
          "Share: the model's training share renormalised over the evaluated languages.\n\n"
          + markdown(agg, summ, low_resource_share))
    from mbs.record.zeroshot_table import zeroshot_section

    zeroshot = zeroshot_section(jobs, conditions(jobs))  # its own section, only when jobs ran eval.tasks
    md += zeroshot[0] if zeroshot else ""
    files = [out / "report.md", out / "report.csv", out / "report_long.csv", out / "summary.csv",
             out / "degradation.png", out / "retention.png"]
    atomic_write(files[0], md)
    atomic_write(files[1], wide_table(agg).to_csv(index=False, float_format="%.10g"))
    atomic_write(files[2], agg.to_csv(index=False, float_format="%.10g"))
    atomic_write(files[3], summ.to_csv(index=False, float_format="%.10g"))
    plot_degradation(agg, files[4])
    plot_retention(agg, files[5])
    if zeroshot:
        files.append(out / "zeroshot.csv")
        atomic_write(files[-1], zeroshot[1].to_csv(index=False, float_format="%.10g"))
    return Report(status, complete, jobs, df, agg, files)
