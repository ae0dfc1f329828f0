"""Reading a sweep directory: which jobs a sweep was launched with, what each job directory holds (done, skipped,
failed, incomplete, missing) and where a finished experiment's results are. What the report, the analysis and the
sweep runner all read; it runs nothing."""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from mbs.record.results import RunResult

RESULTS, FAILURE, SKIPPED = "results.json", "failure.json", "skipped.json"
UNSAFE = re.compile(r"[^\w.,=+@:%\[\]{}-]")  # anything but these (above all "/") never reaches a directory name
MAX_NAME = 160  # characters of a job directory name before its hash (file systems allow 255 bytes)


def job_dirname(override_dirname: str) -> str:
    """A job directory's name from its overrides (conf/config.yaml hydra.sweep.subdir, as the resolver
    ``mbs.dirname``): readable for ordinary values, one path component always. A value with "/" or ".." (a path)
    would otherwise name directories outside the sweep directory: such characters become "_" and the name gets 8
    hex digits of the overrides' hash, so two jobs never share a directory; so does a name too long to keep."""
    safe = UNSAFE.sub("_", override_dirname)
    if safe == override_dirname and len(safe) <= MAX_NAME and ".." not in safe:
        return safe
    digest = hashlib.sha256(override_dirname.encode()).hexdigest()[:8]
    return f"{safe[:MAX_NAME].replace('..', '__')}-{digest}"


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
    #              | unreadable (a results, skipped or failure file that cannot be read: named in ``error``)
    directory: Path | None = None
    results_path: Path | None = None
    error: str = ""
    experiment_id: str = ""
    results: RunResult | None = field(default=None, repr=False)
    planned: bool = True  # in the plan of the latest launch into this directory


def _job_from_dir(directory: Path) -> Job:
    """The job in ``directory``; a results, skipped or failure file that cannot be read makes it 'unreadable', with
    the file named, so that the other jobs are still reported."""
    try:
        hydra_overrides = directory / ".hydra" / "overrides.yaml"
        overrides = list(OmegaConf.load(hydra_overrides)) if hydra_overrides.exists() else []
    except Exception as err:  # noqa: BLE001 - any YAML error: the job is named, the sweep still reported
        return Job([], "unreadable", directory, error=f"{hydra_overrides}: {type(err).__name__}")
    try:
        return _job_state(directory, overrides)
    except (OSError, ValueError, KeyError, TypeError) as err:
        return Job(overrides, "unreadable", directory, error=str(err).splitlines()[0] if str(err) else type(err).__name__)


def _job_state(directory: Path, overrides: list[str]) -> Job:
    if (directory / RESULTS).exists() and not (directory / FAILURE).exists():
        results = RunResult.read(directory / RESULTS)
        return Job(overrides, "done", directory, directory / RESULTS, experiment_id=results.experiment_id,
                   results=results)
    if (directory / SKIPPED).exists():
        marker = json.loads((directory / SKIPPED).read_text())
        path = Path(marker["results"])
        path = path if path.is_absolute() else directory / path
        if path.exists():
            return Job(overrides, "skipped", directory, path, experiment_id=marker["experiment_id"],
                       results=RunResult.read(path))
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
    if not (sweep_dir / "multirun.yaml").exists() and (
            (sweep_dir / RESULTS).exists() or (sweep_dir / ".hydra" / "overrides.yaml").exists()):
        return [_job_from_dir(sweep_dir)]  # a single run's directory (python run.py): that run is the report
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
             for s in ("done", "skipped", "failed", "unreadable", "incomplete", "missing")}
    single = len(jobs) == 1 and jobs[0].directory == Path(sweep_dir)  # a run's own directory (collect_jobs)
    lines = [f"mbs: {'run' if single else 'sweep'} {sweep_dir}: {len(jobs)} job{'' if len(jobs) == 1 else 's'}: "
             + ", ".join(f"{v} {k}" for k, v in count.items() if v)]
    extra = sum(not j.planned for j in jobs)
    if extra:
        lines[0] += f" (and {extra} earlier jobs not in this plan)"
    for job in jobs:
        if job.planned and job.status in ("failed", "unreadable", "incomplete", "missing"):
            where = f" ({job.directory})" if job.directory else ""
            lines.append(f"  {job.status}: {' '.join(job.overrides) or '(no overrides)'}{where}"
                         + (f": {job.error}" if job.error else ""))
    return "\n".join(lines), count["failed"] + count["unreadable"] + count["incomplete"] + count["missing"] == 0
