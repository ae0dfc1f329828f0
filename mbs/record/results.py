"""The results of one run: the typed result (:class:`RunResult`, written as results.json), atomic writes, and the
per-language table.

Shares: every row carries ``training_share``, the language's share of the model's *whole* training distribution
(a fraction in results.json; None when the distribution does not name the language). It does not depend on which
languages were evaluated, so a language is low-resource or not whatever else is in the run. Tables, figures and logs
show it in percent (``format_share``).

Bits per byte: every row also carries ``bytes``, the UTF-8 bytes of the text whose tokens were predicted, and
``dense_bpb``/``compressed_bpb`` = summed NLL / (ln 2 · bytes). Perplexity is per token, and languages (and
tokenizers) differ in tokens per byte, so per-token numbers of two languages are not on one scale; per byte they
are."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mbs.atomic import atomic_write_all
from mbs.evaluate.zeroshot import to_markdown as zeroshot_markdown

SCHEMA_VERSION = 2  # 2: schema_version, provenance, per-row low_resource and calibration_segments
COLUMNS = ("language", "training_share_pct", "dense_ppl", "compressed_ppl", "ratio", "log_ratio", "dense_bpb",
           "compressed_bpb", "tokens", "bytes", "low_resource", "calibration_segments")
# Default low-resource threshold: below 1% of the model's training distribution. On BLOOM's ROOTS shares this splits
# the MBS paper's 20 languages into 8 above (en … id, the lowest at 1.38%) and 12 below (hi at 0.81% … ig), with
# no language within 0.19 points of the line.
LOW_RESOURCE_SHARE = 0.01


@dataclass
class RunResult:
    """What one run produced; results.json is :meth:`to_json` (the same keys as before this class existed, so files
    written earlier read back with :meth:`from_json`). The pipeline fills it; the console table, the loggers, the
    sweep report and the analysis read it by attribute."""

    schema_version: int = 1  # of results.json: 1 = written before this field existed; SCHEMA_VERSION now
    experiment_id: str = ""  # resume key (mbs/fingerprint.py)
    run: dict[str, Any] = field(default_factory=dict)  # name, chosen option of each config group, schema classes
    config: dict[str, Any] = field(default_factory=dict)  # the resolved config
    model: dict[str, Any] = field(default_factory=dict)  # name, parameters, training-language distribution
    calibration: dict[str, Any] = field(default_factory=dict)  # segments per language, seqlen, total
    languages: list[dict[str, Any]] = field(default_factory=list)  # one row per evaluated language (language_rows)
    summary: dict[str, Any] = field(default_factory=dict)  # over languages (summary())
    compression: dict[str, Any] = field(default_factory=dict)  # method, sparsity, per-layer records, mode
    similarity: dict[str, Any] | None = None  # language similarity (mbs/analyze/similarity.py), None when off
    dense_baseline: dict[str, Any] = field(default_factory=dict)  # cached or computed, and the cache entries
    timings: dict[str, float] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)  # what changes numbers outside the config
    similarity_skipped: str | None = None  # why analysis.layers asked for a similarity that cannot be formed
    zeroshot: dict[str, Any] | None = None  # lm-eval accuracies, dense vs compressed, when eval.tasks ran
    export: dict[str, Any] | None = None  # the written checkpoint, when save_model=true
    provenance: dict[str, Any] = field(default_factory=dict)  # commit, times, package versions, model revision
    risk: dict[str, Any] | None = None  # predicted damage per language, and the measured beside it (mbs/analyze/damage.py)
    risk_skipped: str | None = None  # why risk.predict=true predicted nothing
    extra: dict[str, Any] = field(default_factory=dict)  # keys of a results.json this class does not know

    OPTIONAL = ("similarity_skipped", "zeroshot", "export", "risk", "risk_skipped")  # left out of results.json when None

    @property
    def name(self) -> str:
        return self.run.get("name") or f"{self.model.get('name', '')} · {self.compression.get('method', '')}"

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        for key in self.OPTIONAL:
            if out[key] is None:
                del out[key]
        return {**out, **self.extra}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RunResult":
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})

    @classmethod
    def read(cls, path: str | Path) -> "RunResult":
        """A results.json; one that cannot be read or parsed (truncated, edited) is a ValueError naming the file."""
        try:
            return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            detail = str(err).splitlines()[0][:120] if str(err) else ""
            raise ValueError(f"{path} is not a readable results file, it is truncated or corrupt "
                             f"({type(err).__name__}: {detail})") from None


def format_share(fraction: float | None) -> str:
    """A training share in percent, three significant figures (34.7, 0.808, 0.00115); '–' when unknown."""
    if fraction is None or (isinstance(fraction, float) and math.isnan(fraction)):
        return "–"
    return f"{100 * fraction:.3g}"


def by_training_share(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows ordered by training share, largest first; languages the distribution does not name come last."""
    return sorted(rows, key=lambda r: (r.get("training_share") is None, -(r.get("training_share") or 0.0),
                                       r["language"]))


