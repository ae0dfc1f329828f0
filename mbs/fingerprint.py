"""What identifies a run and its cached parts, in one place: the experiment id (config, input files, numeric
environment), the numeric environment itself, and the fingerprints of weights, token windows, code, tokenizers and
corpora that cache keys are made of. Every corpus declares the files it reads (``source_files``); the id and the token
cache both take them from there, so a file under any config key changes both."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import xxhash
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mbs.cache import file_digest
from mbs.data.corpora import SPLITS
from mbs.models.streaming import streamed_tensor

ID_VERSION = 2  # bump when results of the same config stop being comparable (a metric's definition changes)
# Keys that do not change results: logging, progress bars, resume control, where files wait or are cached, a
# reporting threshold that the report recomputes from the rows anyway, a gate that refuses runs, where the
# checkpoint is pushed, and the predicted-damage report (it adds a prediction, it changes no measured number).
NON_RESULT_KEYS = ("hydra", "logger", "progress", "force", "dry_run", "push_to_hub", "model.cache_dir",
                   "engine.offload_device", "eval.low_resource_share", "calibration_max_repeats", "risk",
                   "engine.stream", "engine.max_memory")  # streamed and in-memory runs give the same numbers (tested)


def _with_types(node: Any) -> Any:
    """The resolved container, with each structured node's schema class: mbs and uniform samplers have the same
    fields and values, only their class tells them apart."""
    if isinstance(node, DictConfig):
        out = {str(k): _with_types(node[k]) for k in node.keys()}
        schema = OmegaConf.get_type(node)
        if schema not in (None, dict):
            out["_schema_"] = f"{schema.__module__}.{schema.__qualname__}"
        return out
    if OmegaConf.is_list(node):
        return [_with_types(v) for v in node]
    return node


def experiment_id(cfg: DictConfig) -> str:
    """12 hex digits of sha256 over what determines a run's numbers: the resolved config (with schema classes) minus
    NON_RESULT_KEYS, every other key counting (including ones added later); the bytes of the local files it reads
    (:func:`local_inputs`); and the numeric environment (:func:`numeric_environment`). Two runs share an id only if
    nothing that can change the numbers differs, so resume never returns numbers from other inputs."""
    cfg = OmegaConf.create(cfg) if not OmegaConf.is_config(cfg) else cfg.copy()
    OmegaConf.resolve(cfg)
    data = _with_types(cfg)
    for dotted in NON_RESULT_KEYS:
        *parents, leaf = dotted.split(".")
        node = data
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    blob = json.dumps({"v": ID_VERSION, "config": data, "inputs": local_inputs(cfg),
                       "environment": numeric_environment()}, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def numeric_environment(device: str | None = None) -> dict[str, Any]:
    """What can change the numbers outside the config: torch and transformers versions (kernels, model code), the
    thread count (CPU reductions may be split differently), the CPU model and its float-kernel flags (AVX2, AVX-512,
    AMX, FMA, ...), the vector kernels torch dispatches to (``cpu_capability``), the BLAS/LAPACK torch was built with
    and whether MKL and oneDNN are available. ``OMP_NUM_THREADS`` is as set (None: unset). With ``device`` a cuda
    device (a run's ``engine.device``), also the GPU's name and the CUDA and cuDNN versions.

    Hashed into experiment ids and cache keys, so it holds nothing that changes between two runs on one machine (no
    clock speed, time or process id); the machine's part is read once per process."""
    import os

    environment = {**_machine_environment(), "threads": torch.get_num_threads(),
                   "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        environment.update({"cuda_device": torch.cuda.get_device_name(torch.device(device)),
                            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()})
    return environment


# the CPU features that select float kernels (x86; ARM: NEON/ASIMD, SVE, BF16), as /proc/cpuinfo names them
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma", "asimd", "sve", "sve2", "bf16")


@functools.lru_cache(maxsize=None)
def _machine_environment() -> dict[str, Any]:
    """The part of :func:`numeric_environment` that is fixed for a process: versions, CPU, torch's build."""
    import platform
    import re

    import transformers

    model, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "hardware", "cpu model") and not model:  # x86; some ARM and MIPS kernels
                    model = value.strip()
                elif key in ("flags", "features") and not flags:  # x86; ARM
                    flags = set(value.split())
    except OSError:  # not Linux, or no /proc
        pass
    config = torch.__config__.show()

    def build(name: str) -> str | None:
        found = re.search(rf"\b{name}=([^,\s]+)", config)
        return found.group(1) if found else None

    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)()
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "cpu": model or platform.processor() or platform.machine(), "machine": platform.machine(),
            "cpu_flags": sorted(flags & set(KERNEL_FLAGS)), "cpu_capability": capability,
            "blas": build("BLAS_INFO"), "lapack": build("LAPACK_INFO"),
            "mkl": torch.backends.mkl.is_available(), "mkldnn": torch.backends.mkldnn.is_available()}


