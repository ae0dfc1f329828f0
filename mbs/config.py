"""Structured configs: every Hydra group option extends a schema registered here, so a misspelt key or a value of
the wrong type fails at composition, and building the objects (``OmegaConf.to_object``) runs each class's checks
before the model is loaded."""
from __future__ import annotations

from dataclasses import dataclass, field
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
from mbs.evaluate.perplexity import check_eval_dtype
from mbs.evaluate.zeroshot import ZeroShotConfig
from mbs.models.spec import ModelSpec
from mbs.record.export import check_format
from mbs.record.loggers import NoLogger, WandbLogger
from mbs.record.results import LOW_RESOURCE_SHARE


@dataclass
class EvalConfig:
    languages: list[str] = field(default_factory=lambda: list(PAPER_LANGUAGES))
    corpus: Any = None  # None: the calibration corpus (its evaluation split)
    batch_size: int = 8
    chunk_tokens: int = 256  # tokens per loss chunk (its fp32 logits are formed one vocabulary slice at a time)
    max_windows: int = 0  # per language; 0 = all
    # precision of the evaluation (mbs.evaluate.perplexity.EVAL_DTYPES): float32-head (the body in the model's dtype,
    # logits from its hidden states in fp32), model (all in the model's dtype), float32 (every weight cast to fp32)
    dtype: str = "float32-head"
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
        check_eval_dtype(self.dtype)
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
    push_to_hub: Optional[str] = None  # org/name: upload the exported model (implies save_model) to this hub repo


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
    push_to_hub: Optional[str] = None

    def __post_init__(self) -> None:
        check_format(self.save_format)
        if self.push_to_hub is not None:
            check_push(self.push_to_hub)
            self.save_model = True  # the pushed directory is the exported one


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (1, ON, YES, TRUE, any case)."""
    import os

    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def check_push(repo_id: Any) -> None:
    """push_to_hub: a hub model repository id, and a hub to reach; refused before anything loads."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"push_to_hub={repo_id!r} is not a hub repository id; give org/name (or null: no push)")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ValueError(f"push_to_hub={repo_id!r} is not a hub repository id; give org/name (letters, digits, "
                         f"'-', '_', '.'; at most 96 characters)") from None
    if hub_offline():
        raise ValueError(f"push_to_hub={repo_id} needs the hub, but HF_HUB_OFFLINE is set; unset HF_HUB_OFFLINE "
                         f"or drop push_to_hub (save_model=true keeps the checkpoint in the run directory)")


def build(cfg: DictConfig) -> Run:
    """Turn the composed config into checked objects; every ValueError raised here names the bad value."""
    seed = cfg.seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed={seed!r} is out of range; allowed: an integer in 0..{MAX_SEED} (numpy's seed range)")
    parts = {key: OmegaConf.to_object(cfg[key]) if OmegaConf.is_config(cfg[key]) else cfg[key]
             for key in ("model", "data", "sampler", "compressor", "eval", "logger", "engine", "analysis")}
    return Run(**parts, seed=int(cfg.seed), progress=bool(cfg.progress), save_model=bool(cfg.save_model),
               save_format=str(cfg.get("save_format", "compressed-tensors")), force=bool(cfg.get("force", False)),
               calibration_seqlen=cfg.get("calibration_seqlen"), dry_run=bool(cfg.get("dry_run", False)),
               push_to_hub=cfg.get("push_to_hub"))
