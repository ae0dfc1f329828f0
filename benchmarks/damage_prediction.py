"""Does the predicted damage (mbs/analyze/damage.py) order languages as the measured damage does? On the embedded
default with Wanda 50%, one run per calibration mixture (English-only, MBS, uniform and two single-language ones) and
seed, Spearman's ρ across the evaluated languages between each language's predicted damage (before compressing, from
calibration text: what ``risk.predict=true`` records, computed by the same function on the same dense model) and its
measured log perplexity ratio (evaluation windows), within each mixture. Beside the predicted log ratio it scores the
relative output error (no forward), aggregated over layers in several ways, so the predictor and the aggregation are
chosen on measurements. Prints one row per mixture and seed and writes every run's risk record as JSON.

The mixture optimiser (mbs/mixture.py) relies on a different property: that a *language's* predicted damage moves
with its measured damage as the mixture changes. So, over two or more runs, the language means and the run means are
removed from both (two-way fixed effects: what is left is how a run changes this language beyond what it does to
every language) and Spearman's ρ is taken over all (language, run) points, with a CI resampling languages.

    python benchmarks/damage_prediction.py --out DIR          # 5 runs of the default model, seed 0
    python benchmarks/damage_prediction.py --mixtures mbs,uniform --seeds 0,1,2 --out DIR
    python benchmarks/damage_prediction.py --tiny             # the tiny Llama test model, 5 languages, seconds

Runs are kept in ``--out`` and read back on a re-run; the MBS and uniform runs have the same configs and names as
``benchmarks/self_calibration.py``'s Wanda UDHR runs, so with the same ``--out`` they are read back, not run again.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from resumable import run_or_resume, subset  # noqa: E402

from mbs.analyze.damage import spearman_or_none  # noqa: E402

MIXTURES = {  # keys name the runs (<method>-<mixture>-udhr-<seed>, spaces as dashes), as self_calibration.py does
    "english": ["sampler=english"],
    "mbs": ["sampler=mbs"],
    "uniform": ["sampler=uniform"],
    "sw only": ["sampler=monolingual", "sampler.language=sw"],
    "zh-Hans only": ["sampler=monolingual", "sampler.language=zh-Hans"],
}
# aggregations of a language's per-layer output errors into one figure (the record's output_error is "mean")
AGGREGATIONS = {
    "mean": lambda e: sum(e) / len(e),
    "median": statistics.median,
    "max": max,
    "last layer": lambda e: e[-1],
    "first half": lambda e: sum(e[: len(e) // 2]) / (len(e) // 2),
    "second half": lambda e: sum(e[len(e) // 2:]) / (len(e) - len(e) // 2),
}


PREDICTORS = ("predicted", "extrapolated", *AGGREGATIONS)  # log ratio, extrapolated, output error's aggregations


def extrapolated(records: dict, target: tuple[str, int], anchor: tuple[str, int]) -> dict[str, float]:
    """The target run's damage extrapolated from the anchor run's as the mixture search does it
    (DamagePredictor.extrapolate): the anchor's predicted log ratio times the ratio of the output errors."""
    a, t = records[anchor]["risk"], records[target]["risk"]
    return {k: a["predicted"][k] * t["output_error"][k] / a["output_error"][k] for k in t["predicted"]}


def anchors(records: dict) -> dict[tuple[str, int], tuple[str, int]]:
    """Each run's anchor for the extrapolated predictor: one run per seed (MBS, else uniform, else the first), as the
    search extrapolates every candidate from its one best start (the anchor's own value is its predicted one)."""
    out = {}
    for name, seed in records:
        ranked = ["mbs", "uniform", *(n for n, s in records if s == seed)]
        out[name, seed] = next((o, seed) for o in ranked if (o, seed) in records)
    return out


def extrapolation_table(records: dict) -> list[str]:
    """Spearman across languages of each run's damage extrapolated from every other run of its seed."""
    names = list(dict.fromkeys(n for n, _ in records))
    lines = ["\nextrapolated (the mixture search's predictor between probe measurements): Spearman across languages "
             "within the target run, of its damage extrapolated from the anchor run's",
             "| seed | anchor / target | " + " | ".join(names) + " |", "|---:|---|" + "---:|" * len(names)]
    for seed in dict.fromkeys(s for _, s in records):
        for anchor in names:
            if (anchor, seed) not in records:
                continue
            cells = []
            for target in names:
                if (target, seed) not in records:
                    cells.append("")
                    continue
                rho = spearman_or_none(extrapolated(records, (target, seed), (anchor, seed)),
                                       records[target, seed]["risk"]["measured_log_ratio"])
                cells.append("–" if rho is None else f"{rho:.3f}")
            lines.append(f"| {seed} | {anchor} | " + " | ".join(cells) + " |")
    return lines


