"""Seconds per layer of each compressor on the one engine, next to a reference-style path doing the same compression
the way the reference implementations (Wanda, SparseGPT, GPTQ) do, in the same dtype with the same algorithms and
tie-breaking. What the reference-style path does and ours avoids:

- batch-1 forwards, every one to the end of the layer (ours: full mixed-language batches; the statistics forwards
  stop at the last Linear call, whose input is the last statistic needed);
- one statistic per Linear even when q/k/v or gate/up read the same tensor (ours: one per input, shared);
- the whole X^T X product for Hessians (ours: the upper-triangular blocks of a symmetric matrix);
- masks chosen by fully sorting the scores, N:M in a Python loop over groups of M columns (ours: selection of the
  k-th lowest score, N:M vectorised; both give what a stable sort gives);
- the inverse Hessian factor by Cholesky, inverse, second Cholesky (ours: one Cholesky of the reversed matrix and a
  triangular solve);
- a column sweep where every column updates the rest of its 128-column block (ours: two-level lazy updates, the
  per-column updates on a 32-column slab kept in cache, on the transposed weight so each column is contiguous).

    python benchmarks/compressors.py                 # 3 layers of Gemma 3 270M (cached in ~/.cache/mbs)
    python benchmarks/compressors.py --layers 1 --segments 32
    python benchmarks/compressors.py --tiny          # the tiny Gemma 3 test model, seconds
    python benchmarks/compressors.py --device cuda   # both paths with each layer on the GPU (checks stay on the CPU)

Checks: (1) layer 0 from the same input tensors: magnitude and Wanda must give bit-identical weights (asserted);
SparseGPT and GPTQ sum the same products in another order, so they agree up to fp32 rounding (a weight whose score
ties within rounding can fall on the other side of the threshold, and its row's updates then differ): the share of
weights with the same zero/non-zero status is printed, and each module's reconstruction loss tr(ΔW·H·ΔWᵀ) must agree
within LOSS_TOLERANCE (asserted; measured up to 3.4e-4 on Gemma 3 270M, de-quantized Q4_K_M weights); (2) the same share after the whole run, where
the reference path also runs its forwards in batches of one, so later layers see inputs that differ by bf16 rounding.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from unittest import mock

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mbs.compress import hessian, pruning, quantization, sparsegpt  # noqa: E402
from mbs.compress.base import Compressor  # noqa: E402
from mbs.compress.engine import EngineConfig, capture, collect_statistics, compress_model, merged, run_layer  # noqa: E402
from mbs.compress.pruning import Magnitude, Wanda  # noqa: E402
from mbs.compress.quantization import GPTQ, RTN  # noqa: E402
from mbs.compress.sparsegpt import SparseGPT  # noqa: E402
from mbs.compress.statistics import Hessian  # noqa: E402
from mbs.models.adapter import Adapter  # noqa: E402


def loop_n_of_m(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M selection as the reference Wanda code does it: one group of M columns at a time (same stable sort)."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    for j in range(0, score.shape[1], m):
        mask[:, j : j + m].scatter_(1, torch.sort(score[:, j : j + m], dim=1, stable=True).indices[:, :n], True)
    return mask


def sort_lowest_per_row(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-row selection by a full stable sort of each row, as the reference Wanda code does."""
    k = int(score.shape[1] * sparsity)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k:
        mask.scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, :k], True)
    return mask


