"""One run, in order: check config → tokenizer and data → load model → evaluate dense → compress layer by layer →
evaluate compressed → write results and log. Everything that can fail on user input fails before the model loads."""
from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mbs.analyze import damage, similarity
from mbs.analyze.similarity_plots import model_label, write_similarity
from mbs.api import calibration_mixture, evaluation_windows, export, perplexity, window_bytes
from mbs.atomic import atomic_write
from mbs.compress import engine as engine_module
from mbs.compress import statistics as statistics_module
from mbs.compress.cached import LanguageStatistics
from mbs.compress.engine import (CompressionReport, PipelineContext, check_device_available, check_modules,
                                 layer_modules)
from mbs.compress.registry import PIPELINES
from mbs.config import Run, build
from mbs.data.cache import TokenCache
from mbs.data.calibration import CalibrationSet, CalibrationText, SegmentSource, calibration_text
from mbs.data.corpora import UDHRCorpus, check_available
from mbs.data.distributions import estimate_from_tokenizer
from mbs.data import generated as generated_module
from mbs.data.generated import SelfCorpus
from mbs.data.sampling import absolute_shares
from mbs.fingerprint import (experiment_id, numeric_environment, source_fingerprint, tokens_fingerprint,
                             weights_fingerprint)
from mbs.evaluate import perplexity as perplexity_module
from mbs.evaluate.baseline import DenseResults
from mbs.evaluate.perplexity import LanguageLoss, language_bytes
from mbs.evaluate import streamed as streamed_module
from mbs.evaluate.streamed import evaluate_streamed
from mbs.evaluate.suites import missing, resolve_tasks
from mbs.evaluate.zeroshot import ZeroShot, compare, harness_version, prepare_zeroshot
from mbs.models import adapter as adapter_module
from mbs.models.adapter import Adapter
from mbs.models import streaming as streaming_module
from mbs.models.loading import (check_positions, load_model, load_streamed, load_tokenizer, model_cache, model_config,
                                model_skeleton)
from mbs.models.streaming import MemoryPlan, gb, layer_store, memory_plan, remove_offload
from mbs.record.card import model_card, push, write_card
from mbs.record.export import check_export, quantizes
from mbs.record.identity import identity, provenance
from mbs.record.results import (SCHEMA_VERSION, RunResult, format_table, language_rows, risk_markdown, summary,
                                write_results)

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
    for key in ("device", "offload_device"):
        check_device_available(getattr(run.engine, key), f"engine.{key}")
    return counts


class UserError(ValueError):
    """Bad input, found before the model loads: reported as one line."""


class ResultsNotWritten(RuntimeError):
    """The run finished and its table was printed and logged, but the result files could not be written."""


class PushFailed(RuntimeError):
    """The run finished and wrote its results and checkpoint, but push_to_hub could not upload the checkpoint."""


def check_writable(directory: Path) -> None:
    """Fail before any work if the run directory cannot take files (read-only, not a directory, no permission)."""
    import tempfile

    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".mbs-write-check"):
            pass
    except OSError as err:
        raise UserError(f"the output directory {directory} is not writable ({err.strerror or err}); set "
                        f"hydra.run.dir (or hydra.sweep.dir) to a writable directory") from None


@dataclass
class Prepared:
    run: Run
    counts: dict[str, int]
    tokenizer: Any = None
    calibration: CalibrationSet | None = None
    windows: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    probe: CalibrationSet | None = None  # the similarity analysis's probe set (None: analysis.layers=[])
    analysis_layers: list[int] = field(default_factory=list)  # analysis.layers as absolute indices
    timings: dict[str, float] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=dict)  # name, chosen group options, schemas (mbs/record/identity.py)
    zeroshot: ZeroShot | None = None  # eval.tasks, checked against the harness's task registry
    source: SegmentSource | None = None  # any number of each language's calibration segments (engine.mode=cached)
    window_bytes: dict[str, list[int]] = field(default_factory=dict)  # per language and window: bytes predicted
    similarity_skipped: str | None = None  # why analysis.layers asked for a similarity that cannot be formed
    calibration_text: CalibrationText | None = None  # segment length and text per language vs what is drawn
    parameters: int = 0  # of the model, counted on its weightless skeleton
    hidden_size: int | None = None  # width of the activations the engine keeps between layers
    risk_skipped: str | None = None  # why risk.predict=true cannot predict this compression's damage
    prompts: dict[str, list[int]] = field(default_factory=dict)  # data=self: each language's generation prompt
    generated: dict[str, Any] | None = None  # data=self: settings, cache entries and language check (after generation)
    stream: bool = False  # decoder layers read from disk for their turn (engine.stream, or engine.max_memory)
    memory: MemoryPlan | None = None  # bytes the run holds at its peak, in memory and streamed


def prepare(cfg: DictConfig) -> Prepared:
    """Everything that depends on user input and not on the weights: config objects, counts, tokenized data."""
    try:
        run = build(cfg)
        spec = run.model
        t0 = time.perf_counter()
        tokenizer = None
        if spec.open_fields():  # model=hf: dtype, seqlen and BOS from the model's own config and tokenizer
            tokenizer = load_tokenizer(spec)
            log.info("model %s (%s): %s", spec.name, spec.path, spec.complete(model_config(spec), tokenizer))
        if spec.distribution_estimate:  # shares from the tokenizer, before anything needs them
            tokenizer = tokenizer or load_tokenizer(spec)
            spec.distribution = estimate_from_tokenizer(tokenizer, spec.estimate_sharpness)
            log.info("ESTIMATED language distribution (%s): %s", spec.distribution_source, spec.distribution)
        counts = plan(run)
        skeleton = model_skeleton(spec)
        check_positions(skeleton.config, {"model.seqlen": spec.seqlen, "calibration_seqlen": run.calibration_seqlen},
                        spec.name)
        check_modules(skeleton, run.compressor)  # layer shapes vs. the compressor, no weights loaded
        analysis_layers = similarity.resolve_layers(run.analysis.layers, len(Adapter(skeleton).layers))
        similarity_skipped = None
        if analysis_layers:
            similarity_skipped = similarity.centring_problem(run.analysis.statistic, list(run.eval.languages))
            if similarity_skipped:
                log.warning("language similarity SKIPPED: %s", similarity_skipped)
                analysis_layers = []
        if run.save_model:
            check_export(run.save_format, run.compressor, layer_modules(skeleton))
        PIPELINES[run.engine.mode].check(run.compressor, skeleton)  # what this engine.mode cannot do
        risk_skipped = damage.unsupported(run.compressor, skeleton) if run.risk.predict else None
        if run.risk.predict and not risk_skipped and run.engine.device != run.engine.offload_device:
            risk_skipped = (f"engine.device={run.engine.device} with engine.offload_device={run.engine.offload_device}"
                            f": the prediction's statistics forward holds the whole dense model on engine.device (as "
                            f"engine.mode=cached does); set engine.offload_device={run.engine.device} when the model "
                            f"fits there, or risk.predict=false")
        if risk_skipped:
            log.warning("predicted damage SKIPPED: %s", risk_skipped)
        tasks = resolve_tasks(list(run.eval.tasks), list(run.eval.suites), list(run.eval.languages))
        zeroshot = prepare_zeroshot(tasks, run.eval.zeroshot, model_cache(spec).root, run.eval.languages,
                                    run.data if isinstance(run.data, UDHRCorpus) else None, run.seed)
        seed_everything(run.seed)
        data = prepare_data(run, counts, tokenizer or load_tokenizer(spec), analysis_layers)
        memory, stream = None, False
        if run.engine.stream or run.engine.max_memory is not None:
            segments = data.calibration.total if data.calibration is not None else sum(counts.values())
            memory = memory_plan(skeleton, Adapter(skeleton).layers, getattr(torch, spec.dtype).itemsize,
                                 segments * data.text.seqlen,
                                 sum(w.numel() for ws in data.windows.values() for w in ws))
            stream = choose_streaming(run, memory)
    except ValueError as err:
        raise UserError(str(err)) from err
    return Prepared(run, counts, data.tokenizer, data.calibration, data.windows, data.probe, analysis_layers,
                    {"data_s": time.perf_counter() - t0}, identity(cfg), zeroshot, data.source, data.window_bytes,
                    similarity_skipped, data.text, sum(p.numel() for p in skeleton.parameters()),
                    getattr(getattr(skeleton, "config", None), "hidden_size", None), risk_skipped, data.prompts,
                    stream=stream, memory=memory)


