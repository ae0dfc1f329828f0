"""Structured configs: every Hydra group option extends a schema registered here, so a misspelt key or a value of
the wrong type fails at composition, and building the objects (``OmegaConf.to_object``) runs each class's checks
before the model is loaded."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from mbs.analyze.similarity import AnalysisConfig
from mbs.compress.engine import EngineConfig
from mbs.compress.registry import COMPRESSORS
from mbs.data.corpora import UDHRCorpus
from mbs.data.hub import HubCorpus
from mbs.data.local import LocalCorpus
from mbs.data.languages import PAPER_LANGUAGES, check_languages
from mbs.data.sampling import (CountsSampler, MonolingualSampler, ProportionalSampler, TemperatureSampler,
                               UniformSampler)
from mbs.evaluate.zeroshot import ZeroShotConfig
from mbs.models.spec import ModelSpec
from mbs.record.export import check_format
from mbs.record.loggers import NoLogger, WandbLogger
from mbs.record.results import LOW_RESOURCE_SHARE


# The run configs (conf/ of the checkout, linked as the package mbs.conf; a wheel carries a copy, pyproject.toml).
CONFIG_SEARCH_PATH = "pkg://mbs.conf"


def config_dir() -> Path:
    """The directory behind ``pkg://mbs.conf``: the checkout's conf/ (through the link mbs/conf) or the wheel's copy."""
    return Path(__file__).resolve().parent / "conf"


@dataclass
class EvalConfig:
    languages: list[str] = field(default_factory=lambda: list(PAPER_LANGUAGES))
    corpus: Any = None  # None: the calibration corpus (its evaluation split)
    batch_size: int = 8
    chunk_tokens: int = 256  # tokens per loss chunk (its fp32 logits are formed one vocabulary slice at a time)
    max_windows: int = 0  # per language; 0 = all
    # summary: a language whose training share (a fraction of the model's whole distribution) is below this is
    # low-resource; 0.01 = 1%
    low_resource_share: float = LOW_RESOURCE_SHARE
    tasks: list[str] = field(default_factory=list)  # lm-eval task/group names, zero-shot on dense and compressed
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)

    def __post_init__(self) -> None:
        check_languages(self.languages, "eval.languages")
        if not self.languages:
            raise ValueError("eval.languages is empty; give at least one language")
        if self.batch_size < 1 or self.chunk_tokens < 1 or self.max_windows < 0:
            raise ValueError("eval.batch_size and eval.chunk_tokens must be >= 1 and eval.max_windows >= 0")
        if not 0 < self.low_resource_share < 1:
            raise ValueError(f"eval.low_resource_share={self.low_resource_share} must be a fraction in (0, 1) of the "
                             f"model's training distribution (0.01 = 1%)")
        repeated = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
        if repeated:
            raise ValueError(f"eval.tasks repeats {', '.join(repeated)}; give each task once")


@dataclass
class RunConfig:
    model: ModelSpec = MISSING
    data: Any = MISSING
    sampler: Any = MISSING
    compressor: Any = MISSING
    eval: EvalConfig = MISSING
    logger: Any = MISSING
    engine: EngineConfig = field(default_factory=EngineConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    seed: int = 0
    progress: bool = True
    force: bool = False  # re-run jobs whose results already exist (multirun, mbs/sweep.py) and recompute cached dense
    # results and statistics (mbs/evaluate/baseline.py, mbs/compress/cached.py)
    save_model: bool = False  # write the compressed model (safetensors + config + tokenizer) to <run dir>/model
    save_format: str = "compressed-tensors"  # or dense (mbs/record/export.py)
    # tokens per calibration segment; None: model.seqlen, shortened when the calibration text cannot hold one
    calibration_seqlen: Optional[int] = None
    dry_run: bool = False  # print the plan (segments, tokens, memory) and stop before the model loads


SCHEMAS: dict[str, dict[str, type]] = {
    "model": {"model_schema": ModelSpec},
    "data": {"udhr_schema": UDHRCorpus, "hub_schema": HubCorpus, "local_schema": LocalCorpus},
    "sampler": {"proportional_schema": ProportionalSampler, "uniform_schema": UniformSampler,
                "temperature_schema": TemperatureSampler,
                "counts_schema": CountsSampler, "monolingual_schema": MonolingualSampler},
    # every @register_compressor class (mbs/compress/registry.py), as <name>_schema
    "compressor": {f"{name}_schema": schema for name, schema in COMPRESSORS.items()},
    "eval": {"eval_schema": EvalConfig},
    "logger": {"wandb_schema": WandbLogger, "none_schema": NoLogger},
}


def register(store: ConfigStore | None = None) -> None:
    """Register the top-level schema and each group's schemas (idempotent). The schemas are stored at the root, not
    in their group, so `--help` lists only real options; a group option extends its schema with
    ``- /<name>_schema@_here_`` in its defaults list."""
    store = store or ConfigStore.instance()
    store.store(name="run_schema", node=RunConfig)
    for schemas in SCHEMAS.values():
        for name, node in schemas.items():
            store.store(name=name, node=node)


MAX_SEED = 2**32 - 1


@dataclass
class Run:
    """The objects a run is made of, built and checked from the composed config."""

    model: ModelSpec
    data: Any
    sampler: Any
    compressor: Any
    eval: EvalConfig
    logger: Any
    engine: EngineConfig
    seed: int
    progress: bool
    save_model: bool = False
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    save_format: str = "compressed-tensors"
    force: bool = False
    calibration_seqlen: Optional[int] = None
    dry_run: bool = False

    def __post_init__(self) -> None:
        check_format(self.save_format)


def build(cfg: DictConfig) -> Run:
    """Turn the composed config into checked objects; every ValueError raised here names the bad value."""
    seed = cfg.seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed={seed!r} is out of range; allowed: an integer in 0..{MAX_SEED} (numpy's seed range)")
    parts = {key: OmegaConf.to_object(cfg[key]) if OmegaConf.is_config(cfg[key]) else cfg[key]
             for key in ("model", "data", "sampler", "compressor", "eval", "logger", "engine", "analysis")}
    return Run(**parts, seed=int(cfg.seed), progress=bool(cfg.progress), save_model=bool(cfg.save_model),
               save_format=str(cfg.get("save_format", "compressed-tensors")), force=bool(cfg.get("force", False)),
               calibration_seqlen=cfg.get("calibration_seqlen"), dry_run=bool(cfg.get("dry_run", False)))