def sort_lowest_overall(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Whole-matrix (or whole-block) selection by a full sort, as the reference SparseGPT code selects, but exactly k
    (the reference zeroes every score <= the k-th sorted one: k+1), to compare with ours on the same rule."""
    k = int(score.numel() * sparsity)
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k:
        mask[torch.sort(score.flatten(), stable=True).indices[:k]] = True
    return mask.view_as(score)


LOSS_TOLERANCE = 5e-3  # relative gap allowed between the two paths' layer-0 reconstruction losses


def full_hessian_update(self: Hessian, x: torch.Tensor) -> None:
    """The whole X^T X product, as the reference code accumulates it (not only the upper triangle)."""
    self.sum.addmm_(x.T, x)
    self.tokens += x.shape[0]


def classic_inverse_upper_factor(h: torch.Tensor) -> torch.Tensor | None:
    """The reference's factor of h⁻¹: Cholesky, inverse from it, then the upper Cholesky factor of the inverse."""
    lower, info = torch.linalg.cholesky_ex(h)
    if info:
        return None
    upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    return None if info else upper


def classic_sweep(weight: torch.Tensor, hinv: torch.Tensor, blocksize: int, column, block=None,
                  lookahead: tuple[int, ...] = ()) -> torch.Tensor:
    """The reference SparseGPT/GPTQ column loop: each column's error updates the rest of its block at once (a
    [rows, block] slab read and written per column), the block's errors the later columns as one product."""
    cols = weight.shape[1]
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        w1 = weight[:, start:end]
        h1 = hinv[start:end, start:end]
        d1 = h1.diagonal()
        if block is not None:
            block(start, end, w1, d1)
        err = torch.empty_like(w1)
        for i in range(end - start):
            current = w1[:, i]
            final = column(start + i, current, weight)
            e = (current - final) / d1[i]
            w1[:, i:].sub_(e[:, None] * h1[i, i:][None, :])
            w1[:, i] = final
            err[:, i] = e
        if end < cols:
            weight[:, end:].sub_(err @ hinv[start:end, end:])
    return weight


@contextlib.contextmanager
def reference_style():
    """Swap in the reference implementations' pieces (patch.object fails loudly if a name has moved)."""
    swaps = [(pruning, "lowest_per_row", sort_lowest_per_row), (pruning, "lowest_overall", sort_lowest_overall),
             (pruning, "lowest_n_of_m", loop_n_of_m), (sparsegpt, "lowest_overall", sort_lowest_overall),
             (sparsegpt, "sweep", classic_sweep), (quantization, "sweep", classic_sweep),
             (Hessian, "update", full_hessian_update), (hessian, "inverse_upper_factor", classic_inverse_upper_factor)]
    with contextlib.ExitStack() as stack:
        for owner, name, new in swaps:
            stack.enter_context(mock.patch.object(owner, name, new))
        yield


def separate_statistics(layer: nn.Module, adapter: Adapter, compressor: Compressor, inputs: list[torch.Tensor],
                        kwargs: list[dict]) -> dict[str, object]:
    """One statistic per Linear, each fed by its own hook (no sharing), over the given forwards."""
    stats = {name: compressor.new_statistic(m) for name, m in adapter.linears(layer).items()}

    def hook(name: str):
        def pre_hook(module: nn.Linear, args: tuple) -> None:
            x = args[0]
            stats[name].update(x.reshape(-1, x.shape[-1]).float())

        return pre_hook

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in adapter.linears(layer).items()]
    try:
        for x, kw in zip(inputs, kwargs):
            layer(x, **kw)
    finally:
        for h in handles:
            h.remove()
    return stats


@torch.no_grad()
def reference_compress(model: nn.Module, compressor: Compressor, calibration, device: str = "cpu") -> None:
    """The reference-style path: batch-1 forwards over every layer, separate statistics, reference pieces; each layer
    on ``device`` in turn, as the reference code does on a GPU."""
    adapter = Adapter(model)
    with reference_style():
        captured = capture(adapter, calibration.batches(1), device) if compressor.needs_statistics else None
        for i, layer in enumerate(adapter.layers):
            layer.to(device)
            stats = {}
            if captured is not None:
                stats = separate_statistics(layer, adapter, compressor, captured.inputs, captured.layer_kwargs[i])
            for name, module in adapter.linears(layer).items():
                compressor.compress(f"layer {i} {name}", module, stats.get(name))
            if captured is not None and i + 1 < len(adapter.layers):
                captured.inputs = run_layer(layer, adapter, captured.inputs, captured.layer_kwargs[i])
            layer.to("cpu")
    adapter.move_outer("cpu")


