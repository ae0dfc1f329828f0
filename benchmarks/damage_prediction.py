"""Does the predicted damage (mbs/analyze/damage.py) order languages as the measured damage does? On the embedded
default with Wanda 50%, one run per calibration mixture (English-only, MBS, uniform and two single-language ones),
Spearman's ρ across the evaluated languages between each language's predicted damage (before compressing, from
calibration text) and its measured log perplexity ratio (evaluation windows), within each mixture. Besides the run's
own aggregation (mean of the layers' errors) it scores other aggregations of the same per-layer errors, so the
aggregation is chosen on measurements. Prints one row per mixture and writes every run's risk record as JSON.

The mixture optimiser (mbs/mixture.py) relies on a different property: that a *language's* predicted damage moves
with its measured damage as the mixture changes. So, over two or more mixtures, predicted and measured values are each
centred on their language's mean over the mixtures (what is left is the mixture's effect, not the language's level)
and Spearman's ρ is taken over all (language, mixture) points.

    python benchmarks/damage_prediction.py                    # 5 runs of the default model, one seed
    python benchmarks/damage_prediction.py --mixtures mbs,uniform --seed 1
    python benchmarks/damage_prediction.py --tiny             # the tiny Llama test model, 5 languages, seconds
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIXTURES = {
    "english": ["sampler=english"],
    "mbs": ["sampler=mbs"],
    "uniform": ["sampler=uniform"],
    "sw only": ["sampler=monolingual", "sampler.language=sw"],
    "zh-Hans only": ["sampler=monolingual", "sampler.language=zh-Hans"],
}
# aggregations of a language's per-layer errors into one predicted damage (the run's own is "mean")
AGGREGATIONS = {
    "mean": lambda e: sum(e) / len(e),
    "median": statistics.median,
    "max": max,
    "last layer": lambda e: e[-1],
    "first half": lambda e: sum(e[: len(e) // 2]) / (len(e) // 2),
    "second half": lambda e: sum(e[len(e) // 2:]) / (len(e) - len(e) // 2),
}


def within_language(records: dict) -> str:
    """Spearman's ρ per aggregation between predicted and measured damage, each centred on its language's mean over
    the mixtures: does the prediction follow the mixture's effect on a language?"""
    import numpy as np

    from mbs.analyze.retention import centred, spearman

    runs = list(records.values())
    languages = sorted(set.intersection(*(set(r["risk"]["measured_log_ratio"]) & set(r["risk"]["per_layer"])
                                          for r in runs)))
    groups = np.repeat(np.arange(len(languages)), len(runs))
    measured = centred(np.array([r["risk"]["measured_log_ratio"][k] for k in languages for r in runs]), groups)
    cells = []
    for f in AGGREGATIONS.values():
        predicted = centred(np.array([f(r["risk"]["per_layer"][k]) for k in languages for r in runs]), groups)
        rho = spearman(predicted, measured) if predicted.std() > 0 and measured.std() > 0 else float("nan")
        cells.append("–" if np.isnan(rho) else f"{rho:.3f}")
    return (f"| within language, across the {len(runs)} mixtures (n = {len(languages)} languages × {len(runs)}) | "
            f"{len(languages)} | " + " | ".join(cells) + " | | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mixtures", default=",".join(MIXTURES), help="comma-separated subset of: "
                        + ", ".join(MIXTURES))
    parser.add_argument("--seed", type=int, default=0, help="the calibration sample's seed")
    parser.add_argument("--tiny", action="store_true", help="the tiny Llama test model (seconds)")
    parser.add_argument("--out", type=Path, default=None, help="where to write the runs' risk records (JSON)")
    args = parser.parse_args()
    mixtures = args.mixtures.split(",")
    unknown = [m for m in mixtures if m not in MIXTURES]
    if unknown:
        raise SystemExit(f"--mixtures: unknown {', '.join(unknown)}; allowed: {', '.join(MIXTURES)}")

    import mbs
    from mbs.analyze.damage import spearman_or_none
    from mbs.pipeline import run

    common = ["logger=none", "progress=false", "risk.predict=true", "compressor=wanda", "compressor.sparsity=0.5",
              "analysis.layers=[]",
              f"seed={args.seed}"]
    if args.tiny:
        common += ["model=tiny-llama", "sampler.segments=16", "eval.languages=[en,zh-Hans,hi,sw,yo]"]
    records = {}
    print("| mixture | languages | " + " | ".join(f"ρ {a}" for a in AGGREGATIONS) + " | risk s | compress s |")
    print("|---|---:|" + "---:|" * (len(AGGREGATIONS) + 2))
    with tempfile.TemporaryDirectory() as tmp:
        for name in mixtures:
            cfg = mbs.compose(*common, *MIXTURES[name])
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                result = run(cfg, Path(tmp) / name.replace(" ", "-"))
            risk, timings = result["risk"], result["timings"]
            measured = risk["measured_log_ratio"]
            rhos = {a: spearman_or_none({k: f(e) for k, e in risk["per_layer"].items()}, measured)
                    for a, f in AGGREGATIONS.items()}
            assert rhos["mean"] == risk["spearman"], (rhos["mean"], risk["spearman"])  # the run's own aggregation
            records[name] = {"overrides": MIXTURES[name], "spearman": rhos, "risk": risk,
                             "calibration": result["calibration"]["segments"], "timings": timings,
                             "seconds": time.perf_counter() - start}
            print(f"| {name} | {len(measured)} | " + " | ".join("–" if r is None else f"{r:.3f}" for r in rhos.values())
                  + f" | {timings['risk_s']:.1f} | {timings['compress_s']:.1f} |", flush=True)
    if len(records) > 1:
        print(within_language(records))
    out = args.out or Path(tempfile.mkdtemp(prefix="mbs-damage-")) / "damage_prediction.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"seed": args.seed, "tiny": args.tiny, "runs": records}, indent=2))
    print(f"risk records: {out}")


if __name__ == "__main__":
    main()
