"""Reload a run's exported checkpoint (``save_model=true``) with transformers and evaluate every language again on the
run's own evaluation windows: prints the in-memory compressed perplexity (results.json) next to the reloaded one, and
the checkpoint's bytes on disk next to the dense size.

    python benchmarks/export_roundtrip.py /work/runs/issue13/gptq4-g128 [--languages en,sw]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import OmegaConf  # noqa: E402

import mbs  # noqa: E402
from mbs.models.loading import torch_dtype  # noqa: E402
from mbs.pipeline import prepare  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--languages", default="", help="comma-separated subset of the run's languages (default all)")
    args = parser.parse_args()
    results = json.loads((args.run_dir / "results.json").read_text())
    overrides = OmegaConf.load(args.run_dir / ".hydra" / "overrides.yaml")
    prepared = prepare(mbs.compose(*overrides))  # the run's own config, hence its evaluation windows
    t0 = time.perf_counter()
    model = mbs.load_exported(args.run_dir / "model", torch_dtype(prepared.run.model.dtype))
    load_s = time.perf_counter() - t0
    wanted = args.languages.split(",") if args.languages else list(prepared.windows)
    windows = {k: prepared.windows[k] for k in wanted}
    reloaded = mbs.perplexity(model, windows, batch_size=prepared.run.eval.batch_size,
                              chunk_tokens=prepared.run.eval.chunk_tokens)
    print(f"reloaded {args.run_dir / 'model'} in {load_s:.1f}s")
    print("| language | in-memory compressed ppl | reloaded ppl | relative difference |")
    print("|---|---:|---:|---:|")
    worst = 0.0
    for row in [r for r in results["languages"] if r["language"] in windows]:
        before, after = row["compressed_ppl"], reloaded[row["language"]].perplexity
        worst = max(worst, abs(after - before) / before)
        print(f"| {row['language']} | {before:.4f} | {after:.4f} | {abs(after - before) / before:.1e} |")
    print(f"largest relative difference: {worst:.1e}")
    e = results["export"]
    mb = 1e6
    print(f"format {e['format']}; kept dense: {e['kept_dense']}")
    print(f"on disk {e['bytes_on_disk'] / mb:.1f} MB (weights {e['weights_bytes'] / mb:.1f} MB) vs dense "
          f"{e['dense_bytes'] / mb:.1f} MB {e['dtype']}: {e['weights_to_dense']:.3f}; without the embeddings "
          f"({e['embedding_bytes'] / mb:.1f} MB, dense in both) {(e['weights_bytes'] - e['embedding_bytes']) / mb:.1f}"
          f" MB vs {(e['dense_bytes'] - e['embedding_bytes']) / mb:.1f} MB: {e['non_embedding_to_dense']:.3f}")


if __name__ == "__main__":
    main()
