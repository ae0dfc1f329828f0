"""Structured configs: every Hydra group option extends a schema registered here, so a misspelt key or a value of
the wrong type fails at composition, and building the objects (``OmegaConf.to_object``) runs each class's checks
before the model is loaded."""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from mbs.analyze.damage import RiskConfig
from mbs.analyze.similarity import AnalysisConfig
from mbs.compress.engine import EngineConfig
from mbs.compress.registry import COMPRESSORS
from mbs.data.calibration import REPEAT_LIMIT
from mbs.data.corpora import UDHRCorpus
from mbs.data.generated import SelfCorpus
from mbs.data.hub import HubCorpus
from mbs.data.local import LocalCorpus
from mbs.data.languages import PAPER_LANGUAGES, check_languages
from mbs.data.sampling import (CountsSampler, MonolingualSampler, OptimizedSampler, ProportionalSampler,
                               TemperatureSampler, UniformSampler)
from mbs.evaluate.perplexity import check_eval_dtype
from mbs.evaluate.suites import check_suites
from mbs.evaluate.zeroshot import ZeroShotConfig
from mbs.models.spec import ModelSpec, name_from_path
from mbs.record.export import check_format
from mbs.record.jobs import job_dirname
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
    # precision of the evaluation (mbs.evaluate.perplexity.EVAL_DTYPES): float32-head (the body in the model's dtype,
    # logits from its hidden states in fp32), model (all in the model's dtype), float32 (every weight cast to fp32)
    dtype: str = "float32-head"
    # summary: a language whose training share (a fraction of the model's whole distribution) is below this is
    # low-resource; 0.01 = 1%
    low_resource_share: float = LOW_RESOURCE_SHARE
    tasks: list[str] = field(default_factory=list)  # lm-eval task/group names, zero-shot on dense and compressed
    # multilingual lm-eval suites (mbs/evaluate/suites.py: belebele, xnli, ...), run in the evaluated languages
    suites: list[str] = field(default_factory=list)
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)

    def __post_init__(self) -> None:
        check_languages(self.languages, "eval.languages")
        if not self.languages:
            raise ValueError("eval.languages is empty; give at least one language")
        for key, least, meaning in (("batch_size", 1, "windows per forward"),
                                    ("chunk_tokens", 1, "tokens per loss chunk"),
                                    ("max_windows", 0, "windows per language, 0 = all")):
            if getattr(self, key) < least:
                raise ValueError(f"eval.{key}={getattr(self, key)} is out of range; allowed: an integer >= {least} "
                                 f"({meaning})")
        check_eval_dtype(self.dtype)
        if not 0 < self.low_resource_share < 1:
            raise ValueError(f"eval.low_resource_share={self.low_resource_share} must be a fraction in (0, 1) of the "
                             f"model's training distribution (0.01 = 1%)")
        repeated = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
        if repeated:
            raise ValueError(f"eval.tasks repeats {', '.join(repeated)}; give each task once")
        check_suites(self.suites, list(self.languages))
        if not self.tasks and not self.suites:  # the harness's settings would be ignored without a task
            unused = [f"eval.zeroshot.{f.name}={getattr(self.zeroshot, f.name)}"
                      for f in dataclasses.fields(ZeroShotConfig) if getattr(self.zeroshot, f.name) != f.default]
            if unused:
                raise ValueError(f"{', '.join(unused)} applies only with zero-shot tasks, and eval.tasks is empty; "
                                 f"set eval.tasks (or zeroshot=udhr) or eval.suites, or leave eval.zeroshot at its "
                                 f"defaults")


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
    risk: RiskConfig = field(default_factory=RiskConfig)
    seed: int = 0
    progress: bool = True
    force: bool = False  # re-run jobs whose results already exist (multirun, mbs/sweep.py) and recompute cached dense
    # results and statistics (mbs/evaluate/baseline.py, mbs/compress/cached.py)
    save_model: bool = False  # write the compressed model (safetensors + config + tokenizer) to <run dir>/model
    save_format: str = "compressed-tensors"  # or dense (mbs/record/export.py)
    # tokens per calibration segment; None: model.seqlen, shortened when the calibration text cannot hold one
    calibration_seqlen: Optional[int] = None
    dry_run: bool = False  # print the plan (segments, tokens, memory) and stop before the model loads
    # refuse a calibration whose segments draw more than this many tokens per token of a language's text
    calibration_max_repeats: float = REPEAT_LIMIT
    push_to_hub: Optional[str] = None  # org/name: upload the exported model (implies save_model) to this hub repo


SCHEMAS: dict[str, dict[str, type]] = {
    "model": {"model_schema": ModelSpec},
    "data": {"udhr_schema": UDHRCorpus, "hub_schema": HubCorpus, "local_schema": LocalCorpus,
             "self_schema": SelfCorpus},
    "sampler": {"proportional_schema": ProportionalSampler, "uniform_schema": UniformSampler,
                "temperature_schema": TemperatureSampler,
                "counts_schema": CountsSampler, "monolingual_schema": MonolingualSampler,
                "optimized_schema": OptimizedSampler},
    # every @register_compressor class (mbs/compress/registry.py), as <name>_schema
    "compressor": {f"{name}_schema": schema for name, schema in COMPRESSORS.items()},
    "eval": {"eval_schema": EvalConfig},
    "logger": {"wandb_schema": WandbLogger, "none_schema": NoLogger},
}


