"""Optional features and the pip extra that brings each: a missing one is a one-line error naming the extra, raised
when the config is checked (before anything is loaded), not an ImportError halfway through a run."""
from __future__ import annotations

import importlib.util

EXTRAS = {"hub": "hub corpora and parquet files", "slurm": "the SLURM and submitit launchers"}


def require(module: str, extra: str, what: str) -> None:
    """Raise ValueError when ``module`` is not installed: ``what`` needs the extra ``extra``."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ValueError(f"{what} needs the Python package {module.split('.')[0]!r} ({EXTRAS[extra]}): "
                         f"pip install 'mbs[{extra}]' (from a clone: pip install -e '.[{extra}]')")
