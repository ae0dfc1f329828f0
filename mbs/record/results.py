"""The results of one run: a schema, atomic writes, and the per-language table."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from mbs.atomic import atomic_write_all

COLUMNS = ("language", "share", "dense_ppl", "compressed_ppl", "ratio", "log_ratio", "tokens")


def language_rows(shares: dict[str, float], dense: dict[str, Any], compressed: dict[str, Any],
                  training_shares: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """``shares``: renormalised over the evaluated languages; ``training_shares``: the model's own (absolute) shares,
    a fraction of its whole distribution (None for a language the distribution does not name)."""
    training_shares = training_shares or {}
    rows = []
    for language, d in dense.items():
        c = compressed[language]
        rows.append({
            "language": language,
            "share": shares.get(language, 0.0),
            "training_share": training_shares.get(language),
            "dense_ppl": d.perplexity,
            "compressed_ppl": c.perplexity,
            "ratio": c.perplexity / d.perplexity,
            "log_ratio": c.mean_nll - d.mean_nll,
            "tokens": d.tokens,
        })
    return rows


LOW_RESOURCE_SHARE = 0.01  # default threshold: below 1% of the (renormalised) training share is low-resource


def summary(rows: list[dict[str, Any]], low_resource_share: float = LOW_RESOURCE_SHARE) -> dict[str, Any]:
    """Mean/median log perplexity ratio over languages, and the mean over low-resource languages: those whose share
    (the training share renormalised over the evaluated languages, as in the table) is below low_resource_share."""
    logs = sorted(r["log_ratio"] for r in rows)
    mid = len(logs) // 2
    median = logs[mid] if len(logs) % 2 else (logs[mid - 1] + logs[mid]) / 2
    low = [r for r in rows if r["share"] < low_resource_share]
    return {"mean_log_ratio": sum(logs) / len(logs), "median_log_ratio": median,
            "mean_ratio": math.exp(sum(logs) / len(logs)), "worst_ratio": math.exp(logs[-1]),
            "low_resource_share": low_resource_share, "low_resource_languages": [r["language"] for r in low],
            "low_resource_mean_log_ratio": sum(r["log_ratio"] for r in low) / len(low) if low else None}


def to_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| language | train share % (over these languages) | dense ppl | compressed ppl | ratio | tokens |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['language']} | {100 * r['share']:.3f} | {r['dense_ppl']:.2f} | {r['compressed_ppl']:.2f} | "
                     f"{r['ratio']:.3f} | {r['tokens']} |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: r[k] for k in COLUMNS} for r in rows)
    return out.getvalue()


def write_results(directory: Path, results: dict[str, Any]) -> None:
    """results.csv, .md and .json, together or not at all (results.json, which marks a finished run, renamed last)."""
    directory = Path(directory)
    atomic_write_all({directory / "results.csv": to_csv(results["languages"]),
                      directory / "results.md": to_markdown(results["languages"]),
                      directory / "results.json": json.dumps(results, indent=2, default=str)})
