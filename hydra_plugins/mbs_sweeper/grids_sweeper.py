"""Hydra's basic sweeper plus ``grids``: a sweep that is a union of cartesian products. Needed where one axis only
exists for some conditions (english/mbs/uniform calibration plus ``sampler=monolingual`` x every language; Wanda and
SparseGPT at 50% plus GPTQ at 3 bits). Without grids it is the basic sweeper, except that jobs whose results are
already in their directory (same sweep dir, same overrides, same experiment id) are not launched: on SLURM a resumed
sweep submits only what is left. Hydra only loads plugins from the ``hydra_plugins`` package, hence this module; the
expansion itself is mbs.record.jobs.expand (the report uses it too)."""

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf


@dataclass
class GridsSweeperConf:
    _target_: str = "hydra_plugins.mbs_sweeper.grids_sweeper.GridsSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None  # axes shared by every grid
    grids: Optional[List[Dict[str, Any]]] = None  # each: more axes (numbers allowed); jobs are the union over grids


ConfigStore.instance().store(group="hydra/sweeper", name="grids", node=GridsSweeperConf, provider="mbs")


class GridsSweeper(BasicSweeper):
    def __init__(self, max_batch_size: Optional[int], params: Optional[Dict[str, str]] = None,
                 grids: Optional[List[Dict[str, Any]]] = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.grids = [dict(g) for g in grids] if grids else None

    def _parse_config(self) -> List[str]:
        return []  # params are folded in per grid by split_arguments below

    def split_arguments(self, overrides: Any, max_batch_size: Optional[int]) -> List[List[List[str]]]:  # type: ignore[override]
        from mbs.record.jobs import expand

        arguments = [o.input_line for o in overrides]
        jobs = expand(self.params, self.grids, arguments)
        if self._dirs_named_by_overrides():
            jobs = [job for num, job in enumerate(jobs) if not self._finished(num, job)]
        if not jobs:
            return []  # nothing to launch (a launcher must not get an empty batch: submitit's asserts)
        n = len(jobs) if max_batch_size in (None, -1) else max_batch_size
        return [jobs[i:i + n] for i in range(0, len(jobs), n)]

    def _dirs_named_by_overrides(self) -> bool:
        """Whether each job's directory is named by all of its overrides (Hydra's default subdir). Only then may jobs
        be left out: the launcher numbers the jobs it gets from 0, so a job launched again gets a new number, and
        with directories named by number alone it would write into a finished job's directory."""
        assert self.config is not None
        hydra = self.config.hydra
        subdir = str(OmegaConf.to_container(hydra.sweep, resolve=False).get("subdir"))
        return "hydra.job.override_dirname" in subdir and not hydra.job.config.override_dirname.exclude_keys

    def _finished(self, num: int, job: List[str]) -> bool:
        """Whether this job's results are already in its directory from an earlier launch into this sweep dir; then
        it is not launched (on SLURM: not submitted) and the end-of-sweep summary counts it from that directory."""
        from mbs.sweep import finished_in_own_dir

        assert self.config is not None and self.hydra_context is not None
        cfg = self.hydra_context.config_loader.load_sweep_config(master_config=self.config, sweep_overrides=list(job))
        path = finished_in_own_dir(self.config.hydra.sweep.dir, job, cfg)
        if path is not None:
            print(f"mbs: skipped job {num} ({' '.join(job)}): experiment {json.loads(path.read_text())['experiment_id']} "
                  f"finished in {path} (force=true re-runs it)", flush=True)
        return path is not None
