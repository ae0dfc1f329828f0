"""A sweep's finished jobs as one table: one row per job and language, labelled by the job's *condition* (its
overrides minus its seed and minus keys that do not change results, mbs.fingerprint.NON_RESULT_KEYS, and minus what
every job shares). What the sweep report and the retention analysis both start from."""
from __future__ import annotations

import math
from typing import Any

import pandas as pd

from mbs.fingerprint import NON_RESULT_KEYS
from mbs.record.identity import describe_compressor
from mbs.record.jobs import Job
from mbs.record.results import RunResult

SEED_KEYS = ("seed",)




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


def _describe(res: RunResult) -> dict[str, str]:
    """Model, method (``wanda 0.5``) and sampler of one run, for figure titles; older results lack ``run``."""
    choices = res.run.get("choices") or {}
    method = choices.get("compressor") or res.compression.get("method", "")
    method = describe_compressor(method, res.config.get("compressor") or {}) if method else ""
    gguf = (res.config.get("model") or {}).get("source") == "gguf_package"
    return {"model": res.model.get("name", ""), "method": method, "sampler": choices.get("sampler", ""),
            "dense_weights": "de-quantized GGUF" if gguf else ""}


def result_key(job: Job) -> str:
    """What identifies a job's result (a result reached by two jobs, e.g. a resumed one, has one key)."""
    return job.results.experiment_id or str(job.results_path)


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


def result_rows(res: RunResult, condition: str, key: str) -> list[dict[str, Any]]:
    """One row per evaluated language of one run's results.json. ``training_share_pct``: the language's share of
    the model's whole training distribution, in percent. ``dense_bpb``/``compressed_bpb``: bits per byte (NaN for
    results written before they were recorded)."""
    described = _describe(res)
    rows = []
    for r in res.languages:
        share = r.get("training_share")
        rows.append({"condition": condition, "seed": res.config.get("seed"), "experiment_id": key,
                     "language": r["language"], "training_share": share,
                     "training_share_pct": math.nan if share is None else 100 * share,
                     "dense_ppl": r["dense_ppl"], "compressed_ppl": r["compressed_ppl"], "ratio": r["ratio"],
                     "log_ratio": r["log_ratio"], "retention": r["dense_ppl"] / r["compressed_ppl"],
                     "dense_bpb": _float(r.get("dense_bpb")), "compressed_bpb": _float(r.get("compressed_bpb")),
                     "sparsity": res.compression["sparsity"], **described})
    return rows


def frame(jobs: list[Job]) -> pd.DataFrame:
    """One row per finished job and language (a result reached by two jobs, e.g. a resumed one, counts once)."""
    labels = conditions(jobs)
    rows, seen = [], set()
    for i, job in enumerate(jobs):
        if job.results is None or result_key(job) in seen:
            continue
        seen.add(result_key(job))
        rows += result_rows(job.results, labels[i], result_key(job))
    return pd.DataFrame(rows)


def ci95(values: pd.Series) -> float:
    """Half-width of the 95% confidence interval of the mean (Student t, n-1 dof); NaN for one value."""
    from scipy.stats import t

    n = int(values.count())
    return float(t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan


