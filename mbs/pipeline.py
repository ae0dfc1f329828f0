"""One run, in order: check config → tokenizer and data → load model → evaluate dense → compress layer by layer →
evaluate compressed → write results and log. Everything that can fail on user input fails before the model loads."""
from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mbs.api import calibration_mixture, compress_model, evaluation_windows, export, perplexity
from mbs.compress.engine import check_modules, layer_modules
from mbs.config import Run, build
from mbs.data.calibration import CalibrationSet
from mbs.data.cache import TokenCache
from mbs.data.corpora import check_available
from mbs.data.distributions import estimate_from_tokenizer
from mbs.data.sampling import absolute_shares, renormalise
from mbs.models.loading import cache_root, load_model, load_tokenizer, model_skeleton
from mbs.record.export import check_export
from mbs.record.results import language_rows, summary, to_markdown, write_results
from mbs.sweep import experiment_id

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def plan(run: Run) -> dict[str, int]:
    """Checks that need no model: languages exist in the corpora, and the calibration counts."""
    counts = run.sampler.counts(run.model.distribution)
    check_available(run.data, [k for k, v in counts.items() if v], "calibration languages")
    check_available(run.eval.corpus or run.data, run.eval.languages, "eval.languages")
    if run.engine.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"engine.device={run.engine.device!r} but no CUDA device is available; use engine.device=cpu")
    return counts


class UserError(ValueError):
    """Bad input, found before the model loads: reported as one line."""


@dataclass
class Prepared:
    run: Run
    counts: dict[str, int]
    tokenizer: Any = None
    calibration: CalibrationSet | None = None
    windows: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def prepare(cfg: DictConfig) -> Prepared:
    """Everything that depends on user input and not on the weights: config objects, counts, tokenized data."""
    try:
        run = build(cfg)
        spec = run.model
        t0 = time.perf_counter()
        tokenizer = None
        if spec.distribution_estimate:  # shares from the tokenizer, before anything needs them
            tokenizer = load_tokenizer(spec)
            spec.distribution = estimate_from_tokenizer(tokenizer, spec.estimate_sharpness)
            log.info("ESTIMATED language distribution (%s): %s", spec.distribution_source, spec.distribution)
        counts = plan(run)
        skeleton = model_skeleton(spec)
        check_modules(skeleton, run.compressor)  # layer shapes vs. the compressor, no weights loaded
        if run.save_model:
            check_export(run.save_format, run.compressor, layer_modules(skeleton))
        seed_everything(run.seed)
        tokenizer = tokenizer or load_tokenizer(spec)
        cache = TokenCache(cache_root(spec) / "tokens")
        calibration = calibration_mixture(tokenizer, run.data, spec.distribution, run.sampler, seqlen=spec.seqlen,
                                          seed=run.seed, prepend_bos=spec.prepend_bos, cache=cache)
        windows = evaluation_windows(tokenizer, run.eval.corpus or run.data, run.eval.languages, seqlen=spec.seqlen,
                                     prepend_bos=spec.prepend_bos, max_windows=run.eval.max_windows or None,
                                     cache=cache)
    except ValueError as err:
        raise UserError(str(err)) from err
    log.info("calibration: %d segments x %d tokens: %s", calibration.total, spec.seqlen, counts)
    return Prepared(run, counts, tokenizer, calibration, windows, {"data_s": time.perf_counter() - t0})


def execute(cfg: DictConfig, prepared: Prepared, output_dir: Path) -> dict[str, Any]:
    run, spec, windows = prepared.run, prepared.run.model, prepared.windows
    timings = dict(prepared.timings)
    t = time.perf_counter()

    t0 = time.perf_counter()
    model = load_model(spec, seed=run.seed)
    timings["load_s"] = time.perf_counter() - t0

    def evaluate() -> dict:
        return perplexity(model, windows, device=run.engine.device, batch_size=run.eval.batch_size,
                          chunk_tokens=run.eval.chunk_tokens, progress=run.progress)

    t0 = time.perf_counter()
    dense = evaluate()
    timings["eval_dense_s"] = time.perf_counter() - t0
    model.to(run.engine.offload_device)

    t0 = time.perf_counter()
    report = compress_model(model, run.compressor, prepared.calibration, run.engine, progress=run.progress)
    timings["compress_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    compressed = evaluate()
    timings["eval_compressed_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t + timings["data_s"]

    shares = renormalise(spec.distribution, run.eval.languages) if spec.distribution else {}
    distribution = absolute_shares(spec.distribution)
    rows = language_rows(shares, dense, compressed, distribution)
    results = {
        "experiment_id": experiment_id(cfg),  # resume key (mbs/sweep.py)
        "config": OmegaConf.to_container(cfg, resolve=True),
        "model": {"name": spec.name, "parameters": sum(p.numel() for p in model.parameters()),
                  "distribution_source": spec.distribution_source, "distribution_is_proxy": spec.distribution_is_proxy,
                  "distribution": distribution},
        "calibration": {"segments": prepared.counts, "seqlen": spec.seqlen, "total": prepared.calibration.total},
        "languages": rows,
        "summary": summary(rows, run.eval.low_resource_share),
        "compression": {"method": type(run.compressor).__name__.lower(), "sparsity": report.sparsity,
                        "zeros": report.zeros, "params": report.params, "layers": report.layers},
        "timings": timings,
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "device": run.engine.device,
                        "threads": torch.get_num_threads()},
    }
    if run.save_model:
        t0 = time.perf_counter()
        results["export"] = export(model, output_dir / "model", run.compressor, prepared.tokenizer, run.save_format)
        timings["save_s"] = time.perf_counter() - t0
    write_results(output_dir, results)
    return results


def run(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any]:
    """Execute one run with its logger around it; the logger finishes even when the run fails."""
    output_dir = Path(output_dir)
    prepared = prepare(cfg)
    logger = prepared.run.logger.start(OmegaConf.to_container(cfg, resolve=True), str(output_dir))
    try:
        results = execute(cfg, prepared, output_dir)
        logger.log_results(results)
    except BaseException:
        logger.finish(failed=True)
        raise
    logger.finish()
    return results


def format_table(results: dict[str, Any]) -> str:
    s = results["summary"]
    c = results["compression"]
    head = (f"{results['model']['name']} · {c['method']} · sparsity {c['sparsity']:.4f} · "
            f"mean ppl ratio {s['mean_ratio']:.3f} (median log ratio {s['median_log_ratio']:.3f}) · "
            f"{results['timings']['total_s']:.1f}s")
    return head + "\n" + to_markdown(results["languages"])
