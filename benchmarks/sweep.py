"""A calibration-mixture sweep of Wanda on the embedded default, three ways, measured in one process (as Hydra's
basic launcher runs a ``--multirun``): (1) independent runs as before the caches, every job evaluating the dense model
itself (``force=true``); (2) the sequential engine with the dense baseline cached; (3) ``engine.mode=cached`` (dense
baseline and per-language statistics cached). Prints every job's seconds by stage, each way's total against one
independent run, and how far the cached mode's per-language perplexities are from the sequential engine's.

Each way starts from an empty cache for dense results and statistics (the model and token caches are shared: the
converted model and the token streams are built once by whatever ran first). The similarity analysis is off in all
three (``analysis.layers=[]``): it is a dense-model result cached like the baseline.

    python benchmarks/sweep.py                       # 10 mixtures, every evaluation window
    python benchmarks/sweep.py --max-windows 2 --pool 16
    python benchmarks/sweep.py --tiny                # the tiny Llama test model, seconds
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
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
    "temperature 0.3": ["sampler=temperature", "sampler.alpha=0.3"],
    "temperature 0.5": ["sampler=temperature", "sampler.alpha=0.5"],
    "temperature 0.7": ["sampler=temperature", "sampler.alpha=0.7"],
    "zh-Hans only": ["sampler=monolingual", "sampler.language=zh-Hans"],
    "hi only": ["sampler=monolingual", "sampler.language=hi"],
    "sw only": ["sampler=monolingual", "sampler.language=sw"],
    "yo only": ["sampler=monolingual", "sampler.language=yo"],
}
WAYS = {
    "independent (each job evaluates the dense model)": ["force=true"],
    "sequential, dense baseline cached": [],
    "cached mode": ["engine.mode=cached"],
}
STAGES = ("data_s", "load_s", "fingerprint_s", "eval_dense_s", "compress_s", "eval_compressed_s")


def shared_cache(user_root: Path, scratch: Path) -> Path:
    """A cache root with the user's model and token entries linked in, and no dense results or statistics."""
    scratch.mkdir(parents=True)
    for entry in user_root.iterdir() if user_root.is_dir() else []:
        if entry.name not in ("dense", "statistics") and not entry.name.startswith("."):
            (scratch / entry.name).symlink_to(entry.resolve())
    return scratch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-windows", type=int, default=0, help="evaluation windows per language (0: all)")
    parser.add_argument("--pool", type=int, default=0, help="also the cached mode with this engine.statistics_pool")
    parser.add_argument("--mixtures", default=",".join(MIXTURES), help="comma-separated subset of: " +
                        ", ".join(MIXTURES))
    parser.add_argument("--tiny", action="store_true", help="the tiny Llama test model (seconds)")
    parser.add_argument("--out", type=Path, default=None, help="write every job's results summary as JSON here")
    args = parser.parse_args()
    mixtures = args.mixtures.split(",")
    unknown = [m for m in mixtures if m not in MIXTURES]
    if unknown:
        raise SystemExit(f"--mixtures: unknown {', '.join(unknown)}; allowed: {', '.join(MIXTURES)}")

    import mbs
    from mbs.cache import cache_dir
    from mbs.pipeline import run

    common = ["logger=none", "progress=false", "compressor=wanda", "analysis.layers=[]",
              f"eval.max_windows={args.max_windows}"]
    if args.pool:
        WAYS[f"cached mode, statistics_pool={args.pool}"] = ["engine.mode=cached", f"engine.statistics_pool={args.pool}"]
    if args.tiny:
        common += ["model=tiny-llama", "sampler.segments=32", "eval.languages=[en,zh-Hans,hi,sw,yo]"]
    user_root = cache_dir(mbs.configure(*common).model.cache_dir)
    results: dict[str, dict[str, dict]] = {}
    totals: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for w, (way, overrides) in enumerate(WAYS.items()):
            os.environ["MBS_CACHE"] = str(shared_cache(user_root, Path(tmp) / f"cache{w}"))
            results[way] = {}
            start = time.perf_counter()
            for m, mixture in enumerate(mixtures):
                cfg = mbs.compose(*common, *MIXTURES[mixture], *overrides)
                with contextlib.redirect_stdout(io.StringIO()):
                    results[way][mixture] = run(cfg, Path(tmp) / f"way{w}" / str(m))
                t = results[way][mixture]["timings"]
                print(f"{way} | {mixture}: {t['total_s']:.1f}s (" + ", ".join(
                    f"{k[:-2]} {t.get(k, 0.0):.1f}" for k in STAGES) + ")", flush=True)
            totals[way] = time.perf_counter() - start
    report(results, totals, mixtures, args)


def report(results: dict, totals: dict, mixtures: list[str], args) -> None:
    independent, sequential = (results[w] for w in list(WAYS)[:2])
    one_run = independent[mixtures[0]]["timings"]["total_s"]
    print(f"\none independent run ({mixtures[0]}): {one_run:.1f}s")
    print("| way | total s | x one independent run | x the independent runs' total |")
    print("|---|---:|---:|---:|")
    first = totals[next(iter(WAYS))]
    for way, total in totals.items():
        print(f"| {way} | {total:.1f} | {total / one_run:.2f} | {total / first:.2f} |")
    for way in WAYS:
        s = {k: sum(r["timings"].get(k, 0.0) for r in results[way].values()) for k in STAGES}
        print(f"{way}: " + ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in s.items()))
    for way in list(WAYS)[2:]:
        compare(way, sequential, results[way], mixtures)
    same = all(independent[m]["languages"] == sequential[m]["languages"] for m in mixtures)
    print(f"independent and sequential-with-cached-baseline tables identical: {same}")
    if args.out:
        args.out.write_text(json.dumps({"totals": totals, "jobs": {w: {m: {"timings": r["timings"],
                                        "summary": r["summary"], "languages": r["languages"],
                                        "compression": {k: v for k, v in r["compression"].items() if k != "layers"}}
                                        for m, r in jobs.items()} for w, jobs in results.items()}}, indent=1))


def compare(way: str, sequential: dict, cached: dict, mixtures: list[str]) -> None:
    print(f"\n{way} vs the sequential engine: geometric-mean ratio over languages, and the per-language "
          "|log(cached ppl / sequential ppl)|")
    print("| mixture | sequential | cached | median per-language difference | largest (language) |")
    print("|---|---:|---:|---:|---:|")
    all_diffs = []
    for mixture in mixtures:
        seq = {r["language"]: r["compressed_ppl"] for r in sequential[mixture]["languages"]}
        cac = {r["language"]: r["compressed_ppl"] for r in cached[mixture]["languages"]}
        diffs = {k: abs(math.log(cac[k] / seq[k])) for k in seq}
        all_diffs += diffs.values()
        worst = max(diffs, key=diffs.get)
        print(f"| {mixture} | x{sequential[mixture]['summary']['geomean_ratio']:.3f} | "
              f"x{cached[mixture]['summary']['geomean_ratio']:.3f} | {statistics.median(diffs.values()):.3f} | "
              f"{diffs[worst]:.3f} ({worst}) |")
    print(f"all mixtures and languages: median {statistics.median(all_diffs):.3f}, largest {max(all_diffs):.3f} "
          f"(0.01 = 1% perplexity)")


if __name__ == "__main__":
    main()
