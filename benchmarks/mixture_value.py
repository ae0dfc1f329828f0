"""Is the mixture `python -m mbs.mixture` chooses worth having? On the embedded default, per seed: the optimiser's
mixture for the worst-language objective over every evaluated language (predicted with Wanda 50%, the same budget as
the default sampler), then Wanda 50% and GPTQ 3-bit g128 calibrated on it, beside the MBS and the uniform mixtures of
the same seed, measured on every evaluation window.

Prints, per method and mixture, the worst language's perplexity ratio (which language), the low-resource and overall
geometric means and English's ratio, as the geometric mean over seeds with the seeds' min–max, and whether the
optimised mixture beats both others beyond the seed spread; then the optimiser's wall time beside one Wanda
compression. Runs and mixture files are kept in ``--out`` and read back on a re-run (a mixture file is reused, not
searched again: its bytes are part of the runs' experiment ids). The MBS and uniform runs have the same configs as
``benchmarks/self_calibration.py``'s UDHR runs, so with the same ``--out`` they are read back, not run again.

    python benchmarks/mixture_value.py --out DIR                # 3 seeds: 3 searches and 18 runs
    python benchmarks/mixture_value.py --seeds 0 --methods wanda
    python benchmarks/mixture_value.py --tiny                   # the tiny Llama test model, 5 languages, seconds
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from resumable import geomean, run_or_resume, subset  # noqa: E402
from self_calibration import LABELS, METHODS  # noqa: E402 - the same methods and settings, so runs are shared

MIXTURES = ("optimized", "mbs", "uniform")
PREDICTED_WITH = ["compressor=wanda", "compressor.sparsity=0.5"]  # what the optimiser predicts (GPTQ: not predictable)


def search(common: list[str], seed: int, budget: int, targets: list[str], path: Path, objective: str) -> float:
    """Write the optimiser's mixture for ``seed`` to ``path`` (kept if there: a re-run reuses it); its seconds."""
    import yaml

    from mbs.mixture import main as mixture_main

    if not path.is_file():
        argv = ["--targets", ",".join(targets), "--budget", str(budget), "--objective", objective, "--out", str(path),
                *common, *PREDICTED_WITH, f"seed={seed}"]
        with contextlib.redirect_stdout(io.StringIO()):
            code = mixture_main(argv)
        if code:
            raise SystemExit(f"python -m mbs.mixture {' '.join(argv)} failed (exit {code})")
    return float(yaml.safe_load(path.read_text())["seconds"])


def returned_start(path: Path) -> str | None:
    """The starting point (mbs or uniform) whose counts the mixture file's optimum is, if any."""
    import yaml

    body = yaml.safe_load(path.read_text())
    return next((k for k in ("mbs", "uniform") if body["starting_points"].get(k) == body["per_language"]), None)


def worst(result: dict) -> tuple[float, str]:
    row = max(result["languages"], key=lambda r: r["ratio"])
    return row["ratio"], row["language"]


def spread(values: list[float]) -> str:
    return f"x{geomean(values):.3f} [{min(values):.3f}–{max(values):.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--objective", default="worst", choices=["worst", "mean", "share-weighted"],
                        help="the search's objective (python -m mbs.mixture --objective; default worst)")
    parser.add_argument("--max-windows", type=int, default=0, help="evaluation windows per language (0: all)")
    parser.add_argument("--tiny", action="store_true", help="the tiny Llama test model (seconds)")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for the mixtures and the runs' JSON (default: a temporary one, printed); what "
                             "is already there is read, not run again")
    args = parser.parse_args()
    methods = subset(args.methods, METHODS, "--methods")
    seeds = [int(s) for s in args.seeds.split(",")]
    tag = "" if args.objective == "worst" else f"{args.objective}-"  # the worst objective's files keep their names

    import mbs
    from mbs.config import build

    common = ["logger=none", "progress=false", "analysis.layers=[]", f"eval.max_windows={args.max_windows}"]
    last = []
    if args.tiny:
        common += ["model=tiny-llama", "sampler.segments=16", "eval.languages=[en,zh-Hans,hi,sw,yo]"]
        last = ["compressor.groupsize=32"]
    run = build(mbs.compose(*common))
    targets, budget = list(run.eval.languages), run.sampler.segments
    out = args.out or Path(tempfile.mkdtemp(prefix="mbs-mixture-value-"))
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "mixtures").mkdir(parents=True, exist_ok=True)
    jobs: dict[tuple[str, str, int], dict] = {}
    search_s: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            path = out / "mixtures" / f"optimized-{tag}{seed}.yaml"
            search_s[seed] = search(common, seed, budget, targets, path, args.objective)
            print(f"seed {seed}: optimised mixture in {search_s[seed]:.0f}s ({path})", flush=True)
            samplers = {"optimized": ["sampler=optimized", f"sampler.path={path}"], "mbs": ["sampler=mbs"],
                        "uniform": ["sampler=uniform"]}
            same = returned_start(path)
            if same:  # the same counts draw the same calibration set: the start's runs are the optimum's
                print(f"seed {seed}: the search returned the {same} counts; its runs are the {same} runs", flush=True)
            for mixture in (*MIXTURES[1:], MIXTURES[0]):
                for method in methods:
                    if mixture == "optimized" and same:
                        jobs[method, mixture, seed] = jobs[method, same, seed]
                        continue
                    # the self-calibration benchmark's names for its UDHR runs: the same configs, read back
                    key = f"{method}-{mixture}-{tag if mixture == 'optimized' else ''}udhr-{seed}"
                    cfg = mbs.compose(*common, *samplers[mixture], *METHODS[method],
                                      *(last if method == "gptq" else []), f"seed={seed}")
                    result, resumed = run_or_resume(cfg, out / "runs" / f"{key}.json", Path(tmp) / key)
                    jobs[method, mixture, seed] = result
                    ratio, language = worst(result)
                    print(f"{key}: worst x{ratio:.3f} ({language}), overall x{result['summary']['geomean_ratio']:.3f}"
                          + (" (read back)" if resumed else ""), flush=True)
    report(jobs, methods, seeds, search_s, out, args.objective)


