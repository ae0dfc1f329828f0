"""MBS entry point in a checkout: `python run.py model=bloom-3b sampler=mbs compressor=wanda` (see README.md); the
installed command `mbs run ...` is the same (mbs/launch.py). `python run.py --help` lists the groups and common keys.
Sweeps: `python run.py --multirun +sweep=demo` (sweeps/*.yaml); each job resumes, fails alone, see mbs/sweep.py."""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from mbs.launch import check_choices, check_output, one_line_errors, task

CONF = Path(__file__).resolve().parent / "conf"


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    return task(cfg)


if __name__ == "__main__":
    check_choices(sys.argv[1:], CONF)
    check_output(sys.argv[1:])
    one_line_errors(main)