def timed(fn, *args, **kwargs) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): CPU time is the steadier figure on a shared CPU machine; on a
    GPU the wall time is the one that counts (kernels are waited for before the clock stops)."""
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args, **kwargs)
    synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


@torch.no_grad()
def check_same_input(model: nn.Module, state: dict, compressor: Compressor, calibration,
                     batch_size: int) -> tuple[float, float]:
    """Layer 0 from identical input tensors, ours vs the reference-style pieces: (mask agreement, the largest relative
    difference of a module's reconstruction loss tr(ΔW·H·ΔWᵀ), ΔW = compressed − original).

    Selection-only compressors (magnitude, Wanda) must give bit-identical weights (asserted); the Hessian-based ones
    sum the same products in another order (upper-triangle Hessian, two-level lazy sweep), so they agree up to fp32
    rounding (a weight whose score ties within rounding may land on the other side of the threshold): their
    reconstruction losses must agree within LOSS_TOLERANCE (asserted)."""
    model.load_state_dict(state, strict=False)
    adapter = Adapter(model)
    layer = adapter.layers[0]
    linears = adapter.linears(layer)
    captured = capture(adapter, calibration.batches(batch_size), "cpu") if compressor.needs_statistics else None
    shared, leader, separate = {}, {}, {}
    if captured is not None:
        by_group, leader = collect_statistics(layer, adapter, compressor, captured.inputs, captured.layer_kwargs[0],
                                              captured.languages, False)
        shared = {g: merged(s, lambda g=g: compressor.new_statistic(linears[g])) for g, s in by_group.items()}
        with reference_style():
            separate = separate_statistics(layer, adapter, compressor, captured.inputs, captured.layer_kwargs[0])
    ours, ref = {}, {}
    gap = 0.0
    for name, module in linears.items():
        original = module.weight.detach().clone()
        compressor.compress(name, module, shared[leader[name]] if shared else None)
        ours[name] = module.weight.detach().clone()
        module.weight.data.copy_(original)
        with reference_style():
            compressor.compress(name, module, separate.get(name))
        ref[name] = module.weight.detach().clone()
        module.weight.data.copy_(original)
        if not isinstance(compressor, (SparseGPT, GPTQ)):
            if not torch.equal(ours[name], ref[name]):
                raise AssertionError(f"{type(compressor).__name__}: layer 0 {name} differs between the paths")
            continue
        h = shared[leader[name]].matrix
        losses = [float(((w.float() - original.float()) @ h * (w.float() - original.float())).sum())
                  for w in (ours[name], ref[name])]
        gap = max(gap, abs(losses[0] - losses[1]) / losses[1])
        if gap > LOSS_TOLERANCE:
            raise AssertionError(f"{type(compressor).__name__}: layer 0 {name} reconstruction loss {losses[0]:.6g} "
                                 f"(ours) vs {losses[1]:.6g} (reference-style)")
    return compare(ours, ref)[0], gap


def layer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    prefix = Adapter(model).layers_path + "."  # the adapter finds where each architecture keeps its layers
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith(prefix)}


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(fraction of weights with the same zero/non-zero status, max |Δw| / max |w|) over the Linear weights."""
    same = total = 0
    worst = 0.0
    for k in a:
        if a[k].dim() != 2:
            continue
        same += int(((a[k] == 0) == (b[k] == 0)).sum())
        total += a[k].numel()
        worst = max(worst, float((a[k].float() - b[k].float()).abs().max() / a[k].float().abs().max()))
    return same / total, worst


def load(args):
    from hydra import compose, initialize_config_dir

    from mbs.config import register
    from mbs.models.loading import load_model
    from mbs.pipeline import prepare

    register()
    root = Path(__file__).resolve().parents[1]
    model_name = "tiny-gemma3" if args.tiny else args.model
    overrides = [f"model={model_name}", "logger=none", f"sampler.segments={args.segments}"]
    with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    if args.tiny:
        os.environ.setdefault("MBS_CACHE", str(Path.home() / ".cache" / "mbs"))
    prepared = prepare(cfg)
    model = load_model(prepared.run.model, seed=0)
    adapter = Adapter(model)
    layers = adapter.layers
    keep = nn.ModuleList(list(layers)[: args.layers])
    parent = model.get_submodule(adapter.layers_path.rsplit(".", 1)[0])
    setattr(parent, adapter.layers_path.rsplit(".", 1)[1], keep)
    model.config.num_hidden_layers = len(keep)
    return model, prepared


COMPRESSORS = {  # each takes the quantizers' group size
    "wanda": lambda groupsize: Wanda(sparsity=0.5),
    "wanda-2:4": lambda groupsize: Wanda(sparsity=0.5, n=2, m=4),
    "magnitude-2:4": lambda groupsize: Magnitude(sparsity=0.5, n=2, m=4),
    "sparsegpt": lambda groupsize: SparseGPT(sparsity=0.5),
    "sparsegpt-2:4": lambda groupsize: SparseGPT(sparsity=0.5, n=2, m=4),
    "gptq-4b": lambda groupsize: GPTQ(bits=4, groupsize=groupsize, actorder=False, static_groups=False),
    "rtn-4b": lambda groupsize: RTN(bits=4, groupsize=groupsize),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=3, help="first N decoder layers (default 3)")
    parser.add_argument("--segments", type=int, default=128, help="calibration segments (default: the runs' 128)")
    parser.add_argument("--batch-size", type=int, default=8, help="our engine's batch size (default 8)")
    parser.add_argument("--model", default="gemma3-270m", help="a conf/model option (default gemma3-270m)")
    parser.add_argument("--tiny", action="store_true", help="the tiny Gemma 3 test model instead")
    parser.add_argument("--device", default="cpu", help="where layers run in both paths: cpu (default) or cuda")
    parser.add_argument("--groupsize", type=int, default=0, help="GPTQ/RTN group size (default 128; 32 with --tiny)")
    parser.add_argument("--only", default=",".join(COMPRESSORS), help="comma-separated: " + ", ".join(COMPRESSORS))
    args = parser.parse_args()

    groupsize = args.groupsize or (32 if args.tiny else 128)
    torch.manual_seed(0)
    model, prepared = load(args)
    calibration = prepared.calibration
    state = layer_state(model)
    print(f"model {prepared.run.model.name} ({next(model.parameters()).dtype}), {len(Adapter(model).layers)} layers, "
          f"{calibration.total} segments x {prepared.run.model.seqlen} tokens, {torch.get_num_threads()} threads")
    print(f"GPTQ/RTN group size {groupsize}; ours: engine batch size {args.batch_size}; reference: batch 1; "
          f"layers run on {args.device}")
    print("seconds per layer (capture included, both paths), wall and process CPU; speed-up = reference / ours")
    print(f"{'compressor':<15} {'ours':>8} {'ours':>8} {'ref':>8} {'ref':>8} {'speed-up':>15}  "
          f"{'layer 0, same input':>21}   {'end to end':>10}")
    print(f"{'':<15} {'wall':>8} {'cpu':>8} {'wall':>8} {'cpu':>8} {'wall':>7} {'cpu':>7}  "
          f"{'same mask':>10} {'Δ loss':>9}   {'same mask':>10}")
    for key in args.only.split(","):
        compressor = COMPRESSORS[key](groupsize)
        same_input = check_same_input(model, state, compressor, calibration, args.batch_size)

        model.load_state_dict(state, strict=False)
        ours = timed(compress_model, model, compressor, calibration,
                     EngineConfig(device=args.device, batch_size=args.batch_size), progress=False)
        ours_state = layer_state(model)

        model.load_state_dict(state, strict=False)
        ref = timed(reference_compress, model, compressor, calibration, args.device)
        agreement, _ = compare(ours_state, layer_state(model))
        n = args.layers
        print(f"{key:<15} {ours[0] / n:8.3f} {ours[1] / n:8.3f} {ref[0] / n:8.3f} {ref[1] / n:8.3f} "
              f"{ref[0] / ours[0]:6.2f}x {ref[1] / ours[1]:6.2f}x  "
              f"{100 * same_input[0]:9.4f}% {same_input[1]:9.1e}   {100 * agreement:9.4f}%", flush=True)
    if any(not COMPRESSORS[key](groupsize).needs_statistics for key in args.only.split(",")):
        print("(magnitude and RTN use no calibration data: both paths do the same work on the weights, and ours also "
              "counts each module's zeros for the report)")


if __name__ == "__main__":
    main()
