"""Dense per-language perplexity with 1 and 2 threads in each evaluation precision (eval.dtype): ``model`` (body and
head matrix products in bf16, the loss in fp32 from bf16-rounded logits), ``float32-head`` (the default: a bf16 body,
the logits formed from its hidden states in fp32) and ``float32`` (every weight cast to fp32 for the evaluation).
Each thread count runs in its own process (OMP_NUM_THREADS is read when torch starts); prints every language's perplexity per precision and thread count, how
many differ between thread counts and by how much, and the seconds each evaluation took.

    python benchmarks/eval_threads.py                          # Gemma 3 270M (cached in ~/.cache/mbs), 20 languages
    python benchmarks/eval_threads.py --languages en,hi,bn --threads 1,2
    python benchmarks/eval_threads.py --tiny                   # the tiny Gemma 3 test model, seconds
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRECISIONS = ("model", "float32-head", "float32")  # eval.dtype: bf16 throughout, fp32 logits, fp32 weights


def child(args: argparse.Namespace) -> None:
    """One thread count: every precision on the same windows, as JSON on the last line of stdout."""
    from hydra import compose, initialize_config_dir

    from mbs.config import register
    from mbs.evaluate.perplexity import evaluate_languages
    from mbs.models.loading import load_model
    from mbs.pipeline import prepare

    register()
    root = Path(__file__).resolve().parents[1]
    overrides = [f"model={'tiny-gemma3' if args.tiny else args.model}", "logger=none"]
    with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    prepared = prepare(cfg)
    languages = args.languages.split(",") if args.languages else list(prepared.windows)
    windows = {lang: prepared.windows[lang] for lang in languages}
    model = load_model(prepared.run.model, seed=0)
    batch_size, chunk = prepared.run.eval.batch_size, prepared.run.eval.chunk_tokens
    evaluate_languages(model, {languages[0]: windows[languages[0]][:1]}, "cpu", batch_size, chunk, progress=False,
                       dtype="model")
    out = {"threads": torch.get_num_threads(), "model": prepared.run.model.name,
           "dtype": str(next(model.parameters()).dtype), "tokens": sum(w.numel() - 1 for ws in windows.values()
                                                                         for w in ws), "results": {}}
    for precision in PRECISIONS:
        start = time.perf_counter()
        result = evaluate_languages(model, windows, "cpu", batch_size, chunk, progress=False, dtype=precision)
        seconds = time.perf_counter() - start
        out["results"][precision] = {"seconds": seconds, "ppl": {k: v.perplexity for k, v in result.items()}}
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma3-270m", help="a conf/model option (default gemma3-270m)")
    parser.add_argument("--tiny", action="store_true", help="the tiny Gemma 3 test model instead")
    parser.add_argument("--languages", default="", help="comma-separated evaluation languages (default: the run's 20)")
    parser.add_argument("--threads", default="1,2", help="thread counts, one process each (default 1,2)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    runs = []
    for threads in args.threads.split(","):
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        command = [sys.executable, __file__, "--child", "--model", args.model, "--languages", args.languages]
        done = subprocess.run(command + (["--tiny"] if args.tiny else []), env=env, check=True, capture_output=True,
                              text=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    first = runs[0]
    print(f"model {first['model']} ({first['dtype']}), {first['tokens']} predicted tokens, "
          f"torch {torch.__version__}, threads {[r['threads'] for r in runs]}")
    header = "| language | " + " | ".join(f"{p} {r['threads']}t" for p in PRECISIONS for r in runs) + " |"
    print(header)
    print("|---|" + "---:|" * (len(PRECISIONS) * len(runs)))
    for lang in first["results"][PRECISIONS[0]]["ppl"]:
        cells = [f"{r['results'][p]['ppl'][lang]:.4f}" for p in PRECISIONS for r in runs]
        print(f"| {lang} | " + " | ".join(cells) + " |")
    for p in PRECISIONS:
        a, b = runs[0]["results"][p]["ppl"], runs[-1]["results"][p]["ppl"]
        rel = {k: abs(a[k] - b[k]) / a[k] for k in a}
        differ = [k for k in a if a[k] != b[k]]
        worst = max(rel, key=rel.get)
        geo = {r["threads"]: math.exp(sum(math.log(v) for v in r["results"][p]["ppl"].values()) / len(a))
               for r in runs}
        fp32 = runs[0]["results"]["float32"]["ppl"]
        off = max(abs(a[k] - fp32[k]) / fp32[k] for k in a)
        seconds = ", ".join(f"{r['results'][p]['seconds']:.1f} s ({r['threads']}t)" for r in runs)
        print(f"{p}: {len(differ)} of {len(a)} languages differ between {runs[0]['threads']} and "
              f"{runs[-1]['threads']} threads, largest {rel[worst]:.2e} relative ({worst}); geometric mean "
              f"{', '.join(f'{v:.4f} ({t}t)' for t, v in geo.items())}; largest distance from fp32 "
              f"({runs[0]['threads']}t) {off:.2e}; evaluation {seconds}")


if __name__ == "__main__":
    main()