def choose_streaming(run: Run, memory: MemoryPlan) -> bool:
    """Whether the run streams its decoder layers from disk: ``engine.stream=true``, or an ``engine.max_memory``
    that the model's weights and calibration activations would not fit in. A cap below what even a streamed run
    holds, or a streamed run asked for what streaming cannot do yet, is refused in one line (before the model
    loads)."""
    engine, name = run.engine, run.model.name
    cap = engine.max_memory_bytes
    if cap is not None and memory.streamed > cap:
        raise ValueError(f"engine.max_memory={engine.max_memory} is below the least a run of {name} needs even "
                         f"streamed: {gb(memory.streamed)} ({memory.streamed_parts()}); allow at least "
                         f"{gb(memory.streamed)}, or use fewer evaluation windows (eval.max_windows) or calibration "
                         f"segments (sampler.segments)")
    stream = engine.stream or (cap is not None and memory.in_memory > cap)
    if not stream:
        return False
    why = ("engine.stream=true" if engine.stream else
           f"{name} needs {gb(memory.in_memory)} in memory (weights and calibration activations), more than "
           f"engine.max_memory={engine.max_memory}, so its layers are streamed from disk")
    unsupported = [
        (engine.mode != "sequential", f"engine.mode={engine.mode}", "use engine.mode=sequential"),
        (run.risk.predict, "risk.predict=true", "set risk.predict=false"),
        (bool(run.eval.tasks or run.eval.suites), "zero-shot tasks (eval.tasks, eval.suites)",
         "drop the tasks"),
        (isinstance(run.data, SelfCorpus), "data=self", "calibrate on a corpus"),
    ]
    for refused, what, fix in unsupported:
        if refused:
            raise ValueError(f"{why}, and a streamed run cannot take {what} yet; {fix}"
                             f"{'' if engine.stream else ', or raise engine.max_memory'}")
    if not engine.stream:
        log.info("streaming: %s (at least %s)", why, gb(memory.streamed))
    return True


@dataclass
class RunData:
    tokenizer: Any
    text: CalibrationText
    calibration: CalibrationSet | None  # None with data=self: generated once the model is loaded
    windows: dict[str, list[torch.Tensor]]
    window_bytes: dict[str, list[int]]
    probe: CalibrationSet | None
    source: SegmentSource | None  # None with data=self: no corpus text to draw further segments from
    prompts: dict[str, list[int]] = field(default_factory=dict)  # data=self: each language's generation prompt


def prepare_data(run: Run, counts: dict[str, int], tokenizer: Any, analysis_layers: list[int]) -> RunData:
    """The tokenized data: calibration segments (of a length the calibration text can hold: calibration_text),
    evaluation windows with their bytes, the similarity probe; says which languages' calibration repeats itself."""
    spec = run.model
    cache = TokenCache(model_cache(spec).root / "tokens")
    probed = similarity.probe_languages(run.eval.languages, counts, run.data.languages()) if analysis_layers else []
    text = calibration_text(tokenizer, run.data, counts, spec.seqlen, spec.prepend_bos, run.calibration_seqlen,
                            probed, cache)
    if text.reason:
        log.warning("calibration segments shortened: %s", text.reason)
    generated = isinstance(run.data, SelfCorpus)
    prompts = {}
    if generated:  # the segments' length as data=udhr's; their text is generated once the model is loaded
        text = CalibrationText(text.seqlen, text.model_seqlen, text.reason, {}, {})
        prompts = {k: run.data.prompt(tokenizer, k, spec.prepend_bos, text.seqlen) for k, v in counts.items() if v}
        calibration = None
    else:
        text.check(run.calibration_max_repeats)
        calibration = calibration_mixture(tokenizer, run.data, spec.distribution, run.sampler, seqlen=text.seqlen,
                                          seed=run.seed, prepend_bos=spec.prepend_bos, cache=cache)
    windows = evaluation_windows(tokenizer, run.eval.corpus or run.data, run.eval.languages, seqlen=spec.seqlen,
                                 prepend_bos=spec.prepend_bos, max_windows=run.eval.max_windows or None, cache=cache)
    probe = None
    if analysis_layers:
        probe = similarity.build_probe(tokenizer, run.data, probed, run.analysis, text.seqlen, spec.prepend_bos,
                                       cache=cache)
    if generated:
        log.info("calibration: %d segments x %d tokens, generated by the model once it is loaded (data=self); per "
                 "language: %s", sum(counts.values()), text.seqlen, ", ".join(f"{k} {v}" for k, v in counts.items() if v))
    else:
        log.info("calibration: %d segments x %d tokens; per language segments (tokens drawn/tokens of text, repeats): "
                 "%s", calibration.total, text.seqlen, text.per_language(counts))
    if text.warning():
        log.warning(text.warning())
    source = None if generated else SegmentSource(tokenizer, run.data, text.seqlen, run.seed, spec.prepend_bos, cache)
    return RunData(tokenizer, text, calibration, windows, window_bytes(tokenizer, windows, spec.prepend_bos), probe,
                   source, prompts)


