"""Sweeps that survive scale: a stable id per experiment, resume by that id, one failure per job (not per sweep),
the job list a sweep expands to, and a multirun-end summary that sets the exit code.

Where finished results are found: a job is done when some ``results.json`` below its sweep directory
(``hydra.sweep.dir``, searched recursively) carries the job's ``experiment_id``. Named sweeps (sweeps/*.yaml) use a
fixed ``hydra.sweep.dir`` (multirun/<name>), so running the same command again resumes where it stopped.
"""
from __future__ import annotations

import functools
import hashlib
import json
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf, open_dict

ID_VERSION = 2  # bump when results of the same config stop being comparable (a metric's definition changes)
# Keys that do not change results: logging, progress bars, resume control, where files wait or are cached, and a
# reporting threshold that the report recomputes from the rows anyway.
NON_RESULT_KEYS = ("hydra", "logger", "progress", "force", "model.cache_dir", "engine.offload_device",
                   "eval.low_resource_share")
RESULTS, FAILURE, SKIPPED = "results.json", "failure.json", "skipped.json"


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
    blob = json.dumps({"v": ID_VERSION, "config": data, "inputs": local_inputs(data),
                       "environment": numeric_environment()}, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def numeric_environment(device: str | None = None) -> dict[str, Any]:
    """What can change the numbers outside the config: kernels and model code differ between torch and transformers
    versions, and CPU reductions may be split differently across threads (issue 11 saw bn dense perplexity 80.15 vs
    81.16 with 1 vs 2 threads; a dense default run on this version was bit-identical with 1 and 2 threads, so the
    thread count is here as a precaution). The CPU model, its float-kernel flags (AVX2, AVX-512, AMX, FMA, ...),
    the vector kernels torch dispatches to (``cpu_capability``), the BLAS/LAPACK torch was built with and whether
    MKL and oneDNN are available pick the kernels, so the same job on another CPU gives other last digits.
    ``OMP_NUM_THREADS`` is as set (None: unset). With ``device`` a cuda device (a run's ``engine.device``), also
    the GPU's name and the CUDA and cuDNN versions.

    Hashed into experiment ids and cache keys (:func:`experiment_id`, :mod:`mbs.evaluate.baseline`,
    :mod:`mbs.compress.cached`), so it holds nothing that changes between two runs on one machine (no clock speed,
    time or process id); the machine's part is read once per process."""
    import os

    import torch

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

    import torch
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


def local_inputs(config: dict[str, Any]) -> dict[str, Any]:
    """Fingerprints of the local files a config reads: data and distribution files by their bytes (xxh3), a local
    model directory (weights can be many GB) by its files' sizes and modification times."""
    from mbs.cache import file_digest

    def files(pattern: str) -> list[Path]:
        root = Path(pattern).expanduser()
        if root.is_dir():
            return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
        if "{" in pattern or "*" in pattern:  # a hub data_files pattern on local disk ({code}, {split} fields)
            import glob
            import re

            return sorted(Path(p) for p in glob.glob(re.sub(r"\{[^}]*\}", "*", str(root)), recursive=True)
                          if Path(p).is_file())
        return [root] if root.is_file() else []

    found: dict[str, Any] = {}
    model = config.get("model") or {}
    corpora = {"data": config.get("data"), "eval.corpus": (config.get("eval") or {}).get("corpus")}
    for where, corpus in corpora.items():
        for key in ("path", "data_files"):
            value = corpus.get(key) if isinstance(corpus, dict) else None
            if isinstance(value, str) and value:
                found[f"{where}.{key}"] = {str(p): file_digest(p) for p in files(value)}
    if isinstance(model.get("distribution_tsv"), str) and model["distribution_tsv"]:
        found["model.distribution_tsv"] = {str(p): file_digest(p) for p in files(model["distribution_tsv"])}
    local_model = model.get("source") == "hub" and isinstance(model.get("path"), str)
    if local_model and Path(model["path"]).expanduser().is_dir():
        found["model.path"] = {str(p): [p.stat().st_size, p.stat().st_mtime_ns] for p in files(model["path"])}
    return found


def find_results(root: str | Path, exp_id: str) -> Path | None:
    """The first results.json below root whose experiment_id is exp_id (unreadable files, and results of a job that
    then failed, e.g. while logging, are passed over)."""
    for path in sorted(Path(root).rglob(RESULTS)):
        if (path.parent / FAILURE).exists():
            continue
        try:
            if json.loads(path.read_text()).get("experiment_id") == exp_id:
                return path
        except (OSError, ValueError):
            continue
    return None


def finished_in_own_dir(sweep_dir: str | Path, overrides: list[str], cfg: DictConfig) -> Path | None:
    """Results of this job from an earlier launch into the same sweep directory, found where that launch wrote
    them: a job directory with the same overrides whose results carry this config's experiment_id (so a changed
    config file or default still re-runs). The sweeper does not launch such a job at all (on SLURM: submits
    nothing); results under other overrides are left to run_job, which records the skip in the job's directory."""
    if cfg.get("force", False):
        return None
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    exp_id = experiment_id(cfg)
    for marker in Path(sweep_dir).rglob(".hydra/overrides.yaml"):
        if list(OmegaConf.load(marker)) != list(overrides):
            continue
        directory = marker.parent.parent
        if (directory / RESULTS).exists() and not (directory / FAILURE).exists():
            try:
                if json.loads((directory / RESULTS).read_text()).get("experiment_id") == exp_id:
                    return directory / RESULTS
            except (OSError, ValueError):
                continue
    return None


def failure_record(exp_id: str, job: dict[str, Any], err: BaseException) -> dict[str, Any]:
    return {"experiment_id": exp_id, "job": job, "error": {"type": type(err).__name__, "message": str(err)},
            "traceback": "".join(traceback.format_exception(err)), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


# ---- the job list of a sweep (the grids sweeper launches it; the report checks a sweep directory against it) ----

def expand(params: dict[str, str] | None, grids: list[dict[str, str]] | None, arguments: Iterable[str]) -> list[list[str]]:
    """Every job's overrides: for each grid (none: one empty grid), the cartesian product of params, the grid and the
    command-line arguments, as Hydra's basic sweeper builds it (a later key replaces an earlier one: command line
    over grid over params). Jobs repeated by two grids run once."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    jobs: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    for grid in grids or [{}]:
        merged = {**(params or {}), **grid}
        strings = [f"{k}={v}" for k, v in merged.items()] + list(arguments)
        for job in BasicSweeper.split_arguments(parser.parse_overrides(strings), None)[0]:
            if tuple(job) not in seen:
                seen.add(tuple(job))
                jobs.append(job)
    return jobs


def planned_jobs(sweep_dir: str | Path) -> list[list[str]] | None:
    """The jobs a sweep directory was launched with (from the multirun.yaml Hydra writes at the start), or None."""
    path = Path(sweep_dir) / "multirun.yaml"
    if not path.exists():
        return None
    cfg = OmegaConf.load(path)
    sweeper = cfg.hydra.sweeper
    params = OmegaConf.to_container(sweeper.params, resolve=False) if sweeper.get("params") else None
    grids = OmegaConf.to_container(sweeper.grids, resolve=False) if sweeper.get("grids") else None
    return expand(params, grids, OmegaConf.to_container(cfg.hydra.overrides.task, resolve=False))


# ---- the state of each job in a sweep directory ----

@dataclass
class Job:
    overrides: list[str]
    status: str  # done | skipped | failed | incomplete (started, no outcome: running or killed) | missing
    directory: Path | None = None
    results_path: Path | None = None
    error: str = ""
    experiment_id: str = ""
    results: dict[str, Any] | None = field(default=None, repr=False)
    planned: bool = True  # in the plan of the latest launch into this directory


def _job_from_dir(directory: Path) -> Job:
    overrides = list(OmegaConf.load(directory / ".hydra" / "overrides.yaml"))
    if (directory / RESULTS).exists() and not (directory / FAILURE).exists():
        results = json.loads((directory / RESULTS).read_text())
        return Job(overrides, "done", directory, directory / RESULTS, experiment_id=results.get("experiment_id", ""),
                   results=results)
    if (directory / SKIPPED).exists():
        marker = json.loads((directory / SKIPPED).read_text())
        path = Path(marker["results"])
        path = path if path.is_absolute() else directory / path
        if path.exists():
            return Job(overrides, "skipped", directory, path, experiment_id=marker["experiment_id"],
                       results=json.loads(path.read_text()))
    if (directory / FAILURE).exists():
        failure = json.loads((directory / FAILURE).read_text())
        err = failure["error"]
        return Job(overrides, "failed", directory, error=f"{err['type']}: {err['message']}",
                   experiment_id=failure.get("experiment_id", ""))
    return Job(overrides, "incomplete", directory)


def collect_jobs(sweep_dir: str | Path) -> list[Job]:
    """Every job of a sweep directory, planned or found, with its status. A planned job with no directory is
    'missing'; job directories not in the plan (from an earlier, different launch into the same directory) are kept."""
    sweep_dir = Path(sweep_dir)
    found: dict[tuple[str, ...], Job] = {}
    for marker in sorted(sweep_dir.rglob(".hydra/overrides.yaml"), key=lambda p: (p.stat().st_mtime, str(p))):
        directory = marker.parent.parent
        if directory == sweep_dir:
            continue
        job = _job_from_dir(directory)
        key = tuple(job.overrides)
        if key not in found or job.status in ("done", "skipped") or found[key].status not in ("done", "skipped"):
            found[key] = job  # the latest attempt wins unless an earlier one succeeded
    plan = planned_jobs(sweep_dir) or []
    jobs = [found.pop(tuple(o), None) or Job(list(o), "missing") for o in plan]
    extra = list(found.values())
    for job in extra:
        job.planned = not plan
    return jobs + extra


def format_status(jobs: list[Job], sweep_dir: str | Path) -> tuple[str, bool]:
    """A one-paragraph summary of a sweep and whether every planned job finished."""
    count = {s: sum(j.status == s for j in jobs if j.planned)
             for s in ("done", "skipped", "failed", "incomplete", "missing")}
    lines = [f"mbs: sweep {sweep_dir}: {len(jobs)} jobs: " + ", ".join(f"{v} {k}" for k, v in count.items() if v)]
    extra = sum(not j.planned for j in jobs)
    if extra:
        lines[0] += f" (and {extra} earlier jobs not in this plan)"
    for job in jobs:
        if job.planned and job.status in ("failed", "incomplete", "missing"):
            where = f" ({job.directory})" if job.directory else ""
            lines.append(f"  {job.status}: {' '.join(job.overrides) or '(no overrides)'}{where}"
                         + (f": {job.error}" if job.error else ""))
    return "\n".join(lines), count["failed"] + count["incomplete"] + count["missing"] == 0


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object  # type: ignore[assignment,misc]


class SweepSummary(Callback):
    """Hydra callback (conf/config.yaml hydra.callbacks): at the end of a multirun, print which jobs failed and why,
    how to build the report and upload offline W&B runs, and exit non-zero if any job failed (the jobs themselves
    return normally so that the others run)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = config.hydra.sweep.dir
        text, ok = format_status(collect_jobs(sweep_dir), sweep_dir)
        text += f"\nmbs: report (tables and figures): python -m mbs.report {sweep_dir}"
        if any(Path(sweep_dir).glob("*/wandb/offline-run-*")):
            text += f"\nmbs: upload the offline W&B runs: wandb sync {sweep_dir}/*/wandb/offline-run-*"
        print(text, file=sys.stdout if ok else sys.stderr, flush=True)
        if not ok:
            raise SystemExit(1)  # Hydra's callback wrapper and run_and_report catch Exception only


# ---- one job of a multirun ----

def sweep_labels(hydra_cfg: Any) -> tuple[str, list[str]]:
    """W&B group and tags shared by every job of one sweep: the sweep's name (or 'multirun') and its directory."""
    name = hydra_cfg.runtime.choices.get("sweep") or "multirun"
    return f"{name}:{hydra_cfg.sweep.dir}", [f"sweep:{name}"]


def run_job(cfg: DictConfig, hydra_cfg: Any, runner: Any) -> dict[str, Any] | None:
    """Run one multirun job: skip it if its results exist below the sweep dir (unless force=true), otherwise run it
    and turn any exception into failure.json so that the launcher goes on with the next job."""
    from mbs.atomic import atomic_write

    exp_id = experiment_id(cfg)
    output_dir = Path(hydra_cfg.runtime.output_dir)
    job = {"num": hydra_cfg.job.num, "overrides": list(hydra_cfg.overrides.task),
           "override_dirname": hydra_cfg.job.override_dirname, "directory": str(output_dir)}
    if not cfg.get("force", False):
        existing = find_results(hydra_cfg.sweep.dir, exp_id)
        if existing is not None:
            if existing.parent.resolve() != output_dir.resolve():
                atomic_write(output_dir / SKIPPED, json.dumps({"experiment_id": exp_id, "results": str(existing.resolve())}))
            from mbs.pipeline import format_table

            print(f"mbs: skipped job {job['num']} ({' '.join(job['overrides'])}): experiment {exp_id} finished in "
                  f"{existing} (force=true re-runs it)", flush=True)
            results = json.loads(existing.read_text())
            print(format_table(results), flush=True)  # a run prints its own table (mbs.pipeline.run)
            return results
    if "group" in cfg.logger and cfg.logger.group is None:
        group, tags = sweep_labels(hydra_cfg)
        cfg.logger.group = group
        cfg.logger.tags = list(cfg.logger.tags) + [t for t in tags if t not in cfg.logger.tags]
    try:
        results = runner(cfg, output_dir)
    except Exception as err:  # noqa: BLE001 - one job's failure is recorded, not propagated (the others still run)
        atomic_write(output_dir / FAILURE, json.dumps(failure_record(exp_id, job, err), indent=2, default=str))
        print(f"mbs: job {job['num']} failed ({' '.join(job['overrides'])}): {type(err).__name__}: {err}",
              file=sys.stderr, flush=True)
        return None
    (output_dir / FAILURE).unlink(missing_ok=True)  # an earlier attempt's failure no longer holds
    return results
