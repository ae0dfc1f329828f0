"""Peak memory and time of one compression and evaluation, in memory against streamed (``engine.stream=true``), on
random-weight Llama-shaped models written to sharded safetensors: in memory the peak grows with the weights, streamed
it should not. Each measurement runs in its own process (peak RSS, ru_maxrss, is per process); both modes read the same
checkpoint (in memory with ``from_pretrained``), and their perplexities must be bit-identical.

    python benchmarks/streaming_memory.py                          # hidden 1024, 8 and 24 layers (0.21, 0.62 GB)
    python benchmarks/streaming_memory.py --sizes 2,4,8 --methods wanda,gptq --modes streamed --cap 3
    python benchmarks/streaming_memory.py --tiny                   # seconds: a smoke run of the script

``--cap GB`` runs every measurement inside its own cgroup (v1) memory limit, so one that needs more is killed by the
kernel and reported so; it needs root and ``/sys/fs/cgroup/memory``. The cgroup's own peak, printed beside peak RSS,
counts what is charged to it: the process's own memory and the page cache it brings in (checkpoint and offload pages);
pages other processes cached first (shared libraries) are charged to them, so it can be below the RSS.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
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


def layer_parameters(hidden: int) -> int:
    """Parameters of one decoder layer of :func:`spec_of`'s shape (attention, MLP, two norms)."""
    return 4 * hidden * hidden + 3 * hidden * (hidden * 11 // 4) + 2 * hidden


def checkpoint_dir(args: argparse.Namespace, layers: int) -> Path:
    return Path(os.environ["MBS_CACHE"]) / f"random-llama-h{args.hidden}-l{layers}"


def write_checkpoint(args: argparse.Namespace, layers: int, shard_bytes: int = 1 << 30) -> None:
    """The model's random weights (normal, std 0.02; norms 1) in safetensors shards of about ``shard_bytes`` with an
    index, written one shard at a time: building the model in memory would need its full size twice over (fp32
    initialisation, then the cast)."""
    import torch
    from safetensors.torch import save_file

    from mbs.models.streaming import parameters_on_meta
    from mbs.models.tiny import tiny_model

    directory = checkpoint_dir(args, layers)
    if (directory / "model.safetensors.index.json").is_file():
        return
    tmp = directory.with_name(directory.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    spec = spec_of(args, layers)
    with parameters_on_meta():
        model = tiny_model(spec.tiny_arch, spec.tiny_config, dtype=torch.bfloat16)
    model.config.torch_dtype = torch.bfloat16
    model.config.save_pretrained(tmp)
    generator = torch.Generator().manual_seed(0)
    weight_map, shard, size, total = {}, {}, 0, 0

    def flush() -> None:
        nonlocal shard, size
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, tmp / name, metadata={"format": "pt"})
        weight_map.update((key, name) for key in shard)
        shard, size = {}, 0

    for name, param in model.named_parameters():
        if param.dim() == 1:
            value = torch.ones(param.shape, dtype=torch.bfloat16)
        else:
            value = (torch.randn(param.shape, generator=generator) * 0.02).to(torch.bfloat16)
        shard[name] = value
        size += value.numel() * 2
        total += value.numel() * 2
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    tmp.rename(directory)


def measure(args: argparse.Namespace, layers: int, mode: str, method: str) -> dict:
    """One compression and evaluation in this process: peak RSS, seconds and the per-language NLL."""
    from mbs.api import evaluation_windows
    from mbs.compress.engine import EngineConfig, compress_model
    from mbs.compress.registry import COMPRESSORS
    from mbs.data.calibration import build_calibration
    from mbs.data.corpora import UDHRCorpus
    from mbs.evaluate.perplexity import evaluate_languages
    from mbs.evaluate.streamed import evaluate_streamed
    from mbs.models.loading import load_model, load_streamed, load_tokenizer
    from mbs.models.spec import ModelSpec

    import dataclasses

    factory = COMPRESSORS[method]
    fields = {f.name for f in dataclasses.fields(factory)} if dataclasses.is_dataclass(factory) else set()
    make = (lambda: factory(groupsize=16)) if "groupsize" in fields and (args.hidden * 11 // 4) % 128 else factory
    tiny = spec_of(args, layers)
    tokenizer = load_tokenizer(tiny)
    calibration = build_calibration(tokenizer, UDHRCorpus(), {"en": 4, "sw": 4}, 64, 0, True)
    windows = evaluation_windows(tokenizer, UDHRCorpus(), ["en", "sw"], seqlen=64, prepend_bos=True, max_windows=4)
    spec = ModelSpec(name=tiny.name, source="hub", path=str(checkpoint_dir(args, layers)), dtype="bfloat16", seqlen=64)
    import transformers.models.llama.modeling_llama  # noqa: F401 - imported before the clock starts, in both modes
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:  # the parent's folder (removed by it, also when this child is killed)
        offload = args.offload or stack.enter_context(tempfile.TemporaryDirectory())
        if mode == "memory":
            model = load_model(spec)
            compress_model(model, make(), calibration, EngineConfig(), progress=False)
            losses = evaluate_languages(model, windows, "cpu", 8, 256, progress=False)
        else:
            model = load_streamed(spec, Path(offload))
            compress_model(model, make(), calibration, EngineConfig(), progress=False)
            losses = evaluate_streamed(model, windows, "cpu", "cpu", 8, 256, progress=False)
    return {"layers": layers, "mode": mode, "method": method, "parameters": sum(p.numel() for p in model.parameters()),
            # ru_maxrss is in KiB on Linux
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6, "before_mb": before * 1024 / 1e6,
            "seconds": time.perf_counter() - start, "nll": {k: v.nll for k, v in losses.items()}}


CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


def run_child(command: list[str], cap: float) -> tuple[subprocess.CompletedProcess, dict]:
    """Run ``command``; with ``cap`` (GB), inside a fresh cgroup v1 memory limit: its peak usage and whether the
    kernel's OOM killer fired come back beside the process."""
    if not cap:
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True), {}
    group = CGROUP_ROOT / f"mbs-streaming-bench-{os.getpid()}-{time.monotonic_ns()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(int(cap * 1e9)))
        if (group / "memory.memsw.limit_in_bytes").exists():
            (group / "memory.memsw.limit_in_bytes").write_text(str(int(cap * 1e9)))
        procs = group / "cgroup.procs"
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                              preexec_fn=lambda: procs.write_text(str(os.getpid())))
        control = dict(line.split() for line in (group / "memory.oom_control").read_text().splitlines())
        return proc, {"cgroup_peak_mb": int((group / "memory.max_usage_in_bytes").read_text()) / 1e6,
                      "oom_kills": int(control.get("oom_kill", 0))}
    finally:
        group.rmdir()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default=None, help="comma-separated depths (default 8,24; --tiny: 2,4)")
    parser.add_argument("--sizes", default="", help="comma-separated weight sizes in GB (bf16): the depth that gives "
                                                    "each (instead of --layers)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--methods", default="wanda", help="comma-separated compressors with their defaults")
    parser.add_argument("--modes", default="memory,streamed")
    parser.add_argument("--cap", type=float, default=0.0, help="memory limit in GB (cgroup v1; 0: none)")
    parser.add_argument("--tiny", action="store_true", help="hidden 64 (seconds)")
    parser.add_argument("--one", nargs=3, metavar=("LAYERS", "MODE", "METHOD"), help=argparse.SUPPRESS)  # a child
    parser.add_argument("--offload", default=None, help=argparse.SUPPRESS)  # a child's offload folder
    args = parser.parse_args()
    if args.tiny:
        args.hidden, args.sizes = 64, ""
    args.layers = args.layers or ("2,4" if args.tiny else "8,24")
    if args.one:
        layers, mode, method = int(args.one[0]), args.one[1], args.one[2]
        if mode == "write":  # the checkpoint, written once before any mode is measured
            write_checkpoint(args, layers)
            print("{}")
        else:
            print(json.dumps(measure(args, layers, mode, method)))
        return
    from mbs.compress.registry import COMPRESSORS

    methods, modes = args.methods.split(","), args.modes.split(",")
    for value, allowed, key in ((methods, COMPRESSORS, "--methods"), (modes, ("memory", "streamed"), "--modes")):
        if bad := [v for v in value if v not in allowed]:
            sys.exit(f"{key}: {', '.join(bad)} not among {', '.join(allowed)}")
    if args.cap and not (CGROUP_ROOT / "memory.limit_in_bytes").is_file():
        sys.exit(f"--cap needs a cgroup v1 memory controller at {CGROUP_ROOT}, and there is none")
    if args.sizes:
        depths = [max(1, round(float(gb) * 1e9 / (2 * layer_parameters(args.hidden)))) for gb in args.sizes.split(",")]
    else:
        depths = [int(n) for n in args.layers.split(",")]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # killed: still remove the cgroup and checkpoints
    own_cache = "MBS_CACHE" not in os.environ  # then the checkpoints (GBs) are removed at the end
    if own_cache:
        os.environ["MBS_CACHE"] = tempfile.mkdtemp(prefix="mbs-streaming-bench-")
    try:
        rows = measure_all(args, depths, methods, modes)
    finally:
        if own_cache:
            shutil.rmtree(os.environ["MBS_CACHE"], ignore_errors=True)
    report(args, rows, methods)