def local_inputs(cfg: DictConfig) -> dict[str, Any]:
    """Fingerprints of the local files a config reads: every file its corpora declare (``source_files`` of each
    language and split, whatever config key names them) and the distribution file by their bytes (xxh3), a local
    model directory (weights can be many GB) by its files' sizes and modification times."""
    found: dict[str, Any] = {}
    for where in ("data", "eval.corpus"):
        node = OmegaConf.select(cfg, where)
        if node is not None:
            found[where] = corpus_files(node)
    mixture = OmegaConf.select(cfg, "sampler.path")  # sampler=optimized: the counts are the file's
    if isinstance(mixture, str) and Path(mixture).expanduser().is_file():
        found["sampler.path"] = file_digest(Path(mixture).expanduser())
    model = cfg.get("model") or {}
    if isinstance(model.get("distribution_tsv"), str) and model["distribution_tsv"]:
        found["model.distribution_tsv"] = {str(p): file_digest(p) for p in _files(model["distribution_tsv"])}
    local_model = model.get("source") == "hub" and isinstance(model.get("path"), str)
    if local_model and Path(model["path"]).expanduser().is_dir():
        found["model.path"] = {str(p): [p.stat().st_size, p.stat().st_mtime_ns] for p in _files(model["path"])}
    return found


def corpus_files(node: Any) -> dict[str, Any]:
    """{file: xxh3} of every file a corpus config reads, in every language and split it has; a config that does not
    build (its run fails with that error) is keyed by the error."""
    try:
        corpus = OmegaConf.to_object(node) if OmegaConf.is_config(node) else node
        files = sorted({f for language in corpus.languages() for split in SPLITS
                        for f in corpus.source_files(language, split)})
    except (ValueError, TypeError) as err:
        return {"error": f"{type(err).__name__}: {err}"}
    return {str(p): file_digest(p) for p in files}


def _files(pattern: str) -> list[Path]:
    root = Path(pattern).expanduser()
    if root.is_dir():
        return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    return [root] if root.is_file() else []


def weights_fingerprint(model: nn.Module) -> str:
    """xxh3-128 of every parameter and buffer (name, dtype, shape, bytes): any changed weight changes it. A streamed
    model's layers are read from its checkpoint one tensor at a time, so it gets the fingerprint the same model has
    in memory (mbs/models/streaming.py)."""
    value = streamed_tensor(model)
    digest = xxhash.xxh3_128()
    for name, tensor in sorted({**dict(model.named_parameters()), **dict(model.named_buffers())}.items()):
        t = value(name, tensor).detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def tokens_fingerprint(windows: Mapping[str, Iterable[torch.Tensor]]) -> str:
    """xxh3-128 of every language's token ids, window by window, in order."""
    digest = xxhash.xxh3_128()
    for language, language_windows in windows.items():
        digest.update(f"<{language}>".encode())
        for w in language_windows:
            digest.update(f"{w.numel()}|".encode())
            digest.update(w.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def source_fingerprint(*modules: ModuleType) -> str:
    """A digest of the modules' source: the code version of what they compute."""
    return hashlib.sha256("".join(inspect.getsource(m) for m in modules).encode()).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's full serialisation (vocab, merges, normaliser), computed once per tokenizer object."""
    cached = getattr(tokenizer, "_mbs_fingerprint", None)
    if cached:
        return cached
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        blob = backend.to_str()
    else:  # slow tokenizers: the vocabulary and class identify them
        blob = json.dumps([type(tokenizer).__name__, sorted(tokenizer.get_vocab().items())], ensure_ascii=False)
    fingerprint = hashlib.sha256(blob.encode()).hexdigest()[:24]
    try:
        tokenizer._mbs_fingerprint = fingerprint
    except AttributeError:
        pass
    return fingerprint


def corpus_fingerprint(corpus, language: str, split: str) -> dict:
    """The corpus config, plus the size and content digest of every file the language and split are read from."""
    config = dataclasses.asdict(corpus) if dataclasses.is_dataclass(corpus) else {"repr": repr(corpus)}
    stats = [[str(p), p.stat().st_size, file_digest(p)] for p in corpus.source_files(language, split)]
    return {"class": type(corpus).__name__, "config": config, "files": stats}


