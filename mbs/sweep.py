"""Running a sweep's jobs: resume by experiment id (mbs/fingerprint.py), one failure per job (not per sweep), and a
multirun-end summary that sets the exit code. Reading a sweep directory is mbs/record/jobs.py.

Where finished results are found: a job is done when some ``results.json`` below its sweep directory
(``hydra.sweep.dir``, searched recursively) carries the job's ``experiment_id``. Named sweeps (sweeps/*.yaml) use a
fixed ``hydra.sweep.dir`` (multirun/<name>), so running the same command again resumes where it stopped.
"""
from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from mbs.atomic import atomic_write
from mbs.fingerprint import experiment_id
from mbs.record.jobs import FAILURE, RESULTS, SKIPPED, collect_jobs, find_results, format_status
from mbs.record.results import RunResult, format_table


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
        if config.get("dry_run", False):
            print(f"mbs: dry run of the sweep {sweep_dir}: each job printed its plan; nothing ran", flush=True)
            return
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
    exp_id = experiment_id(cfg)
    output_dir = Path(hydra_cfg.runtime.output_dir)
    job = {"num": hydra_cfg.job.num, "overrides": list(hydra_cfg.overrides.task),
           "override_dirname": hydra_cfg.job.override_dirname, "directory": str(output_dir)}
    if not cfg.get("force", False):
        existing = find_results(hydra_cfg.sweep.dir, exp_id)
        if existing is not None:
            if existing.parent.resolve() != output_dir.resolve():
                atomic_write(output_dir / SKIPPED, json.dumps({"experiment_id": exp_id, "results": str(existing.resolve())}))
            print(f"mbs: skipped job {job['num']} ({' '.join(job['overrides'])}): experiment {exp_id} finished in "
                  f"{existing} (force=true re-runs it)", flush=True)
            results = RunResult.read(existing)
            print(format_table(results), flush=True)  # a run prints its own table (mbs.pipeline.run)
            return results.to_json()
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