def language_rows(dense: dict[str, Any], compressed: dict[str, Any],
                  training_shares: dict[str, float] | None = None, low_resource_share: float = LOW_RESOURCE_SHARE,
                  segments: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """One row per evaluated language, in evaluation order (``training_shares``: the model's own absolute shares as
    fractions, ``mbs.data.sampling.absolute_shares``; ``segments``: calibration segments per language)."""
    training_shares, segments = training_shares or {}, segments or {}
    rows = []
    for language, d in dense.items():
        c = compressed[language]
        rows.append({
            "language": language,
            "training_share": training_shares.get(language),
            "dense_ppl": d.perplexity,
            "compressed_ppl": c.perplexity,
            "ratio": c.perplexity / d.perplexity,
            "log_ratio": c.mean_nll - d.mean_nll,
            "dense_bpb": d.bpb,  # bits per byte: NLL / (ln 2 · bytes); None without bytes
            "compressed_bpb": c.bpb,
            "tokens": d.tokens,
            "bytes": d.bytes,  # UTF-8 bytes of the text of the predicted tokens
            "low_resource": is_low_resource(training_shares.get(language), low_resource_share),
            "calibration_segments": int(segments.get(language, 0)),
        })
    return rows


def is_low_resource(share: float | None, threshold: float) -> bool:
    """Below ``threshold`` of the model's training distribution; a language with no stated share is not classified."""
    return share is not None and not (isinstance(share, float) and math.isnan(share)) and share < threshold


def summary(rows: list[dict[str, Any]], low_resource_share: float = LOW_RESOURCE_SHARE) -> dict[str, Any]:
    """Over languages: the mean and median log ratio, the geometric-mean ratio (exp of the mean log ratio), the worst
    ratio, and the same over the low-resource languages (training share below ``low_resource_share``)."""
    logs = sorted(r["log_ratio"] for r in rows)
    mid = len(logs) // 2
    median = logs[mid] if len(logs) % 2 else (logs[mid - 1] + logs[mid]) / 2
    low = [r for r in rows if is_low_resource(r.get("training_share"), low_resource_share)]
    low_mean = sum(r["log_ratio"] for r in low) / len(low) if low else None
    return {"mean_log_ratio": sum(logs) / len(logs), "median_log_ratio": median,
            "geomean_ratio": math.exp(sum(logs) / len(logs)), "worst_ratio": math.exp(logs[-1]),
            "low_resource_share": low_resource_share, "low_resource_languages": [r["language"] for r in low],
            "low_resource_mean_log_ratio": low_mean,
            "low_resource_geomean_ratio": math.exp(low_mean) if low_mean is not None else None,
            "languages_without_share": [r["language"] for r in rows if r.get("training_share") is None]}


def _number(value: float | int | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """The per-language table; bits per byte and bytes show as '–' in rows written before they were recorded."""
    lines = ["| language | training share % | dense ppl | compressed ppl | ratio | log ratio | dense bpb | "
             "compressed bpb | tokens | bytes |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in by_training_share(rows):
        lines.append(f"| {r['language']} | {format_share(r.get('training_share'))} | {r['dense_ppl']:.2f} | "
                     f"{r['compressed_ppl']:.2f} | {r['ratio']:.3f} | {r['log_ratio']:.3f} | "
                     f"{_number(r.get('dense_bpb'), '.4f')} | {_number(r.get('compressed_bpb'), '.4f')} | "
                     f"{r['tokens']} | {_number(r.get('bytes'), 'd')} |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]], experiment_id: str = "") -> str:
    """The per-language table with the run's experiment id on every row, so concatenated CSVs stay attributable."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=("experiment_id", *COLUMNS), lineterminator="\n")
    writer.writeheader()
    for r in by_training_share(rows):
        share = r.get("training_share")
        writer.writerow({**{k: r[k] for k in COLUMNS if k in r}, "experiment_id": experiment_id,
                         "training_share_pct": "" if share is None else 100 * share})
    return out.getvalue()


def write_results(directory: Path, result: RunResult) -> None:
    """results.csv, .md and .json, together or not at all: results.json, the commit marker readers look for, is
    removed first and renamed last (mbs.atomic.atomic_write_all)."""
    directory = Path(directory)
    header = f"# {result.name}\n\nexperiment {result.experiment_id}; {format_table(result).splitlines()[0]}\n\n"
    atomic_write_all({directory / "results.csv": to_csv(result.languages, result.experiment_id),
                      directory / "results.md": header + to_markdown(result.languages),
                      directory / "results.json": json.dumps(result.to_json(), indent=2, default=str)})


def risk_markdown(risk: dict[str, Any]) -> str:
    """Predicted damage per language, highest first; once measured, the measured log ratio beside it and Spearman's ρ
    across languages (results.json ``risk``, mbs/analyze/damage.py)."""
    measured = risk.get("measured_log_ratio")
    if measured is None:
        head = ("Predicted damage (log ratio on calibration text, model compressed from dense statistics) of each "
                "evaluated language, before compressing:")
        lines = ["| language | predicted damage |", "|---|---:|"]
    else:
        rho = risk.get("spearman")
        head = (f"Predicted damage (before compressing) vs measured log ratio; Spearman ρ across "
                f"{len(risk['predicted'])} languages: {'–' if rho is None else f'{rho:.3f}'}")
        lines = ["| language | predicted damage | measured log ratio |", "|---|---:|---:|"]
    for language, value in sorted(risk["predicted"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {language} | {value:.4g} |" + ("" if measured is None else
                                                        f" {_number(measured.get(language), '.3f')} |"))
    skipped = risk.get("not_predicted") or {}
    if skipped:
        lines.append("not predicted: " + "; ".join(f"{k} ({why})" for k, why in skipped.items()))
    return head + "\n" + "\n".join(lines)


def format_table(result: RunResult) -> str:
    """The console summary: what ran, the geometric-mean ratio over languages (and over low-resource ones), and the
    per-language table ordered by training share."""
    s, compression = result.summary, result.compression
    head = (f"{result.name} · achieved sparsity {compression['sparsity']:.4f} · "
            f"geometric-mean ratio ×{s['geomean_ratio']:.3f} (mean log ratio {s['mean_log_ratio']:.3f}, "
            f"median {s['median_log_ratio']:.3f})")
    if s.get("low_resource_geomean_ratio") is not None:
        head += (f" · low-resource (training share < {format_share(s['low_resource_share'])}%: "
                 f"{len(s['low_resource_languages'])} languages) ×{s['low_resource_geomean_ratio']:.3f}")
    head += f" · {result.timings['total_s']:.1f}s"
    if result.model.get("distribution_is_proxy"):
        head += f"\ntraining shares: {result.model['distribution_source']}"
    model_config = result.config.get("model", {})
    if model_config.get("source") == "gguf_package":
        head += f"\ndense = the de-quantized weights of {model_config.get('gguf_file')}"
    table = head + "\n" + to_markdown(result.languages)
    if result.risk:
        table += "\n" + risk_markdown(result.risk) + "\n"
    if result.zeroshot:
        table += "\nZero-shot accuracy (lm-eval):\n" + zeroshot_markdown(result.zeroshot["results"])
    return table