def measure_all(args: argparse.Namespace, depths: list[int], methods: list[str], modes: list[str]) -> list[dict]:
    rows = []
    for layers in depths:
        proc, _ = run_child([sys.executable, __file__, "--one", str(layers), "write", "-", "--hidden",
                             str(args.hidden)], 0)
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        for method in methods:
            for mode in modes:
                offload = tempfile.mkdtemp(prefix="mbs-streaming-offload-")
                command = [sys.executable, __file__, "--one", str(layers), mode, method, "--hidden", str(args.hidden),
                           "--offload", offload]
                start = time.perf_counter()
                try:
                    proc, group = run_child(command, args.cap)
                finally:  # a child the limit killed cannot remove its offloaded layers (GBs)
                    shutil.rmtree(offload, ignore_errors=True)
                if proc.returncode == 0:
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
                elif args.cap and (group.get("oom_kills") or proc.returncode == -9):
                    row = {"layers": layers, "mode": mode, "method": method, "killed": True,
                           "parameters": layers * layer_parameters(args.hidden),
                           "seconds": time.perf_counter() - start}
                else:
                    sys.exit(proc.stderr[-3000:])
                rows.append({**row, **group})
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "nll"}), flush=True)
    return rows


def report(args: argparse.Namespace, rows: list[dict], methods: list[str]) -> None:
    cap = f"inside a {args.cap:g} GB cgroup memory limit" if args.cap else "no memory limit"
    print(f"\ncompression and evaluation (2 languages x 4 windows of 64 tokens; 8 calibration segments of 64 tokens), "
          f"hidden {args.hidden}, bf16, {cap}, threads {os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print("| method | layers | weights | mode | peak RSS | cgroup peak (with page cache) | RSS before loading | "
          "seconds |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        peak = "killed by the limit" if r.get("killed") else f"{r['peak_mb']:.0f} MB"
        before = "" if r.get("killed") else f"{r['before_mb']:.0f} MB"
        group = f"{r['cgroup_peak_mb']:.0f} MB" if "cgroup_peak_mb" in r else ""
        weights = f"{r['parameters'] * 2 / 1e9:.2f} GB"
        print(f"| {r['method']} | {r['layers']} | {weights} | {r['mode']} | {peak} | {group} | "
              f"{before} | {r['seconds']:.1f} |")
    for method in methods:
        done = [r for r in rows if r["method"] == method and not r.get("killed")]
        for layers in dict.fromkeys(r["layers"] for r in done):
            pair = [r for r in done if r["layers"] == layers]
            if len(pair) == 2:
                print(f"{method}, {layers} layers: streamed perplexities bit-identical to in-memory: "
                      f"{pair[0]['nll'] == pair[1]['nll']}")
        streamed = [r for r in done if r["mode"] == "streamed"]
        if len(streamed) >= 2:
            print(f"{method}, streamed: peak RSS grows x{streamed[-1]['peak_mb'] / streamed[0]['peak_mb']:.3f} from "
                  f"{streamed[0]['parameters'] * 2 / 1e9:.2f} to {streamed[-1]['parameters'] * 2 / 1e9:.2f} GB of "
                  f"weights")


if __name__ == "__main__":
    main()