def report(jobs: dict, methods: list[str], seeds: list[int], search_s: dict[int, float], out: Path,
           objective: str = "worst") -> None:
    first = next(iter(jobs.values()))
    low = first["summary"]["low_resource_languages"]
    print(f"\nper method and mixture, over {len(seeds)} seed(s): geometric mean of the seeds [min–max]; worst = the "
          f"largest perplexity ratio of any language; the search's objective: {objective}; low-resource = "
          f"{len(low)} languages ({', '.join(low)})")
    print("| method | mixture | worst language | worst (languages) | low-resource | all languages | English |")
    print("|---|---|---:|---|---:|---:|---:|")
    figures: dict[tuple[str, str], dict[str, list[float]]] = {}
    for method in methods:
        for mixture in MIXTURES:
            runs = [jobs[method, mixture, s] for s in seeds]
            values = {"worst": [worst(r)[0] for r in runs],
                      "low": [r["summary"]["low_resource_geomean_ratio"] for r in runs],
                      "all": [r["summary"]["geomean_ratio"] for r in runs],
                      "en": [next(x["ratio"] for x in r["languages"] if x["language"] == "en") for r in runs]}
            figures[method, mixture] = values
            names = ", ".join(dict.fromkeys(worst(r)[1] for r in runs))
            print(f"| {LABELS[method]} | {mixture} | {spread(values['worst'])} | {names} | {spread(values['low'])} | "
                  f"{spread(values['all'])} | {spread(values['en'])} |")
    print()
    for method in methods:
        for key, label in (("worst", "worst language"), ("low", "low-resource"), ("all", "all languages")):
            mine = figures[method, "optimized"][key]
            others = [figures[method, m][key] for m in ("mbs", "uniform")]
            if len(seeds) < 2:
                verdict = "one seed: no spread to judge by"
            elif all(max(mine) < min(o) for o in others):
                verdict = "the optimised mixture beats MBS and uniform beyond the seed spread"
            elif any(min(mine) > max(o) for o in others):
                verdict = "the optimised mixture is worse than MBS or uniform beyond the seed spread"
            else:
                verdict = "not beyond the seed spread"
            print(f"- {LABELS[method]}, {label}: optimized {spread(mine)}, mbs {spread(others[0])}, uniform "
                  f"{spread(others[1])}: {verdict}")
    wanda = [jobs["wanda", "optimized", s]["timings"]["compress_s"] for s in seeds] if "wanda" in methods else []
    print(f"\ncost: the search took {', '.join(f'{search_s[s]:.0f}' for s in seeds)} s per seed (its first run also "
          f"collects each language's statistics, later runs read them from the model's cache)"
          + (f"; one Wanda compression took {', '.join(f'{t:.0f}' for t in wanda)} s" if wanda else ""))
    (out / f"mixture_value{'' if objective == 'worst' else '-' + objective}.json").write_text(json.dumps(
        [{"method": m, "mixture": x, "seed": s, "summary": r["summary"], "languages": r["languages"],
          "timings": r["timings"], "calibration": r["calibration"]["segments"]} for (m, x, s), r in jobs.items()],
        indent=1))
    print(f"runs and mixtures: {out}")


if __name__ == "__main__":
    main()
