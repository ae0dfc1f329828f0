"""Self-calibration against corpus text, measured per language: Wanda 50% and GPTQ 3-bit (groups of 128), each with
MBS and uniform mixtures, calibrated on segments the model generates itself (``data=self``) and on UDHR segments
(``data=udhr``), over seeds (the seed draws the UDHR sample and seeds the generation), on the embedded default, every
evaluation window. Both sources evaluate on the same UDHR evaluation articles (checked: the dense perplexities agree).

Prints, per method and mixture, the geometric-mean perplexity ratio over all languages and over the low-resource ones
for each source (geometric mean over seeds, with the seeds' min–max) and whether self-calibration helps or hurts beyond
the seed spread (with the paired ratio per seed); per language, the self/UDHR ratio over seeds and in how many of the
paired runs self-calibration was better; the Spearman correlation across languages between the dense perplexity (how
well the model writes the language) and the self/UDHR log ratio; generation time per mixture and seed; and the
language-check failure share per language. Writes one figure and every run's summary as JSON.

    python benchmarks/self_calibration.py                       # 2 methods x 2 mixtures x 2 sources x 3 seeds = 24 runs
    python benchmarks/self_calibration.py --seeds 0 --methods wanda --mixtures mbs
    python benchmarks/self_calibration.py --tiny                # the tiny Llama test model, 5 languages, seconds
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from resumable import geomean, run_or_resume, subset  # noqa: E402

METHODS = {"wanda": ["compressor=wanda", "compressor.sparsity=0.5"], "gptq": ["compressor=gptq", "compressor.bits=3"]}
LABELS = {"wanda": "Wanda 50%", "gptq": "GPTQ 3-bit g128"}
MIXTURES = {"mbs": ["sampler=mbs"], "uniform": ["sampler=uniform"]}
SOURCES = {"self": ["data=self"], "udhr": []}  # udhr: the default corpus, so its runs are the other benchmarks' runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--mixtures", default=",".join(MIXTURES),
                        help="comma-separated subset of: " + ", ".join(MIXTURES))
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--max-windows", type=int, default=0, help="evaluation windows per language (0: all)")
    parser.add_argument("--tiny", action="store_true", help="the tiny Llama test model (seconds)")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for the figure and the runs' JSON (default: a temporary one, printed); runs "
                             "already in <out>/runs are read, not run again")
    args = parser.parse_args()
    methods, mixtures = subset(args.methods, METHODS, "--methods"), subset(args.mixtures, MIXTURES, "--mixtures")
    seeds = [int(s) for s in args.seeds.split(",")]

    import mbs

    common = ["logger=none", "progress=false", "analysis.layers=[]", f"eval.max_windows={args.max_windows}"]
    last = []
    if args.tiny:
        common += ["model=tiny-llama", "sampler.segments=16", "eval.languages=[en,zh-Hans,hi,sw,yo]"]
        last = ["compressor.groupsize=32"] if "gptq" in methods else []
    out = args.out or Path(tempfile.mkdtemp(prefix="mbs-selfcal-"))
    (out / "runs").mkdir(parents=True, exist_ok=True)
    jobs: dict[tuple[str, str, str, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:  # seed-major: a benchmark cut short holds every condition for the seeds it finished
            for mixture in mixtures:
                for source in SOURCES:  # self first: its first method generates, the second reads the cache
                    for method in methods:
                        key = f"{method}-{mixture}-{source}-{seed}"
                        cfg = mbs.compose(*common, *SOURCES[source], *MIXTURES[mixture], *METHODS[method],
                                          *(last if method == "gptq" else []), f"seed={seed}")
                        start = time.perf_counter()
                        result, resumed = run_or_resume(cfg, out / "runs" / f"{key}.json", Path(tmp) / key)
                        jobs[method, mixture, source, seed] = result
                        s, t = result["summary"], result["timings"]
                        print(f"{key}: x{s['geomean_ratio']:.3f} (low-resource x{s['low_resource_geomean_ratio']:.3f})"
                              + (f", generation {t['generate_s']:.0f}s" if "generate_s" in t else "")
                              + (" (read back)" if resumed else f", run {time.perf_counter() - start:.0f}s"),
                              flush=True)
    check_same_evaluation(jobs)
    report(jobs, methods, mixtures, seeds)
    (out / "self_calibration.json").write_text(json.dumps(
        [{"method": m, "mixture": x, "source": src, "seed": seed, "summary": r["summary"], "languages": r["languages"],
          "timings": r["timings"], "generated": r["calibration"].get("generated", {}).get("language_check")}
         for (m, x, src, seed), r in jobs.items()], indent=1))
    figure(jobs, methods, mixtures, seeds, out / "self_calibration.png")
    print(f"\nfigure and runs: {out}")


def ratios(result: dict) -> dict[str, float]:
    return {row["language"]: row["ratio"] for row in result["languages"]}


def check_same_evaluation(jobs: dict) -> None:
    """Self and UDHR runs must be evaluated on the same text: their dense perplexities are equal per language."""
    for (m, x, source, seed), r in jobs.items():
        if source != "self" or (m, x, "udhr", seed) not in jobs:
            continue
        twin = {row["language"]: row["dense_ppl"] for row in jobs[m, x, "udhr", seed]["languages"]}
        for row in r["languages"]:
            if not math.isclose(row["dense_ppl"], twin[row["language"]], rel_tol=1e-9):
                raise SystemExit(f"{m} {x} seed {seed}: dense perplexity of {row['language']} differs between "
                                 f"data=self ({row['dense_ppl']}) and data=udhr ({twin[row['language']]}): not the same "
                                 f"evaluation text")


def spread(values: list[float]) -> tuple[float, float, float]:
    return geomean(values), min(values), max(values)


def verdict(self_values: list[float], udhr_values: list[float]) -> str:
    if len(self_values) < 2:
        return "one seed: no spread to judge by"
    if max(self_values) < min(udhr_values):
        return "self helps beyond the seed spread"
    if min(self_values) > max(udhr_values):
        return "self hurts beyond the seed spread"
    return "within the seed spread"


def report(jobs: dict, methods: list[str], mixtures: list[str], seeds: list[int]) -> None:
    first = next(iter(jobs.values()))["summary"]
    low = first["low_resource_languages"]
    print(f"\ngeometric-mean perplexity ratio (compressed / dense), over {len(seeds)} seed(s): geometric mean of the "
          f"seeds [min–max]; low-resource = {len(low)} languages with training share below "
          f"{100 * first['low_resource_share']:g}% ({', '.join(low)})")
    print("| method | mixture | calibration | all languages | low-resource |")
    print("|---|---|---|---:|---:|")
    for method in methods:
        for mixture in mixtures:
            for source in SOURCES:
                a, b = (spread([jobs[method, mixture, source, s]["summary"][k] for s in seeds])
                        for k in ("geomean_ratio", "low_resource_geomean_ratio"))
                print(f"| {LABELS[method]} | {mixture} | {source} | x{a[0]:.3f} [{a[1]:.3f}–{a[2]:.3f}] | "
                      f"x{b[0]:.3f} [{b[1]:.3f}–{b[2]:.3f}] |")
    print("\nself-calibration against UDHR calibration (lower ratio is better; paired by seed):")
    for method in methods:
        for mixture in mixtures:
            for key, label in (("geomean_ratio", "all languages"), ("low_resource_geomean_ratio", "low-resource")):
                sv = [jobs[method, mixture, "self", s]["summary"][key] for s in seeds]
                uv = [jobs[method, mixture, "udhr", s]["summary"][key] for s in seeds]
                print(f"- {LABELS[method]}, {mixture}, {label}: x{geomean(sv):.3f} vs x{geomean(uv):.3f}: "
                      f"{verdict(sv, uv)}; paired ratio per seed {', '.join(f'{a / b:.3f}' for a, b in zip(sv, uv))}")

    across_languages(jobs, methods, mixtures, seeds, low)

    order = [r["language"] for r in sorted(next(iter(jobs.values()))["languages"],
                                           key=lambda r: -(r.get("training_share") or 0.0))]
    n_pairs = len(mixtures) * len(seeds)
    print(f"\nper language: self/UDHR perplexity ratio of the compressed model (geometric mean over {len(mixtures)} "
          f"mixture(s) x {len(seeds)} seed(s) = {n_pairs} paired runs per method) and in how many pairs self was "
          f"better; language check failures over all generated segments")
    print("| language | training share % | dense ppl | " + " | ".join(f"{LABELS[m]}: self/UDHR (self better)"
                                                                        for m in methods) + " | check failures |")
    print("|---|---:|---:|" + "---:|" * len(methods) + "---:|")
    per_language = {m: paired_by_language(jobs, m, mixtures, seeds) for m in methods}
    checks = language_checks(jobs, mixtures, seeds)
    dense = {row["language"]: row for row in next(iter(jobs.values()))["languages"]}
    for lang in order:
        cells = []
        for m in methods:
            pairs = per_language[m][lang]
            cells.append(f"{geomean(pairs):.3f} ({sum(p < 1 for p in pairs)}/{len(pairs)})")
        failed, total = checks.get(lang, (0, 0))
        share = dense[lang].get("training_share")
        print(f"| {lang} | {'' if share is None else f'{100 * share:.3g}'} | {dense[lang]['dense_ppl']:.1f} | "
              + " | ".join(cells) + f" | {failed}/{total} |")
    from scipy.stats import spearmanr

    for m in methods:
        x = [math.log(dense[lang]["dense_ppl"]) for lang in order]
        y = [math.log(geomean(per_language[m][lang])) for lang in order]
        rho, p = spearmanr(x, y)
        print(f"- {LABELS[m]}: Spearman between dense perplexity and the self/UDHR log ratio across the "
              f"{len(order)} languages: rho={rho:.2f} (p={p:.3f}, n={len(order)})")
    print("\ngeneration (seconds, the run that generated; the other method read the cache):")
    for mixture in mixtures:
        times = [max(jobs[m, mixture, "self", s]["timings"].get("generate_s", 0.0) for m in methods) for s in seeds]
        check = jobs[methods[0], mixture, "self", seeds[0]]["calibration"]["generated"]["language_check"]
        segments = sum(c["segments"] for c in check.values())
        print(f"- {mixture}: {segments} segments per seed, {', '.join(f'{t:.0f}' for t in times)} s per seed")


def across_languages(jobs: dict, methods: list[str], mixtures: list[str], seeds: list[int], low: list[str]) -> None:
    """Self/UDHR per language (seeds averaged per language first, in logs), with a 95% BCa bootstrap CI over
    languages: the spread over the unit that varies most, where n seeds alone give no interval."""
    import numpy as np
    from scipy.stats import bootstrap

    print(f"\nacross languages: self/UDHR per language (geometric mean over the {len(seeds)} seed(s) first), geometric "
          f"mean over languages with a 95% bootstrap CI over languages (BCa, 10,000 resamples; languages are not "
          f"independent samples: a spread, not a test); worse in = languages where self was worse")
    print("| method | mixture | all languages [95% CI], worse in | low-resource [95% CI], worse in |")
    print("|---|---|---:|---:|")
    for method in methods:
        for mixture in mixtures:
            per_language = paired_by_language(jobs, method, [mixture], seeds)
            cells = []
            for languages in (list(per_language), [k for k in per_language if k in low]):
                logs = np.array([np.mean(np.log(per_language[k])) for k in languages])
                if len(logs) < 3:
                    cells.append(f"too few languages for a CI (n={len(logs)})")
                    continue
                ci = bootstrap((logs,), np.mean, n_resamples=10_000, confidence_level=0.95, method="BCa",
                               rng=np.random.default_rng(0)).confidence_interval
                cells.append(f"x{math.exp(logs.mean()):.3f} [{math.exp(ci.low):.3f}, {math.exp(ci.high):.3f}], "
                             f"{int((logs > 0).sum())}/{len(logs)}")
            print(f"| {LABELS[method]} | {mixture} | " + " | ".join(cells) + " |")


def paired_by_language(jobs: dict, method: str, mixtures: list[str], seeds: list[int]) -> dict[str, list[float]]:
    """Per language, the self/UDHR ratio of the compressed perplexities in each (mixture, seed) pair (the dense
    perplexity is the same in both, so this is the ratio of the two ratios)."""
    out: dict[str, list[float]] = {}
    for mixture in mixtures:
        for s in seeds:
            a, b = ratios(jobs[method, mixture, "self", s]), ratios(jobs[method, mixture, "udhr", s])
            for lang in a:
                out.setdefault(lang, []).append(a[lang] / b[lang])
    return out


def language_checks(jobs: dict, mixtures: list[str], seeds: list[int]) -> dict[str, tuple[int, int]]:
    """Per calibration language, (failed, generated) segments over the distinct generations (mixture, seed)."""
    out: dict[str, tuple[int, int]] = {}
    for mixture in mixtures:
        for s in seeds:
            run = next(r for (m, x, src, seed), r in jobs.items() if (x, src, seed) == (mixture, "self", s))
            for lang, c in run["calibration"]["generated"]["language_check"].items():
                failed, total = out.get(lang, (0, 0))
                out[lang] = (failed + c["failed"], total + c["segments"])
    return out


def figure(jobs: dict, methods: list[str], mixtures: list[str], seeds: list[int], path: Path) -> None:
    """Per language, the self/UDHR ratio of compressed perplexities (geometric mean over seeds, bar: seeds' min–max)
    per mixture, one panel per method; languages by training share; below 1: self-calibration better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mbs.record.report import _ratio_axis

    first = next(iter(jobs.values()))["languages"]
    order = [r["language"] for r in sorted(first, key=lambda r: -(r.get("training_share") or 0.0))]
    fig, axes = plt.subplots(1, len(methods), figsize=(6.5 * len(methods), 4.2), squeeze=False, sharey=True)
    for ax, method in zip(axes[0], methods):
        for k, mixture in enumerate(mixtures):
            pairs = [(ratios(jobs[method, mixture, "self", s]), ratios(jobs[method, mixture, "udhr", s])) for s in seeds]
            values = {lang: [a[lang] / b[lang] for a, b in pairs] for lang in order}
            x = [i + (k - (len(mixtures) - 1) / 2) * 0.25 for i in range(len(order))]
            mid = [geomean(values[lang]) for lang in order]
            lo = [m - min(values[lang]) for m, lang in zip(mid, order)]
            hi = [max(values[lang]) - m for m, lang in zip(mid, order)]
            ax.errorbar(x, mid, yerr=[lo, hi], marker="o", linestyle="none", capsize=2, label=f"{mixture} mixture")
        ax.axhline(1.0, color="0.4", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(order)), order, rotation=60, fontsize=8)
        ax.set_title(f"{LABELS[method]}, {len(seeds)} seed(s)" + ("; bars: min–max over seeds" if len(seeds) > 1 else ""))
        ax.set_xlabel("language (by training share, largest first)")
        ax.grid(True, which="major", alpha=0.3)
    lo, hi = axes[0][0].get_ylim()
    _ratio_axis(axes[0][0], lo, hi)
    axes[0][0].set_ylabel("compressed perplexity: self / UDHR calib.")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(mixtures), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
