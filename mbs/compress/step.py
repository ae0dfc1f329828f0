"""One decoder layer's compression step, the same in every pipeline (mbs/compress/engine.py, mbs/compress/cached.py):
each compressible matrix is compressed from its input group's statistic and recorded; pipelines differ only in
where the statistics come from."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from mbs.compress.base import Compressor, Statistic
from mbs.models.adapter import Adapter, LinearLike

UNCALIBRATED = "no calibration token was routed to this expert: left as is"


class LayerStep(NamedTuple):
    modules: dict[str, dict[str, Any]]  # name in the layer -> its figures (and the compressor's)
    shared_inputs: dict[str, str]  # module -> the group leader whose statistic it used (leaders left out)
    uncalibrated: list[str]  # full names of matrices no calibration token reached, left as is


def module_figures(module: LinearLike) -> dict[str, Any]:
    w = module.weight
    zeros = int((w == 0).sum())
    return {"zeros": zeros, "params": w.numel(), "sparsity": zeros / w.numel()}


def layer_record(index: int, seconds: float, modules: dict[str, dict[str, Any]],
                 shared_inputs: dict[str, str], prepared: dict[str, Any] | None = None) -> dict[str, Any]:
    """One entry of ``CompressionReport.layers`` (results.json ``compression.layers``); ``prepared``: the figures of
    the compressor's rewrite of the whole layer (AWQ's scales and clipping), when it made one."""
    zeros = sum(m["zeros"] for m in modules.values())
    params = sum(m["params"] for m in modules.values())
    return {"index": index, "seconds": seconds, "sparsity": zeros / params if params else 0.0, "modules": modules,
            "shared_inputs": shared_inputs, **({"prepared": prepared} if prepared is not None else {})}


def compress_layer(adapter: Adapter, layer_name: str, linears: Mapping[str, LinearLike], compressor: Compressor,
                   statistics: Mapping[str, Statistic], leader: Mapping[str, str]) -> LayerStep:
    """Compress every matrix in ``linears`` (one layer's, named inside ``layer_name``) in place.

    ``statistics`` holds one statistic per input group, by group leader, and ``leader`` maps each module to its
    group's leader. A compressor that needs statistics leaves a module without a group (an expert no calibration
    token was routed to) as it is, and says so; a no-op compressor is not called."""
    modules: dict[str, dict[str, Any]] = {}
    uncalibrated: list[str] = []
    for name, module in linears.items():
        if compressor.is_noop:
            modules[name] = module_figures(module)
            continue
        statistic = statistics[leader[name]] if name in leader else None
        if compressor.needs_statistics and statistic is None:
            modules[name] = {**module_figures(module), "tokens": 0, "skipped": UNCALIBRATED}
            uncalibrated.append(f"{layer_name}.{name}")
            continue
        extra = compressor.compress(f"{layer_name}.{name}", module, statistic)
        tokens = adapter.expert_tokens(module, statistic)
        modules[name] = {**module_figures(module), **({"tokens": tokens} if tokens is not None else {}), **extra}
    return LayerStep(modules, {n: g for n, g in leader.items() if n != g}, uncalibrated)
