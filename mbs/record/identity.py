"""What a run is, in keys a dashboard can group and filter by and in a name a person can read.

The resolved config alone does not say which option of a group ran: ``compressor`` is ``{sparsity, n, m}`` for both
Wanda and magnitude, and the ``mbs`` and ``uniform`` samplers can have identical fields. So a run records the chosen
option of every config group (Hydra's ``runtime.choices``) and the schema class each group was built from."""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

GROUPS = ("model", "data", "sampler", "compressor", "eval", "logger")


def _schema(node: Any) -> str | None:
    kind = OmegaConf.get_type(node) if OmegaConf.is_config(node) else type(node)
    return None if kind in (None, dict) else f"{kind.__module__}.{kind.__qualname__}"


def choices(cfg: DictConfig) -> dict[str, str]:
    """The option chosen for each group (``compressor: wanda``): Hydra's when it composed the config, else the group's
    schema class name in lower case (a config built in Python has no option names)."""
    from hydra.core.hydra_config import HydraConfig

    chosen = dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}
    out = {}
    for group in GROUPS:
        if chosen.get(group) is not None:
            out[group] = str(chosen[group])
        elif group in cfg and (schema := _schema(cfg[group])):
            out[group] = schema.rsplit(".", 1)[1].lower()
    if chosen.get("sweep"):
        out["sweep"] = str(chosen["sweep"])
    return out


def describe_compressor(name: str, compressor: Any) -> str:
    """``wanda 0.5``, ``sparsegpt 2:4``, ``gptq 4-bit g128``, ``sparsegpt 0.5 + 4-bit``, ``dense``."""
    get = compressor.get if isinstance(compressor, dict) or OmegaConf.is_config(compressor) else (
        lambda key, default=None: getattr(compressor, key, default))
    parts = [name]
    if get("n", 0) and get("m", 0):
        parts.append(f"{get('n')}:{get('m')}")
    elif get("sparsity") is not None:
        parts.append(f"{get('sparsity'):g}")
    bits = get("bits")
    if bits is not None and bits < 16:
        groupsize = get("groupsize", -1)
        quant = f"{bits}-bit" + (f" g{groupsize}" if groupsize and groupsize > 0 else "")
        parts.append(f"+ {quant}" if len(parts) > 1 else quant)
    return " ".join(parts)


def identity(cfg: DictConfig) -> dict[str, Any]:
    """``name`` (``gemma3-270m · wanda 0.5 · mbs · seed 0``), ``choices`` and ``schemas`` of one run."""
    chosen = choices(cfg)
    model = cfg.model.get("name") or chosen.get("model", "model")
    sampler = chosen.get("sampler", "sampler")
    if cfg.sampler.get("language") and sampler == "monolingual":
        sampler += f" {cfg.sampler.language}"
    name = " · ".join([str(model), describe_compressor(chosen.get("compressor", "compressor"), cfg.compressor),
                       sampler, f"seed {cfg.get('seed', 0)}"])
    schemas = {group: schema for group in GROUPS if group in cfg and (schema := _schema(cfg[group]))}
    return {"name": name, "choices": chosen, "schemas": schemas}


PACKAGES = ("mbs", "torch", "transformers", "numpy", "scipy", "datasets", "lm_eval", "compressed-tensors",
            "hydra-core")


def provenance(model_revision: str | None, started: float) -> dict[str, Any]:
    """Where a result came from beyond its config: the project's git commit (and whether the checkout had uncommitted
    changes) when it runs from a git checkout, the start and end time (UTC), the installed versions of the packages
    that shape the numbers, and the model revision asked for."""
    import datetime
    import subprocess
    from importlib.metadata import PackageNotFoundError, version
    from pathlib import Path

    def utc(seconds: float) -> str:
        return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="seconds")

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True,
                                  text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    import time

    commit = git("rev-parse", "HEAD")
    return {"commit": commit, "uncommitted_changes": bool(git("status", "--porcelain")) if commit else None,
            "started": utc(started), "finished": utc(time.time()), "versions": versions,
            "model_revision": model_revision}

