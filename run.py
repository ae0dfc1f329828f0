"""MBS entry point: `python run.py model=bloom-3b sampler=mbs compressor=wanda` (see README.md).
Sweeps: `python run.py --multirun +sweep=demo` (sweeps/*.yaml); each job resumes, fails alone, see mbs/sweep.py."""
from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mbs.config import register

register()
log = logging.getLogger("mbs")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from mbs.pipeline import UserError, format_table, run

    hc = HydraConfig.get()
    if hc.mode.name == "MULTIRUN":
        from mbs.sweep import run_job

        results = run_job(cfg, hc, run)
    else:
        try:
            results = run(cfg, hc.runtime.output_dir)
        except UserError as err:  # bad input, caught before the model loads: one line, no traceback
            print(f"mbs: error: {err}", file=sys.stderr)
            sys.exit(2)
    if results is None:
        return None
    print(format_table(results))
    return results["summary"]["mean_log_ratio"]


if __name__ == "__main__":
    main()
