"""The sweep report's zero-shot section: per task and metric, the dense accuracy and, per condition, the compressed
accuracy and its difference to dense (from each job's ``results["zeroshot"]``, mbs/evaluate/zeroshot.py)."""
from __future__ import annotations

import math

import pandas as pd

from mbs.record.frame import ci95
from mbs.record.jobs import Job


def zeroshot_frame(jobs: list[Job], labels: dict[int, str]) -> pd.DataFrame:
    """One row per finished job, task and metric (a result reached by two jobs counts once)."""
    rows, seen = [], set()
    for i, job in enumerate(jobs):
        res = job.results
        if res is None or not res.zeroshot:
            continue
        key = res.experiment_id or str(job.results_path)
        if key in seen:
            continue
        seen.add(key)
        for r in res.zeroshot["results"]:
            rows.append({"condition": labels[i], "experiment_id": key, **r})
    return pd.DataFrame(rows)


def _cell(values: pd.Series, stderrs: pd.Series) -> str:
    """Percent; ± the run's stderr for one run, the 95% CI over runs (seeds) for several."""
    mean = 100 * values.mean()
    if len(values) == 1:
        err = stderrs.iloc[0]
        err = None if err is None or (isinstance(err, float) and math.isnan(err)) else 100 * err
    else:
        err = 100 * ci95(values)
    return f"{mean:.1f}" + ("" if err is None or math.isnan(err) else f" ± {err:.1f}")


def zeroshot_markdown(df: pd.DataFrame) -> str:
    """Rows: task · metric; columns: items, dense %, then per condition 'compressed % (Δ pts)'."""
    conds = list(dict.fromkeys(df["condition"]))
    lines = ["| task | metric | items | dense % | " + " | ".join(conds) + " |",
             "|---|---|---:|---:|" + "---:|" * len(conds)]
    for (task, metric), g in df.groupby(["task", "metric"], sort=False):
        dense_runs = g.drop_duplicates("dense")
        cells = [task, metric, str(int(g["n"].iloc[0])),
                 _cell(g["dense"].iloc[:1], g["dense_stderr"].iloc[:1]) if len(dense_runs) == 1 else "varies"]
        for cond in conds:
            c = g[g["condition"] == cond]
            cells.append("–" if c.empty else f"{_cell(c['compressed'], c['compressed_stderr'])} "
                                              f"(Δ {_cell(c['difference'], c['difference_stderr'])})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def zeroshot_section(jobs: list[Job], labels: dict[int, str]) -> tuple[str, pd.DataFrame] | None:
    """Markdown section and long table, or None when no job ran zero-shot tasks."""
    df = zeroshot_frame(jobs, labels)
    if df.empty:
        return None
    text = ("\n## Zero-shot accuracy (lm-evaluation-harness)\n\n"
            "Cells: accuracy % of the compressed model (Δ: difference to dense, points). One run: ± its standard "
            "error (Δ: paired over the same items); several seeds: ± 95% CI over them.\n\n" + zeroshot_markdown(df))
    return text, df
