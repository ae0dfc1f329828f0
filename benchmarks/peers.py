"""Side by side with llm-compressor (``oneshot``: Wanda, SparseGPT, GPTQ W4A16, AWQ W4A16 asymmetric) on the same model, the very same
calibration token ids (the run's MBS mixture) and the same evaluation windows, on this machine: compression wall time
and per-language perplexity after compression, for each method. Both sides are evaluated here, by the project's own
evaluation, so only the compression differs.

llm-compressor pins its own transformers, so it runs in a virtual environment this script creates (``--venv``,
default ``~/.cache/mbs/bench/llmcompressor-<version>``: torch is installed first at the project's version, so pip
never fetches a CUDA build), never in the project's. It loads the dense model from the converted checkpoint MBS
caches, and hands back the effective weights of every compressed Linear (benchmarks/llmcompressor_worker.py).

    python benchmarks/peers.py                        # Gemma 3 270M, the default run's calibration and windows
    python benchmarks/peers.py --methods gptq --max-windows 4
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mbs  # noqa: E402
from mbs.compress.engine import EngineConfig  # noqa: E402
from mbs.evaluate.baseline import DenseResults  # noqa: E402
from mbs.fingerprint import weights_fingerprint  # noqa: E402
from mbs.models.loading import _converted_name, load_model, model_cache  # noqa: E402
from mbs.pipeline import dense_perplexity, prepare  # noqa: E402

LLMCOMPRESSOR = "0.14.0.1"
OURS = {  # the same settings as llm-compressor's modifiers in the worker
    "wanda": mbs.Wanda(sparsity=0.5),
    "sparsegpt": mbs.SparseGPT(sparsity=0.5, percdamp=0.01, blocksize=128),
    "gptq": mbs.GPTQ(bits=4, sym=True, groupsize=128, actorder=True, static_groups=True, percdamp=0.01, blocksize=128),
    # 4-bit, zero point, g128 on both sides; each keeps its own search (llm-compressor: duo scaling, no clip search)
    "awq": mbs.AWQ(bits=4, sym=False, groupsize=128),
}


GPTQ_SETTINGS = {  # MBS only, beside the llm-compressor setting (sym, act-order, static groups) measured above
    "sym, plain column order": mbs.GPTQ(bits=4, sym=True, groupsize=128, actorder=False, static_groups=False),
    "asym, plain column order": mbs.GPTQ(bits=4, sym=False, groupsize=128, actorder=False, static_groups=False),
    "asym, act-order, static groups (compressor=gptq default)": lambda: mbs.configure("compressor=gptq").compressor,
}


def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not (venv / ".mbs-ready").exists():
        print(f"creating {venv} (llmcompressor=={LLMCOMPRESSOR}, torch=={torch.__version__.split('+')[0]})",
              flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, f"torch=={torch.__version__.split('+')[0]}"], check=True)
        subprocess.run([*pip, f"llmcompressor=={LLMCOMPRESSOR}"], check=True)
        (venv / ".mbs-ready").write_text(LLMCOMPRESSOR)
    return python


def geomean_ratio(dense: dict, compressed: dict) -> float:
    logs = [math.log(compressed[k].perplexity / dense[k].perplexity) for k in dense]
    return math.exp(sum(logs) / len(logs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="wanda,sparsegpt,gptq", help="comma-separated: " + ", ".join(OURS))
    parser.add_argument("--max-windows", type=int, default=0, help="evaluation windows per language (0: all)")
    parser.add_argument("--venv", type=Path, default=Path.home() / ".cache" / "mbs" / "bench" /
                        f"llmcompressor-{LLMCOMPRESSOR}")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in OURS]
    if unknown:
        raise SystemExit(f"--methods: unknown {', '.join(unknown)}; allowed: {', '.join(OURS)}")
    python = ensure_venv(args.venv)

    prepared = prepare(mbs.compose("logger=none", "progress=false", f"eval.max_windows={args.max_windows}"))
    run, spec = prepared.run, prepared.run.model
    dense_model = load_model(spec)
    dense_results = DenseResults(model_cache(spec), weights_fingerprint(dense_model))
    dense, _ = dense_perplexity(dense_results, lambda: mbs.perplexity(dense_model, prepared.windows, batch_size=run.eval.batch_size,
                                                                        chunk_tokens=run.eval.chunk_tokens),
                                dense_model, prepared.windows, run)
    model_dir = model_cache(spec).lookup(_converted_name(spec))
    ids = torch.cat([t for t in prepared.calibration.segments.values() if t.numel()])
    print(f"{spec.name} ({spec.dtype}; dense = de-quantized {spec.gguf_file}), {ids.shape[0]} calibration segments x "
          f"{ids.shape[1]} tokens (MBS mixture), {sum(len(w) for w in prepared.windows.values())} evaluation windows "
          f"of {len(prepared.windows)} languages, {torch.get_num_threads()} threads", flush=True)
    figures = {"dense": {k: v.perplexity for k, v in dense.items()}, "methods": {}}
    with tempfile.TemporaryDirectory() as tmp:
        from safetensors.torch import load_file, save_file

        save_file({"input_ids": ids.contiguous()}, f"{tmp}/calibration.safetensors")
        for method in methods:
            ours_model = copy.deepcopy(dense_model)
            t0 = time.perf_counter()
            mbs.compress_model(ours_model, OURS[method], prepared.calibration, EngineConfig())
            ours_s = time.perf_counter() - t0
            ours = mbs.perplexity(ours_model, prepared.windows, chunk_tokens=run.eval.chunk_tokens)
            del ours_model
            env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
            proc = subprocess.run([str(python), str(ROOT / "benchmarks" / "llmcompressor_worker.py"), str(model_dir),
                                   f"{tmp}/calibration.safetensors", method, f"{tmp}/{method}.safetensors",
                                   f"{tmp}/{method}.json"], env=env, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"llm-compressor {method} failed:\n{proc.stderr[-3000:]}")
            peer_info = json.loads(Path(f"{tmp}/{method}.json").read_text())
            peer_model = copy.deepcopy(dense_model)
            weights = load_file(f"{tmp}/{method}.safetensors")
            unexpected = peer_model.load_state_dict(weights, strict=False).unexpected_keys
            if unexpected or len(weights) != peer_info["modules"]:
                raise SystemExit(f"llm-compressor weights do not fit the model: {unexpected[:3]}")
            check_compressed(method, weights)
            peer = mbs.perplexity(peer_model, prepared.windows, chunk_tokens=run.eval.chunk_tokens)
            del peer_model
            row = {"ours_s": ours_s, "llmcompressor_s": peer_info["seconds"],
                   "ours_geomean_ratio": geomean_ratio(dense, ours), "llmcompressor_geomean_ratio":
                   geomean_ratio(dense, peer), "ours": {k: v.perplexity for k, v in ours.items()},
                   "llmcompressor": {k: v.perplexity for k, v in peer.items()}, "peer": peer_info}
            figures["methods"][method] = row
            print(f"{method}: ours {ours_s:.1f}s x{row['ours_geomean_ratio']:.3f} | llm-compressor "
                  f"{peer_info['seconds']:.1f}s x{row['llmcompressor_geomean_ratio']:.3f} | speed-up "
                  f"{peer_info['seconds'] / ours_s:.2f}x", flush=True)
        if "gptq" in methods:  # which GPTQ settings MBS defaults to: measured here, on the same windows
            for label, compressor in GPTQ_SETTINGS.items():
                model = copy.deepcopy(dense_model)
                mbs.compress_model(model, compressor() if callable(compressor) else compressor, prepared.calibration,
                                   EngineConfig())
                loss = mbs.perplexity(model, prepared.windows, chunk_tokens=run.eval.chunk_tokens)
                figures.setdefault("gptq_settings", {})[label] = geomean_ratio(dense, loss)
                print(f"GPTQ 4-bit g128, {label}: x{figures['gptq_settings'][label]:.3f}", flush=True)
    print_tables(figures, methods)
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1))


def check_compressed(method: str, weights: dict[str, torch.Tensor]) -> None:
    """The peer's weights are what its method promises (so a silently skipped module cannot look like a result)."""
    for name, w in weights.items():
        if "norm" in name:  # AWQ's folded scales: not compressed
            continue
        if method in ("wanda", "sparsegpt"):
            share = float((w == 0).float().mean())
            if abs(share - 0.5) > 0.01:
                raise SystemExit(f"llm-compressor {method}: {name} has sparsity {share:.3f}, not 0.5")
        else:
            groups = w.float().reshape(w.shape[0], -1, 128)
            distinct = max(len(torch.unique(g)) for g in groups[:8].reshape(-1, 128))
            if distinct > 16:
                raise SystemExit(f"llm-compressor {method}: {name} has {distinct} values in a group of 128 (4-bit: 16)")


def print_tables(figures: dict, methods: list[str]) -> None:
    print("\n| method | MBS s | llm-compressor s | speed-up | MBS geometric-mean ratio | llm-compressor |")
    print("|---|---:|---:|---:|---:|---:|")
    for m in methods:
        r = figures["methods"][m]
        print(f"| {m} | {r['ours_s']:.1f} | {r['llmcompressor_s']:.1f} | {r['llmcompressor_s'] / r['ours_s']:.2f}x | "
              f"x{r['ours_geomean_ratio']:.3f} | x{r['llmcompressor_geomean_ratio']:.3f} |")
    print("\nper-language perplexity after compression (dense | MBS / llm-compressor per method)")
    print("| language | dense | " + " | ".join(f"{m} MBS | {m} llmc" for m in methods) + " |")
    print("|---|---:|" + "---:|---:|" * len(methods))
    for lang, d in figures["dense"].items():
        cells = " | ".join(f"{figures['methods'][m]['ours'][lang]:.2f} | {figures['methods'][m]['llmcompressor'][lang]:.2f}"
                           for m in methods)
        print(f"| {lang} | {d:.2f} | {cells} |")


if __name__ == "__main__":
    main()