# model=hf names the model after its path (``name: ${mbs.model_name:${.path}}``), so the run directory does too.
OmegaConf.register_new_resolver("mbs.model_name", name_from_path, replace=True)
# a sweep job's directory is named after its overrides, always one path component (hydra.sweep.subdir)
OmegaConf.register_new_resolver("mbs.dirname", job_dirname, replace=True)


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
    calibration_max_repeats: float = REPEAT_LIMIT
    push_to_hub: Optional[str] = None
    risk: RiskConfig = field(default_factory=RiskConfig)

    def __post_init__(self) -> None:
        check_format(self.save_format)
        if self.push_to_hub is not None:
            check_push(self.push_to_hub)
            self.save_model = True  # the pushed directory is the exported one
        if not self.save_model and self.save_format != Run.save_format:
            raise ValueError(f"save_format={self.save_format} applies only with save_model=true; set save_model=true "
                             f"to write the model, or leave save_format at {Run.save_format}")
        if isinstance(self.data, SelfCorpus):
            check_self_calibration(self.engine, self.risk)
        if not self.calibration_max_repeats > 0:
            raise ValueError(f"calibration_max_repeats={self.calibration_max_repeats} must be > 0 (tokens drawn per "
                             f"token of a language's calibration text)")


def check_self_calibration(engine: EngineConfig, risk: RiskConfig) -> None:
    """data=self generates the calibration segments once the model is loaded; what draws further segments of a
    language from a corpus's text (engine.mode=cached's statistics, risk.predict's) has no text to draw them from."""
    if engine.mode != "sequential":
        raise ValueError(f"engine.mode={engine.mode} with data=self: cached statistics are drawn from a corpus's "
                         f"text, and data=self generates its segments with the model; use engine.mode=sequential")
    if risk.predict:
        raise ValueError("risk.predict=true with data=self: the prediction's statistics are drawn from a corpus's "
                         "text, and data=self generates its segments with the model; set risk.predict=false")


def unknown_key(path: str, known: list[str]) -> str:
    """The one line for a key that no schema has, with the closest known names (a typo is the usual cause)."""
    parent, _, key = path.rpartition(".")
    prefix = f"{parent}." if parent else ""
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(prefix + c for c in close)}? " if close else ""
    where = f"the keys of {parent}" if parent else "the top-level keys"
    return f"unknown key {path}: {hint}{where} are {', '.join(sorted(known))}"


def check_keys(cfg: DictConfig, path: str = "") -> None:
    """Refuse a key no schema declares (``+compressor.sparsty=0.9`` would otherwise be stored in results.json and
    ignored). Nodes typed by a dataclass are closed; plain dicts (``model.distribution``, ``sampler.per_language``)
    stay open-ended, as their schemas declare them."""
    schema = OmegaConf.get_type(cfg) if path else RunConfig
    if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
        return
    known = [f.name for f in dataclasses.fields(schema)]
    for key in cfg.keys():
        full = f"{path}.{key}" if path else str(key)
        if not path and key == "hydra":
            continue
        if key not in known:
            raise ValueError(unknown_key(full, known))
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
            check_keys(node, full)


def _describe(annotation: Any) -> str:
    """A field's type in words: ``Optional[int]`` → 'an integer or null'."""
    text = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
    optional = text.startswith("Optional[")
    text = text[len("Optional["):-1] if optional else text
    words = {"bool": "a boolean (true or false)", "int": "an integer", "float": "a number", "str": "a string"}
    base = text.split("[")[0].lower()
    text = words.get(text) or {"list": "a list, e.g. [a,b]", "dict": "a mapping, e.g. {a: 1}"}.get(base, text)
    return text + (" or null" if optional else "")


def config_error_line(err: BaseException) -> str | None:
    """One line for Hydra's multi-line composition errors (an unknown key without ``+``, a value of the wrong type):
    the key, the value and what is expected; None for errors that are not about a key's value."""
    cause = err if isinstance(err, OmegaConfBaseException) else err.__cause__
    if not isinstance(cause, OmegaConfBaseException) or not getattr(cause, "full_key", None):
        return None
    key, schema = str(cause.full_key), getattr(cause, "object_type", None)
    fields = ({f.name: f.type for f in dataclasses.fields(schema)}
              if isinstance(schema, type) and dataclasses.is_dataclass(schema) else {})
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and fields:
        return unknown_key(key, list(fields))
    if isinstance(cause, ValidationError):
        value = getattr(cause, "value", None)
        expected = fields.get(key.rpartition(".")[2])
        if expected is not None:
            return f"{key}={value!r} is not {_describe(expected)}"
        return f"{key}={value!r}: {str(cause.msg or cause).splitlines()[0]}"
    return None


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
    check_keys(cfg)
    seed = cfg.seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed={seed!r} is out of range; allowed: an integer in 0..{MAX_SEED} (numpy's seed range)")
    parts = {key: OmegaConf.to_object(cfg[key]) if OmegaConf.is_config(cfg[key]) else cfg[key]
             for key in ("model", "data", "sampler", "compressor", "eval", "logger", "engine", "analysis", "risk")
             if key != "risk" or "risk" in cfg}  # configs composed before risk existed build without it
    return Run(**parts, seed=int(cfg.seed), progress=bool(cfg.progress), save_model=bool(cfg.save_model),
               save_format=str(cfg.get("save_format", "compressed-tensors")), force=bool(cfg.get("force", False)),
               calibration_seqlen=cfg.get("calibration_seqlen"), dry_run=bool(cfg.get("dry_run", False)),
               calibration_max_repeats=float(cfg.get("calibration_max_repeats", REPEAT_LIMIT)),
               push_to_hub=cfg.get("push_to_hub"))
