"""Language-aware layer sparsity, measured per language: Wanda and SparseGPT with uniform layers and with OWL's
outlier-weighted layer sparsity (``compressor.layer_sparsity=owl``, published M=5, λ=0.08), at 50% and 70%
unstructured, on the embedded default with MBS calibration, every evaluation window, over seeds (the calibration
sample's). Prints, per method and sparsity, the geometric-mean perplexity ratio over all languages and over the
low-resource ones (mean over seeds, with the seeds' min–max), the achieved global sparsity, whether each OWL variant
beats its uniform base beyond the seed spread (with the paired ratio per seed), and writes one figure with every language's ratio per method
(languages sorted by training share, log axis) and every run's summary as JSON.

M-Wanda (Choenni & Titov 2025) is not among the methods: MBS does not implement it yet (its method section and code
were not available to transcribe; see the README, Compressors).

    python benchmarks/language_aware_pruning.py                  # 4 methods x 2 sparsities x 3 seeds = 24 runs
    python benchmarks/language_aware_pruning.py --seeds 0 --sparsities 0.7 --methods wanda,wanda+owl
    python benchmarks/language_aware_pruning.py --tiny           # the tiny Llama test model, 5 languages, seconds
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from resumable import geomean, run_or_resume, subset  # noqa: E402

METHODS = {
    "wanda": ["compressor=wanda"],
    "wanda+owl": ["compressor=wanda", "compressor.layer_sparsity=owl"],
    "sparsegpt": ["compressor=sparsegpt"],
    "sparsegpt+owl": ["compressor=sparsegpt", "compressor.layer_sparsity=owl"],
}
VARIANTS = {"wanda+owl": "wanda", "sparsegpt+owl": "sparsegpt"}  # variant -> its uniform base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--sparsities", default="0.5,0.7", help="comma-separated unstructured sparsities")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (the calibration sample's)")
    parser.add_argument("--max-windows", type=int, default=0, help="evaluation windows per language (0: all)")
    parser.add_argument("--tiny", action="store_true", help="the tiny Llama test model (seconds)")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for the figure and the runs' JSON (default: a temporary one, printed); "
                             "runs already in <out>/runs are read, not run again")
    args = parser.parse_args()
    methods = subset(args.methods, METHODS, "--methods")
    sparsities = [float(s) for s in args.sparsities.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]

    import mbs

    common = ["logger=none", "progress=false", "sampler=mbs", "analysis.layers=[]",
              f"eval.max_windows={args.max_windows}"]
    if args.tiny:
        common += ["model=tiny-llama", "sampler.segments=16", "eval.languages=[en,zh-Hans,hi,sw,yo]"]
    out = args.out or Path(tempfile.mkdtemp(prefix="mbs-lap-"))
    out.mkdir(parents=True, exist_ok=True)
    jobs: dict[tuple[str, float, int], dict] = {}
    runs = out / "runs"  # one results.json per finished run: a re-run with the same --out skips them
    runs.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:  # seed-major: a benchmark cut short holds every method for the seeds it finished
            for sparsity in sparsities:
                for method in methods:
                    cfg = mbs.compose(*common, *METHODS[method], f"compressor.sparsity={sparsity}", f"seed={seed}")
                    start = time.perf_counter()
                    done = runs / f"{method}-{sparsity}-{seed}.json"
                    result, resumed = run_or_resume(cfg, done, Path(tmp) / f"{method}-{sparsity}-{seed}")
                    jobs[method, sparsity, seed] = result
                    if resumed:
                        print(f"{method} {sparsity:.0%} seed {seed}: from {done}", flush=True)
                        continue
                    c = result["compression"]
                    print(f"{method} {sparsity:.0%} seed {seed}: x{result['summary']['geomean_ratio']:.3f} "
                          f"(low-resource x{result['summary']['low_resource_geomean_ratio']:.3f}), achieved "
                          f"sparsity {c['sparsity']:.6f} ({c['zeros']}/{c['params']}), "
                          f"{time.perf_counter() - start:.0f}s", flush=True)
    report(jobs, methods, sparsities, seeds)
    (out / "language_aware_pruning.json").write_text(json.dumps(
        [{"method": m, "sparsity": s, "seed": seed, "summary": r["summary"], "languages": r["languages"],
          "compression": {k: v for k, v in r["compression"].items() if k != "layers"},
          "layer_sparsities": [layer["sparsity"] for layer in r["compression"]["layers"]]}
         for (m, s, seed), r in jobs.items()], indent=1))
    figure(jobs, methods, sparsities, seeds, out / "language_aware_pruning.png")
    print(f"\nfigure and runs: {out}")


def spread(jobs: dict, method: str, sparsity: float, seeds: list[int], key: str) -> tuple[float, float, float]:
    """(geometric mean, min, max) of a summary ratio over the seeds."""
    values = [jobs[method, sparsity, seed]["summary"][key] for seed in seeds]
    return geomean(values), min(values), max(values)


def report(jobs: dict, methods: list[str], sparsities: list[float], seeds: list[int]) -> None:
    first = jobs[methods[0], sparsities[0], seeds[0]]["summary"]
    print(f"\ngeometric-mean perplexity ratio (compressed / dense), over {len(seeds)} seed(s): geometric mean of the "
          f"seeds [min–max]; low-resource = {len(first['low_resource_languages'])} languages with training share "
          f"below {100 * first['low_resource_share']:g}% ({', '.join(first['low_resource_languages'])})")
    print("| method | sparsity | all languages | low-resource | achieved global sparsity |")
    print("|---|---:|---:|---:|---:|")
    for sparsity in sparsities:
        for method in methods:
            a, b = (spread(jobs, method, sparsity, seeds, k) for k in ("geomean_ratio", "low_resource_geomean_ratio"))
            achieved = {jobs[method, sparsity, seed]["compression"]["sparsity"] for seed in seeds}
            print(f"| {method} | {sparsity:.0%} | x{a[0]:.3f} [{a[1]:.3f}–{a[2]:.3f}] | x{b[0]:.3f} [{b[1]:.3f}–"
                  f"{b[2]:.3f}] | {', '.join(f'{x:.6f}' for x in sorted(achieved))} |")
    print("\nOWL against its uniform base (lower ratio is better); 'beyond the seed spread' when every seed of one "
          "is better than every seed of the other:")
    for variant, base in VARIANTS.items():
        if variant not in methods or base not in methods:
            continue
        for sparsity in sparsities:
            for key, label in (("geomean_ratio", "all languages"), ("low_resource_geomean_ratio", "low-resource")):
                v, b = spread(jobs, variant, sparsity, seeds, key), spread(jobs, base, sparsity, seeds, key)
                if len(seeds) < 2:
                    verdict = "one seed: no spread to judge by"
                elif v[2] < b[1]:
                    verdict = "helps beyond the seed spread"
                elif v[1] > b[2]:
                    verdict = "hurts beyond the seed spread"
                else:
                    verdict = "within the seed spread"
                paired = [jobs[variant, sparsity, seed]["summary"][key] / jobs[base, sparsity, seed]["summary"][key]
                          for seed in seeds]  # the same calibration sample per seed: the paired unit
                print(f"- {variant} vs {base} at {sparsity:.0%}, {label}: x{v[0]:.3f} vs x{b[0]:.3f}: {verdict}; "
                      f"paired ratio per seed {', '.join(f'{r:.3f}' for r in paired)}")


def figure(jobs: dict, methods: list[str], sparsities: list[float], seeds: list[int], path: Path) -> None:
    """Every language's ratio (geometric mean over seeds) per method, languages by training share, log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mbs.record.report import _ratio_axis

    fig, axes = plt.subplots(1, len(sparsities), figsize=(6.5 * len(sparsities), 4.2), squeeze=False)
    for ax, sparsity in zip(axes[0], sparsities):
        rows = jobs[methods[0], sparsity, seeds[0]]["languages"]
        order = [r["language"] for r in sorted(rows, key=lambda r: -(r.get("training_share") or 0.0))]
        for method in methods:
            ratios = {lang: geomean([next(r["ratio"] for r in jobs[method, sparsity, seed]["languages"]
                                          if r["language"] == lang) for seed in seeds]) for lang in order}
            ax.plot(range(len(order)), [ratios[lang] for lang in order], marker="o", linestyle="none", label=method)
        ax.set_yscale("log")  # languages are categories: markers only; ticks as the report labels ratios (x1, x2, ...)
        lo, hi = ax.get_ylim()
        _ratio_axis(ax, lo, hi)
        ax.set_xticks(range(len(order)), order, rotation=60, fontsize=8)
        ax.set_title(f"{sparsity:.0%} unstructured, {len(seeds)} seed(s)")
        ax.set_xlabel("language (by training share, largest first)")
        ax.set_ylabel("perplexity ratio (compressed / dense)")
        ax.grid(True, which="major", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()  # one legend under the panels, hiding no point
    fig.legend(handles, labels, loc="lower center", ncol=len(methods), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