def within_language(records: dict, n_resamples: int) -> list[str]:
    """Per predictor, Spearman's ρ between predicted and measured damage after removing each language's level and
    each run's level (two-way fixed effects, mbs/analyze/retention.py's two_way_correlation, 95% CI resampling
    languages): does the prediction follow how a mixture changes *this* language's damage beyond what it does to
    every language?"""
    import pandas as pd

    from mbs.analyze.retention import estimate_text, two_way_correlation

    anchor = anchors(records)
    # retention.py's metric is the log retention, -log ratio: its correlations with damage are negated back below
    rows = [{"experiment_id": f"{name}-{seed}", "language": k, "seed": seed, "log_retention": -measured,
             "predicted": r["risk"]["predicted"][k],
             "extrapolated": extrapolated(records, (name, seed), anchor[name, seed])[k],
             **{a: f(r["risk"]["per_layer"][k]) for a, f in AGGREGATIONS.items()}}
            for (name, seed), r in records.items() for k, measured in r["risk"]["measured_log_ratio"].items()]
    df = pd.DataFrame(rows)
    languages = df["language"].nunique()
    lines = [f"\nwithin language and run ({len(records)} runs, {languages} languages, n = {len(df)} points): "
             f"Spearman of predicted vs measured after removing each run's mean and each language's mean within "
             f"each seed (its probe and calibration text are the seed's), 95% CI resampling languages "
             f"({n_resamples} resamples); extrapolated: every run of a seed from its MBS run's prediction",
             "| predictor | ρ [95% CI] |", "|---|---:|"]
    for a in PREDICTORS:
        c = two_way_correlation(df, a, f"predicted damage ({a})", n_resamples=n_resamples, within="seed")
        label = {"predicted": "predicted log ratio", "extrapolated": "extrapolated log ratio"}.get(
            a, f"output error ({a})")
        lines.append(f"| {label} | "
                     f"{estimate_text(-c.spearman, (-c.spearman_ci[1], -c.spearman_ci[0]), languages, 3)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mixtures", default=",".join(MIXTURES), help="comma-separated subset of: "
                        + ", ".join(MIXTURES))
    parser.add_argument("--seeds", default="0", help="comma-separated seeds of the calibration sample")
    parser.add_argument("--probe", type=int, default=None,
                        help="probe segments per language (risk.probe; default: the run config's)")
    parser.add_argument("--tiny", action="store_true", help="the tiny Llama test model (seconds)")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for the runs and the risk records (default: a temporary one, printed); runs "
                             "already there are read, not run again")
    args = parser.parse_args()
    mixtures = subset(args.mixtures, MIXTURES, "--mixtures")
    seeds = [int(s) for s in args.seeds.split(",")]

    import mbs
    from mbs.fingerprint import weights_fingerprint
    from mbs.models.loading import load_model
    from mbs.pipeline import predict_risk, prepare

    # the self-calibration benchmark's UDHR runs' overrides (risk.* is not part of the experiment id)
    common = ["logger=none", "progress=false", "analysis.layers=[]", "eval.max_windows=0", "compressor=wanda",
              "compressor.sparsity=0.5"]
    if args.tiny:
        common += ["model=tiny-llama", "sampler.segments=16", "eval.languages=[en,zh-Hans,hi,sw,yo]"]
    if args.probe is not None:  # risk.* is not part of the experiment id: the runs are read back
        common.append(f"risk.probe={args.probe}")
    out = args.out or Path(tempfile.mkdtemp(prefix="mbs-damage-"))
    (out / "runs").mkdir(parents=True, exist_ok=True)
    records, model, weights = {}, None, None
    print("| mixture | seed | languages | ρ predicted log ratio | "
          + " | ".join(f"ρ output error {a}" for a in AGGREGATIONS) + " | risk s | compress s |")
    print("|---|---:|---:|" + "---:|" * (len(AGGREGATIONS) + 3))
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for name in mixtures:
                cfg = mbs.compose(*common, *MIXTURES[name], f"seed={seed}")
                key = f"wanda-{name.replace(' ', '-')}-udhr-{seed}"
                result, _ = run_or_resume(cfg, out / "runs" / f"{key}.json", Path(tmp) / key)
                prepared = prepare(cfg)
                if model is None:  # the dense weights do not depend on the mixture or the calibration seed
                    model = load_model(prepared.run.model, seed=prepared.run.seed)
                    weights = weights_fingerprint(model)
                start = time.perf_counter()
                risk = predict_risk(model, prepared, weights)
                risk_s = time.perf_counter() - start
                measured = {r["language"]: r["log_ratio"] for r in result["languages"] if r["language"] in
                            risk["predicted"]}
                risk["measured_log_ratio"] = measured
                rhos = {"predicted": spearman_or_none(risk["predicted"], measured),
                        **{a: spearman_or_none({k: f(e) for k, e in risk["per_layer"].items()}, measured)
                           for a, f in AGGREGATIONS.items()}}
                records[name, seed] = {"overrides": MIXTURES[name], "seed": seed, "spearman": rhos, "risk": risk,
                                       "calibration": result["calibration"]["segments"],
                                       "timings": {**result["timings"], "risk_s": risk_s}}
                print(f"| {name} | {seed} | {len(measured)} | "
                      + " | ".join("–" if r is None else f"{r:.3f}" for r in rhos.values())
                      + f" | {risk_s:.1f} | {result['timings']['compress_s']:.1f} |", flush=True)
    if len(records) > 1:
        print("\n".join(within_language(records, 1000 if args.tiny else 10_000)))
        print("\n".join(extrapolation_table(records)))
    probes = {r["risk"]["probe_segments_per_language"] for r in records.values()}
    print(f"predicted log ratio on {', '.join(map(str, sorted(probes)))} probe segment(s) per language (risk.probe)")
    path = out / "damage_prediction.json"
    path.write_text(json.dumps({"tiny": args.tiny, "runs": [{"mixture": n, **r} for (n, _), r in records.items()]},
                               indent=2))
    print(f"risk records: {path}")


if __name__ == "__main__":
    main()
