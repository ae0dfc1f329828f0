"""Weight quantizers by calibration language, measured per language: AWQ and GPTQ (groups of 128, zero point) with
English-only, MBS and uniform calibration, beside RTN (data-free: one run per bit width), at 4 and 3 bits, on the
embedded default, every evaluation window. Prints the geometric-mean perplexity ratio over all languages and over the
low-resource ones per run, and every language's ratio; writes every run's summary as JSON.

    python benchmarks/quantizers.py                          # 2 x 3 calibrations x 2 bit widths + 2 RTN = 14 runs
    python benchmarks/quantizers.py --methods awq --bits 4 --calibrations mbs
    python benchmarks/quantizers.py --tiny                   # the tiny Llama test model, 5 languages, seconds
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

from resumable import run_or_resume, subset  # noqa: E402

METHODS = {"awq": ["compressor=awq"], "gptq": ["compressor=gptq"], "rtn": ["compressor=rtn", "compressor.groupsize=128"]}
DATA_FREE = {"rtn"}  # one run per bit width: the calibration changes nothing
CALIBRATIONS = {"english": ["sampler=monolingual", "sampler.language=en"], "mbs": ["sampler=mbs"],
                "uniform": ["sampler=uniform"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--calibrations", default=",".join(CALIBRATIONS),
                        help="comma-separated subset of: " + ", ".join(CALIBRATIONS))
    parser.add_argument("--bits", default="4,3", help="comma-separated bit widths")
    parser.add_argument("--max-windows", type=int, default=0, help="evaluation windows per language (0: all)")
    parser.add_argument("--tiny", action="store_true", help="the tiny Llama test model (seconds)")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for the runs' JSON (default: a temporary one, printed); runs already in "
                             "<out>/runs are read, not run again")
    args = parser.parse_args()
    methods = subset(args.methods, METHODS, "--methods")
    calibrations = subset(args.calibrations, CALIBRATIONS, "--calibrations")
    bits = [int(b) for b in args.bits.split(",")]

    import mbs

    common = ["logger=none", "progress=false", "analysis.layers=[]", f"eval.max_windows={args.max_windows}"]
    last = []  # after the method's own settings
    if args.tiny:
        common += ["model=tiny-llama", "sampler.segments=16", "eval.languages=[en,zh-Hans,hi,sw,yo]"]
        last = ["compressor.groupsize=32"]
    out = args.out or Path(tempfile.mkdtemp(prefix="mbs-quantizers-"))
    (out / "runs").mkdir(parents=True, exist_ok=True)
    jobs: dict[tuple[str, int, str], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for b in bits:
            for method in methods:
                for calibration in (calibrations[:1] if method in DATA_FREE else calibrations):
                    key = f"{method}-{b}-{'any' if method in DATA_FREE else calibration}"
                    cfg = mbs.compose(*common, *CALIBRATIONS[calibration], *METHODS[method], f"compressor.bits={b}",
                                      *last)
                    start = time.perf_counter()
                    result, resumed = run_or_resume(cfg, out / "runs" / f"{key}.json", Path(tmp) / key)
                    jobs[method, b, "any" if method in DATA_FREE else calibration] = result
                    s = result["summary"]
                    print(f"{key}: x{s['geomean_ratio']:.3f} (low-resource x{s['low_resource_geomean_ratio']:.3f}), "
                          f"compression {result['timings']['compress_s']:.0f}s"
                          + (" (read back)" if resumed else f", run {time.perf_counter() - start:.0f}s"), flush=True)
    report(jobs)
    (out / "quantizers.json").write_text(json.dumps(
        [{"method": m, "bits": b, "calibration": c, "summary": r["summary"], "languages": r["languages"],
          "compression_seconds": r["timings"]["compress_s"]} for (m, b, c), r in jobs.items()], indent=1))
    print(f"\nruns: {out}")


def report(jobs: dict) -> None:
    first = next(iter(jobs.values()))["summary"]
    print(f"\ngeometric-mean perplexity ratio (compressed / dense); low-resource = "
          f"{len(first['low_resource_languages'])} languages with training share below "
          f"{100 * first['low_resource_share']:g}%"
          f" ({', '.join(first['low_resource_languages'])})")
    print("| method | bits | calibration | all languages | low-resource | compression s |")
    print("|---|---:|---|---:|---:|---:|")
    for (m, b, c), r in jobs.items():
        s = r["summary"]
        print(f"| {m} | {b} | {c} | x{s['geomean_ratio']:.3f} | x{s['low_resource_geomean_ratio']:.3f} | "
              f"{r['timings']['compress_s']:.0f} |")
    rows = sorted(first_rows(jobs), key=lambda r: -(r.get("training_share") or 0.0))
    keys = list(jobs)
    print("\nper language (ratio), languages by training share:")
    print("| language | " + " | ".join(f"{m} {b}b {c}" for m, b, c in keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for row in rows:
        lang = row["language"]
        cells = [next(x["ratio"] for x in jobs[k]["languages"] if x["language"] == lang) for k in keys]
        print(f"| {lang} | " + " | ".join(f"{v:.3f}" for v in cells) + " |")


def first_rows(jobs: dict) -> list[dict]:
    return next(iter(jobs.values()))["languages"]


if __name__ == "__main__":
    main()
