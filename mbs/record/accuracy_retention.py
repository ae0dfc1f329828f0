"""Accuracy retention beside perplexity retention, per language, for a sweep whose jobs ran zero-shot tasks in the
evaluated languages (eval.suites, udhr_mc, or per-language tasks of eval.tasks): target-language calibration can keep
perplexity yet lose downstream accuracy (Kurz et al., TACL 2026), so the two are shown side by side, with their
correlation across languages. Used by the sweep report (mbs/record/report.py) and ``mbs.analyze``.

Per job and language: accuracy = the mean over the language's tasks (mbs.evaluate.suites.task_language; groups such
as ``global_mmlu_full_<code>`` count as one task, tasks of no one language are left out) of each task's primary
metric (``PRIMARY``: acc, else exact match); accuracy retention = compressed / dense accuracy; perplexity retention
= dense / compressed perplexity. Both are 1 when nothing is lost and below 1 when the compressed model is worse.
Per condition (several seeds averaged per language), Spearman ρ and Pearson r of the two across its languages,
with n the number of languages that have both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mbs.evaluate.suites import task_language
from mbs.record.frame import conditions, frame
from mbs.record.jobs import Job
from mbs.record.zeroshot_table import zeroshot_frame

PRIMARY = ("acc", "exact_match,flexible-extract", "exact_match")
COLUMNS = ["condition", "language", "jobs", "tasks", "dense_accuracy", "compressed_accuracy", "accuracy_retention",
           "perplexity_retention"]


def _primary(metrics: set[str]) -> str | None:
    return next((m for m in PRIMARY if m in metrics), None)


def language_accuracy(jobs: list[Job], labels: dict[int, str] | None = None) -> pd.DataFrame:
    """One row per job and language with zero-shot tasks: the mean dense and compressed accuracy over its tasks."""
    labels = conditions(jobs) if labels is None else labels
    df = zeroshot_frame(jobs, labels)
    if df.empty:
        return pd.DataFrame(columns=["condition", "experiment_id", "language", "tasks", "dense_accuracy",
                                     "compressed_accuracy"])
    df = df.assign(language=df["task"].map(task_language)).dropna(subset=["language"])
    primary = df.groupby("task")["metric"].agg(lambda m: _primary(set(m)))
    df = df[df["metric"] == df["task"].map(primary)]
    return (df.groupby(["condition", "experiment_id", "language"], sort=False)
              .agg(tasks=("task", "nunique"), dense_accuracy=("dense", "mean"),
                   compressed_accuracy=("compressed", "mean")).reset_index())


def retention_by_language(jobs: list[Job]) -> pd.DataFrame:
    """Per condition and language that has both: accuracy and perplexity retention (jobs of a condition averaged)."""
    acc = language_accuracy(jobs)
    ppl = frame(jobs)
    if acc.empty or ppl.empty:
        return pd.DataFrame(columns=COLUMNS)
    both = acc.merge(ppl[["experiment_id", "language", "retention"]], on=["experiment_id", "language"])
    both["accuracy_retention"] = both["compressed_accuracy"] / both["dense_accuracy"]
    out = (both.groupby(["condition", "language"], sort=False)
               .agg(jobs=("experiment_id", "nunique"), tasks=("tasks", "max"),
                    dense_accuracy=("dense_accuracy", "mean"), compressed_accuracy=("compressed_accuracy", "mean"),
                    accuracy_retention=("accuracy_retention", "mean"), perplexity_retention=("retention", "mean"))
               .reset_index())
    return out[COLUMNS]


@dataclass(frozen=True)
class RetentionCorrelation:
    condition: str
    n: int  # languages with both retentions (finite)
    spearman: float  # NaN below 3 languages or with a constant retention
    pearson: float


def correlations(df: pd.DataFrame) -> list[RetentionCorrelation]:
    """Per condition, the correlation of accuracy retention with perplexity retention across its languages."""
    from scipy import stats

    out = []
    for condition, g in df.groupby("condition", sort=False):
        g = g[np.isfinite(g["accuracy_retention"]) & np.isfinite(g["perplexity_retention"])]
        x, y = g["perplexity_retention"].to_numpy(float), g["accuracy_retention"].to_numpy(float)
        defined = len(g) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0
        out.append(RetentionCorrelation(str(condition), len(g),
                                        float(stats.spearmanr(x, y)[0]) if defined else math.nan,
                                        float(stats.pearsonr(x, y)[0]) if defined else math.nan))
    return out


def correlation_sentence(c: RetentionCorrelation) -> str:
    if math.isnan(c.spearman):
        why = "fewer than 3 languages" if c.n < 3 else "a retention that does not vary"
        return f"{c.condition}: no correlation ({why}; n = {c.n} languages)"
    return f"{c.condition}: Spearman ρ = {c.spearman:.2f}, Pearson r = {c.pearson:.2f} (n = {c.n} languages)"


def retention_section(jobs: list[Job], heading: str = "##") -> tuple[str, pd.DataFrame] | None:
    """Markdown section and table, or None when no language of any job has both zero-shot accuracy and perplexity."""
    df = retention_by_language(jobs)
    if df.empty:
        return None
    lines = [f"\n{heading} Accuracy retention beside perplexity retention, by language\n",
             "Accuracy: the mean over a language's zero-shot tasks of each task's accuracy (acc; exact match for "
             "generation); accuracy retention = compressed / dense accuracy; perplexity retention = dense / "
             "compressed perplexity (both 1 when nothing is lost). Several seeds of a condition are averaged. "
             "Correlation: of the two retentions across the condition's languages.\n",
             "| condition | language | tasks | dense acc % | compressed acc % | accuracy retention | "
             "perplexity retention |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in df.itertuples():
        lines.append(f"| {r.condition} | {r.language} | {r.tasks} | {100 * r.dense_accuracy:.1f} | "
                     f"{100 * r.compressed_accuracy:.1f} | {r.accuracy_retention:.3f} | "
                     f"{r.perplexity_retention:.3f} |")
    lines += ["", *(f"- {correlation_sentence(c)}" for c in correlations(df))]
    evaluated = list(dict.fromkeys(frame(jobs)["language"]))
    without = [lang for lang in evaluated if lang not in set(df["language"])]
    if without:
        lines.append(f"- Evaluated for perplexity but in no zero-shot task (not in the table): {', '.join(without)}")
    lines.append("")
    return "\n".join(lines), df