SELF_CALIBRATION_FILE = "calibration_self.jsonl"
OFFLOAD_DIR = "offload"  # <run dir>/offload: a streamed run's compressed layers until they are evaluated


def self_calibration(model: nn.Module, prepared: Prepared, dense_results: DenseResults, output_dir: Path
                     ) -> tuple[CalibrationSet, dict[str, Any]]:
    """data=self: each calibration language's segments generated by the dense model (cached per language, keyed by
    the weights, the prompt, the count, length, seed and generation settings, the device and the code), their
    language check, and every segment's text saved to ``<run dir>/calibration_self.jsonl`` for inspection."""
    run, tokenizer = prepared.run, prepared.tokenizer
    corpus, seqlen = run.data, prepared.calibration_text.seqlen
    ends = generated_module.end_ids(model, tokenizer)
    segments, checks, entries, rows = {}, {}, {}, []
    model.to(run.engine.device)
    for language, count in prepared.counts.items():
        if not count:
            segments[language] = torch.empty(0, seqlen, dtype=torch.long)
            continue
        prompt = prepared.prompts[language]
        key = {"language": language, "prompt": prompt, "count": count, "seqlen": seqlen, "seed": run.seed,
               "settings": corpus.settings(), "ends": sorted(ends), "device": run.engine.device,
               "dtype": str(next(model.parameters()).dtype), "code": source_fingerprint(generated_module)}

        def generate(language=language, count=count, prompt=prompt) -> dict[str, Any]:
            ids, starts = generated_module.generate_segments(model, prompt, count, seqlen, corpus, run.seed, language,
                                                             ends, run.engine.device)
            return {"ids": ids.tolist(), "starts": starts}

        value, source, entry = dense_results.get("self_calibration", key, generate)
        segments[language] = torch.tensor(value["ids"], dtype=torch.long).reshape(count, seqlen)
        checks[language], language_rows = generated_module.language_check(
            tokenizer, language, segments[language], value["starts"], len(prompt), corpus.min_script_share)
        checks[language]["prefix"] = corpus.prefix(language)
        entries[language] = {"source": source, "entry": entry}
        rows.extend(language_rows)
    atomic_write(output_dir / SELF_CALIBRATION_FILE,
                 "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    failed = sum(c["failed"] for c in checks.values())
    total = sum(c["segments"] for c in checks.values())
    line = ", ".join(f"{k} {c['failed']}/{c['segments']}" for k, c in checks.items())
    (log.warning if failed else log.info)(
        "self-calibration language check (script, min_script_share=%g): %d of %d generated segments fail: %s "
        "(the texts: %s)", corpus.min_script_share, failed, total, line, output_dir / SELF_CALIBRATION_FILE)
    record = {"method": "self-calibration (Williams et al., NAACL 2025), steered by a UDHR prefix per language",
              "settings": corpus.settings(), "min_script_share": corpus.min_script_share,
              "language_check": checks, "failed_share": round(failed / total, 4) if total else 0.0,
              "cache": entries, "file": SELF_CALIBRATION_FILE}
    return CalibrationSet(segments), record


@contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Seconds of the block into ``timings[key]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = time.perf_counter() - t0


def execute(cfg: DictConfig, prepared: Prepared, output_dir: Path) -> RunResult:
    """Load → dense evaluation (and similarity probe) → compress → compressed evaluation → the run's result."""
    run, spec, zeroshot = prepared.run, prepared.run.model, prepared.zeroshot
    timings = dict(prepared.timings)
    start, started = time.perf_counter(), time.time() - timings["data_s"]
    with timed(timings, "load_s"):
        try:
            model = (load_streamed(spec, output_dir / OFFLOAD_DIR, run.seed, run.engine.offload_device)
                     if prepared.stream else load_model(spec, seed=run.seed))
        except ValueError as err:  # a checkpoint the loader refused (mbs/models/loading.py): one line naming it
            raise UserError(str(err)) from err

    def evaluate() -> dict:
        if prepared.stream:
            return evaluate_streamed(model, prepared.windows, run.engine.device, run.engine.offload_device,
                                     batch_size=run.eval.batch_size, chunk_tokens=run.eval.chunk_tokens,
                                     progress=run.progress, window_bytes=prepared.window_bytes, dtype=run.eval.dtype)
        return perplexity(model, prepared.windows, device=run.engine.device, batch_size=run.eval.batch_size,
                          chunk_tokens=run.eval.chunk_tokens, progress=run.progress,
                          window_bytes=prepared.window_bytes, dtype=run.eval.dtype)

    with timed(timings, "fingerprint_s"):
        dense_results = DenseResults(model_cache(spec), weights_fingerprint(model), force=run.force)
    if prepared.calibration is None:  # data=self: generated by the dense model, before anything changes it
        with timed(timings, "generate_s"):
            prepared.calibration, prepared.generated = self_calibration(model, prepared, dense_results, output_dir)
    with timed(timings, "eval_dense_s"):
        dense, baseline = dense_perplexity(dense_results, evaluate, model, prepared.windows, run, prepared.window_bytes,
                                           prepared.stream)
    if zeroshot:
        with timed(timings, "zeroshot_dense_s"):
            zeroshot_dense = zeroshot.evaluate(model, prepared.tokenizer, spec.prepend_bos, run.progress)
    if not prepared.stream:  # a streamed model's layers are on disk already; its outer modules on offload_device
        model.to(run.engine.offload_device)
    language_similarity = None
    if prepared.probe is not None:  # on the dense model, before compression
        with timed(timings, "similarity_s"):
            vectors, baseline["similarity"] = dense_similarity(dense_results, model, prepared, run, prepared.stream)
            language_similarity = similarity.similarity_record(
                vectors, list(run.analysis.layers), prepared.counts, prepared.probe, run.analysis, run.data.name,
                list(run.eval.languages))
    risk = None
    if run.risk.predict and prepared.risk_skipped is None:  # on the dense model, before compression
        with timed(timings, "risk_s"):
            risk = predict_risk(model, prepared, dense_results.weights)
        model.to(run.engine.offload_device)
        print(risk_markdown(risk), flush=True)
    with timed(timings, "compress_s"):
        context = PipelineContext(progress=run.progress, source=prepared.source, weights=dense_results.weights,
                                  store=model_cache(spec), force=run.force)
        report = PIPELINES[run.engine.mode](model, run.compressor, prepared.calibration, run.engine, context)
    card = None
    if run.save_model:  # before the compressed evaluation: a crash there does not lose the compressed model
        with timed(timings, "save_s"):
            exported = export(model, output_dir / "model", run.compressor, prepared.tokenizer, run.save_format)
            card = ModelCardWriter(cfg, prepared, quantizes(run.compressor), report.sparsity,
                                   Path(exported["directory"]))
            card.write(None)  # says the evaluation did not finish, until the results replace it
    with timed(timings, "eval_compressed_s"):
        compressed = evaluate()
    if prepared.stream:  # the compressed layers were evaluated: their offloaded copies are not kept
        layer_store(model).remove()
    zeroshot_record = None
    if zeroshot:
        with timed(timings, "zeroshot_compressed_s"):
            rows = compare(zeroshot_dense, zeroshot.evaluate(model, prepared.tokenizer, spec.prepend_bos, run.progress))
        zeroshot_record = {"harness": harness_version(), "tasks": zeroshot.tasks, "suites": list(run.eval.suites),
                           "without_variant": {s: missing(s, list(run.eval.languages)) for s in run.eval.suites},
                           "limit": run.eval.zeroshot.limit,
                           "num_fewshot": run.eval.zeroshot.num_fewshot, "results": rows}
    timings["total_s"] = time.perf_counter() - start + timings["data_s"]
    segments = {k: int(t.shape[0]) for k, t in prepared.calibration.segments.items()}
    rows = language_rows(dense, compressed, absolute_shares(spec.distribution), run.eval.low_resource_share, segments)
    result = run_result(cfg, prepared, model, rows, report, language_similarity, baseline, timings)
    result.zeroshot = zeroshot_record
    if risk is not None:
        risk["measured_log_ratio"] = {r["language"]: r["log_ratio"] for r in rows if r["language"] in risk["predicted"]}
        risk["spearman"] = damage.spearman_or_none(risk["predicted"], risk["measured_log_ratio"])
    result.risk = risk
    result.risk_skipped = prepared.risk_skipped
    if card is not None:
        result.export = exported
        card.write(rows)
    result.provenance = provenance(spec.revision, started)
    return result


def predict_risk(model: nn.Module, prepared: Prepared, weights: str) -> dict[str, Any]:
    """The predicted damage of every evaluated language under the run's calibration counts (mbs/analyze/damage.py):
    from the dense model's statistics of ``risk.segments`` calibration segments per language (kept in the model's
    cache with ``engine.mode=cached``'s) and the log ratio on ``risk.probe`` further calibration segments of each
    (a language without calibration text in the corpus is listed, not predicted)."""
    run = prepared.run
    statistics = LanguageStatistics(model, prepared.source, weights, model_cache(run.model), run.engine.device,
                                    force=run.force, pool=run.risk.segments)
    available = set(run.data.languages())
    targets = [k for k in run.eval.languages if k in available]
    predictor = damage.DamagePredictor(model, run.compressor, statistics, targets, run.risk.segments, run.risk.probe,
                                       run.engine.device, run.eval.dtype)
    assessment = predictor.assess(prepared.counts)
    return {"method": damage.METHOD, "segments_per_language": run.risk.segments,
            "probe_segments_per_language": run.risk.probe, "split": "calibration",
            "predicted": assessment.log_ratio, "output_error_method": damage.OUTPUT_ERROR,
            "output_error": assessment.output_error, "per_layer": assessment.per_layer,
            "not_predicted": {**{k: f"no calibration text in {run.data.name}" for k in run.eval.languages
                                 if k not in available}, **predictor.skipped}}


def calibration_record(prepared: Prepared) -> dict[str, Any]:
    """results.json's ``calibration``: segments per language, their total, length and the text each was drawn from."""
    return {"segments": {k: int(t.shape[0]) for k, t in prepared.calibration.segments.items()},
            "total": prepared.calibration.total, **prepared.calibration_text.record(),
            **({"generated": prepared.generated} if prepared.generated is not None else {})}


@dataclass
class ModelCardWriter:
    """The exported checkpoint's model card (mbs/record/card.py), written once without results and again with them."""

    cfg: DictConfig
    prepared: Prepared
    quantized: bool
    sparsity: float
    directory: Path

    def write(self, rows: list[dict[str, Any]] | None) -> None:
        card = model_card(OmegaConf.to_container(self.cfg, resolve=True), self.prepared.identity,
                          experiment_id(self.cfg), calibration_record(self.prepared), self.quantized, self.sparsity,
                          rows)
        write_card(self.directory, card)


def run_result(cfg: DictConfig, prepared: Prepared, model: nn.Module, rows: list[dict[str, Any]],
               report: CompressionReport, language_similarity: dict[str, Any] | None, baseline: dict[str, Any],
               timings: dict[str, float]) -> RunResult:
    """The run's result from what the stages returned."""
    run, spec = prepared.run, prepared.run.model
    return RunResult(
        schema_version=SCHEMA_VERSION,
        experiment_id=experiment_id(cfg),
        run=prepared.identity,
        config=OmegaConf.to_container(cfg, resolve=True),
        model={"name": spec.name, "path": spec.path or None, "revision": spec.revision,
               "parameters": sum(p.numel() for p in model.parameters()),
               # as run: model=hf reads these from the model's config and tokenizer (config keeps "auto"/null)
               "dtype": spec.dtype, "seqlen": spec.seqlen, "prepend_bos": spec.prepend_bos,
               "distribution_source": spec.distribution_source, "distribution_is_proxy": spec.distribution_is_proxy,
               "distribution": absolute_shares(spec.distribution)},
        calibration=calibration_record(prepared),
        languages=rows,
        summary=summary(rows, run.eval.low_resource_share),
        compression={"method": type(run.compressor).__name__.lower(), "sparsity": report.sparsity,
                     "zeros": report.zeros, "params": report.params, "layers": report.layers,
                     "uncalibrated": report.uncalibrated,  # MoE experts no calibration token reached: left as is
                     "mode": run.engine.mode,  # sequential, or cached: non-sequential from cached statistics
                     # decoder layers streamed from disk (engine.stream, engine.max_memory): the same numbers
                     **({"stream": True} if prepared.stream else {}),
                     **({"statistics_blocks": report.statistics_blocks} if report.statistics_blocks else {}),
                     # layer_sparsity=owl: outlier ratios, target sparsity per layer, zeros planned (exact globally)
                     **({"layer_profile": report.profile} if report.profile else {})},
        similarity=language_similarity,
        similarity_skipped=prepared.similarity_skipped,
        dense_baseline=baseline,
        timings=timings,
        # numeric_environment: threads, versions, CPU model and float-kernel flags, BLAS, oneDNN; the GPU on cuda
        environment={**numeric_environment(run.engine.device), "python": platform.python_version(),
                     "device": run.engine.device})


def dense_perplexity(dense_results: DenseResults, evaluate: Callable[[], dict[str, LanguageLoss]], model: nn.Module,
                     windows: dict[str, list[torch.Tensor]], run: Run,
                     window_bytes: dict[str, list[int]] | None = None, stream: bool = False
                     ) -> tuple[dict[str, LanguageLoss], dict]:
    """The dense per-language perplexity, from the cache when this model's weights were evaluated on these very
    windows with these settings and code before. The cache holds the NLL and token count; the bytes (for bits per
    byte) are the windows' own, ``window_bytes``, taken afresh in every run since they depend on the text only."""
    key = {"windows": tokens_fingerprint(windows), "dtype": str(next(model.parameters()).dtype),
           "device": run.engine.device, "batch_size": run.eval.batch_size, "chunk_tokens": run.eval.chunk_tokens,
           "eval_dtype": run.eval.dtype, "code": source_fingerprint(perplexity_module, adapter_module),
           **streamed_key(stream, streamed_module)}
    value, source, entry = dense_results.get(
        "perplexity", key, lambda: {k: [v.nll, v.tokens] for k, v in evaluate().items()})
    log.info("dense perplexity: %s (%s)", source, entry)
    return ({k: LanguageLoss(nll, tokens, language_bytes(window_bytes, k, windows[k]))
             for k, (nll, tokens) in value.items()}, {"perplexity": source, "perplexity_entry": entry})


def streamed_key(stream: bool, *modules: Any) -> dict[str, str]:
    """A streamed computation's part of a cache key: its own code (an in-memory key is left as it was, so streamed
    and in-memory entries are computed separately, though their numbers are equal)."""
    return {"stream": source_fingerprint(streaming_module, *modules)} if stream else {}


def dense_similarity(dense_results: DenseResults, model: nn.Module, prepared: Prepared, run: Run, stream: bool = False
                     ) -> tuple[dict[int, dict[str, torch.Tensor]], str]:
    """The similarity probe's activation vectors of the dense model, from the cache when computed before."""
    kind = similarity.STATISTICS[run.analysis.statistic].source
    key = {"probe": tokens_fingerprint(prepared.probe.segments), "layers": prepared.analysis_layers,
           "source": kind, "device": run.engine.device, "batch_size": run.engine.batch_size,
           "code": source_fingerprint(similarity, engine_module, statistics_module, adapter_module),
           **streamed_key(stream)}

    def compute() -> dict:
        vectors = similarity.language_vectors(model, prepared.probe, prepared.analysis_layers, run.engine, kind)
        return {str(i): {k: v.tolist() for k, v in by_language.items()} for i, by_language in vectors.items()}

    value, source, _ = dense_results.get("similarity", key, compute)
    return {int(i): {k: torch.tensor(v, dtype=torch.float32) for k, v in by_language.items()}
            for i, by_language in value.items()}, source


def plan_text(prepared: Prepared) -> str:
    """What a run would do, from what ``prepare`` found without loading the model (``dry_run=true``)."""
    run, text, calibration = prepared.run, prepared.calibration_text, prepared.calibration
    bytes_per = getattr(torch, run.model.dtype).itemsize
    total = calibration.total if calibration is not None else sum(prepared.counts.values())
    if calibration is None:  # data=self
        per_language = ", ".join(f"{k} {v}" for k, v in prepared.counts.items() if v)
        source = (f"generated by the model once it loads (data=self: t_initial={run.data.t_initial}, "
                  f"t_final={run.data.t_final} over t_steps={run.data.t_steps}, prefixes of {run.data.prefix_words} "
                  f"words); per language, segments")
    else:
        per_language = ", ".join(f"{k} {int(t.shape[0])} ({text.requested[k]:,} of {text.available[k]:,} tokens, "
                                 f"x{text.repeats[k]:.1f})" for k, t in calibration.segments.items() if t.shape[0])
        source = "per language, segments (tokens drawn of its calibration text, repeats)"
    windows = [w for ws in prepared.windows.values() for w in ws]
    lines = [f"mbs: DRY RUN of {prepared.identity['name']}: no weights are loaded, nothing is compressed or written",
             f"model: {run.model.name}, {prepared.parameters:,} parameters in {run.model.dtype}: "
             f"{prepared.parameters * bytes_per / 1e9:.2f} GB of weights where the model waits "
             f"(engine.offload_device={run.engine.offload_device})",
             f"calibration: {total} segments x {text.seqlen} tokens = {total * text.seqlen:,} tokens; {source}: "
             f"{per_language}"]
    memory = prepared.memory
    if memory is not None and (run.engine.stream or run.engine.max_memory is not None):
        lines.append(f"memory: {gb(memory.in_memory)} in memory (weights and calibration activations), at least "
                     f"{gb(memory.streamed)} streamed ({memory.streamed_parts()}); this run "
                     + ("streams its decoder layers from disk, writing the compressed ones to <run dir>/offload "
                        "until they are evaluated" if prepared.stream else "keeps the model in memory"))
    if text.reason:
        lines.append(f"calibration segments shortened: {text.reason}")
    if text.warning():
        lines.append(text.warning())
    if prepared.hidden_size:
        activations = total * text.seqlen * prepared.hidden_size * bytes_per
        lines.append(f"activations kept between layers: {activations / 1e9:.2f} GB on engine.device="
                     f"{run.engine.device} (computed from the widths: segments x seqlen x hidden size x "
                     f"{bytes_per} bytes; about twice that while a layer runs), plus one decoder layer")
        if run.compressor.needs_profile:
            lines.append(f"compressor.layer_sparsity={run.compressor.layer_sparsity}: a dense pre-pass over every "
                         f"layer first (one more statistics forward and layer forward per layer; a third copy of the "
                         f"activations while it runs)")
    lines.append(f"evaluation: {len(prepared.windows)} languages, {len(windows)} windows of up to "
                 f"{run.model.seqlen} tokens, {sum(w.numel() for w in windows):,} tokens, dense and compressed")
    if prepared.probe is not None:
        lines.append(f"similarity probe: {prepared.probe.total} segments of {text.seqlen} tokens "
                     f"({run.analysis.statistic}, layers {list(run.analysis.layers)})")
    if run.risk.predict:
        lines.append(f"predicted damage: SKIPPED ({prepared.risk_skipped})" if prepared.risk_skipped else
                     f"predicted damage: {run.risk.segments} calibration segments per evaluated and calibration "
                     f"language through the dense model (cached in the model's cache), then {run.risk.probe} more "
                     f"per evaluated language through the dense model and the model compressed from those "
                     f"statistics, before compressing")
    lines.append("time: not estimated (it depends on the machine; the README gives measured runs)")
    return "\n".join(lines)


def run(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any]:
    """Execute one run with its logger around it; the logger finishes even when the run fails. The table is printed
    and logged before the result files are written, so a full disk at the end loses neither. Returns results.json's
    content (:meth:`RunResult.to_json`); with ``dry_run=true`` only prints the plan (``{"dry_run": plan}``)."""
    output_dir = Path(output_dir)
    if cfg.get("dry_run", False):
        plan = plan_text(prepare(cfg))
        print(plan, flush=True)
        return {"dry_run": plan}
    check_writable(output_dir)
    prepared = prepare(cfg)
    config = {**OmegaConf.to_container(cfg, resolve=True), **{k: v for k, v in prepared.identity.items() if k != "name"}}
    logger = prepared.run.logger.start(config, str(output_dir), name=prepared.identity["name"])
    try:
        result = execute(cfg, prepared, output_dir)
        print(format_table(result), flush=True)
        try:
            logger.log_results(result)
        except OSError as err:  # e.g. the disk filled while W&B copied figures: the result files come first
            log.warning("the logger could not record the results (%s: %s); writing the result files anyway",
                        type(err).__name__, err.strerror or err)
        try:
            if result.similarity:  # before results.json, which marks the run as finished
                write_similarity(output_dir, result.similarity, model_label(result))
            write_results(output_dir, result)
        except OSError as err:
            raise ResultsNotWritten(f"could not write the result files to {output_dir} ({err.strerror or err}); "
                                    f"the table above and the logger hold the results; no file was half-written"
                                    ) from err
    except BaseException:
        logger.finish(failed=True)
        if prepared.stream:  # a streamed run's compressed layers are of no use once it failed
            remove_offload(output_dir / OFFLOAD_DIR)
        raise
    try:
        logger.finish()
    except OSError as err:  # the result files are written; a logger that cannot flush (full disk) loses only itself
        log.warning("the logger could not finish (%s: %s); the result files are written", type(err).__name__,
                    err.strerror or err)
    if prepared.run.push_to_hub and result.export:
        push_checkpoint(Path(result.export["directory"]), prepared.run.push_to_hub)
    return result.to_json()


def push_checkpoint(directory: Path, repo_id: str) -> None:
    """Upload the exported checkpoint once the results are written; a failure says what is kept and how to retry."""
    try:
        url = push(directory, repo_id)
    except Exception as err:  # noqa: BLE001 - network, authentication, permissions: all said in one line
        raise PushFailed(f"could not push {directory} to the hub repository {repo_id} ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); the results and the checkpoint are "
                         f"written; retry with: hf upload {repo_id} {directory} .") from err
    print(f"mbs: pushed {directory} to {url}", flush=True)
