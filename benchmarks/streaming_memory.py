"""Peak memory and time of one compression and evaluation, in memory against streamed (``engine.stream=true``), on
random-weight Llama-shaped models of growing depth written to safetensors: in memory the peak grows with the weights,
streamed it should not. Each measurement runs in its own process (peak RSS, ru_maxrss, is per process); both modes
read the same checkpoint (in memory with ``from_pretrained``), and their perplexities must be bit-identical.

    python benchmarks/streaming_memory.py                 # hidden 1024, 8 and 24 layers (bf16: 0.21 and 0.62 GB)
    python benchmarks/streaming_memory.py --layers 8,48   # deeper
    python benchmarks/streaming_memory.py --tiny          # seconds: a smoke run of the script

Not the issue-25 cgroup benchmark (2/4/8 GB under a 3 GB cap): no cap is imposed here, the peak is only measured.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def spec_of(args: argparse.Namespace, layers: int):
    from mbs.models.spec import ModelSpec

    config = dict(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4, num_hidden_layers=layers,
                  num_attention_heads=8, num_key_value_heads=8)
    return ModelSpec(name=f"random-llama-{layers}", source="tiny", tiny_arch="llama", tiny_config=config,
                     dtype="bfloat16", seqlen=64, prepend_bos=True)


def measure(args: argparse.Namespace, layers: int, mode: str) -> dict:
    """One compression (Wanda 50%) and evaluation in this process: peak RSS, seconds and the per-language NLL."""
    from mbs.api import evaluation_windows
    from mbs.compress.engine import EngineConfig, compress_model
    from mbs.compress.registry import COMPRESSORS
    from mbs.data.calibration import build_calibration
    from mbs.data.corpora import UDHRCorpus
    from mbs.evaluate.perplexity import evaluate_languages
    from mbs.evaluate.streamed import evaluate_streamed
    from mbs.models.loading import load_model, load_streamed, load_tokenizer, weights_directory
    from mbs.models.spec import ModelSpec

    tiny = spec_of(args, layers)
    tokenizer = load_tokenizer(tiny)
    calibration = build_calibration(tokenizer, UDHRCorpus(), {"en": 4, "sw": 4}, 64, 0, True)
    windows = evaluation_windows(tokenizer, UDHRCorpus(), ["en", "sw"], seqlen=64, prepend_bos=True, max_windows=4)
    spec = ModelSpec(name=tiny.name, source="hub", path=str(weights_directory(tiny)), dtype="bfloat16", seqlen=64)
    import transformers.models.llama.modeling_llama  # noqa: F401  (imported before the clock starts, in both modes)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as offload:
        if mode == "memory":
            model = load_model(spec)
            compress_model(model, COMPRESSORS["wanda"](), calibration, EngineConfig(), progress=False)
            losses = evaluate_languages(model, windows, "cpu", 8, 256, progress=False)
        else:
            model = load_streamed(spec, Path(offload))
            compress_model(model, COMPRESSORS["wanda"](), calibration, EngineConfig(), progress=False)
            losses = evaluate_streamed(model, windows, "cpu", "cpu", 8, 256, progress=False)
    return {"layers": layers, "mode": mode, "parameters": sum(p.numel() for p in model.parameters()),
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3, "before_mb": before / 1e3,
            "seconds": time.perf_counter() - start, "nll": {k: v.nll for k, v in losses.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="8,24")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--tiny", action="store_true", help="hidden 64, 2 and 4 layers")
    parser.add_argument("--one", nargs=2, metavar=("LAYERS", "MODE"), help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    if args.tiny:
        args.hidden, args.layers = 64, "2,4"
    if args.one:
        layers, mode = int(args.one[0]), args.one[1]
        if mode == "write":  # the checkpoint, written once before either mode is measured
            from mbs.models.loading import weights_directory

            weights_directory(spec_of(args, layers))
            print("{}")
        else:
            print(json.dumps(measure(args, layers, mode)))
        return
    os.environ.setdefault("MBS_CACHE", tempfile.mkdtemp(prefix="mbs-streaming-bench-"))
    rows = []
    for layers in [int(n) for n in args.layers.split(",")]:
        for mode in ("write", "memory", "streamed"):
            command = [sys.executable, __file__, "--one", str(layers), mode, "--hidden", str(args.hidden)]
            proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(proc.stderr[-3000:])
            if mode != "write":
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"Wanda 50% and evaluation (2 languages x 4 windows of 64 tokens), hidden {args.hidden}, bf16, "
          f"threads {os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print("| layers | parameters | weights | mode | peak RSS | RSS before loading | seconds |")
    print("|---:|---:|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layers']} | {r['parameters'] / 1e6:.0f}M | {r['parameters'] * 2 / 1e9:.2f} GB | {r['mode']} | "
              f"{r['peak_mb']:.0f} MB | {r['before_mb']:.0f} MB | {r['seconds']:.1f} |")
    for layers in dict.fromkeys(r["layers"] for r in rows):
        memory, streamed = (next(r for r in rows if r["layers"] == layers and r["mode"] == m)
                            for m in ("memory", "streamed"))
        print(f"{layers} layers: streamed perplexities bit-identical to in-memory: {memory['nll'] == streamed['nll']}")


if __name__ == "__main__":
    main()
