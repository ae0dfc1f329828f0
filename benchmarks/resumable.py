"""Shared by the benchmarks that make many real-model runs: one results file per finished run, read back on a re-run
with the same ``--out`` when its experiment id is the config's (same inputs, same code), else run again."""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any


def subset(text: str, allowed: dict | list, flag: str) -> list[str]:
    """The comma-separated names of ``text``, each one of ``allowed``; else exit in one line naming the unknown ones."""
    given = text.split(",")
    unknown = [name for name in given if name not in allowed]
    if unknown:
        raise SystemExit(f"{flag}: unknown {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    return given


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def run_or_resume(cfg: Any, done: Path, workdir: Path) -> tuple[dict, bool]:
    """(the run's results, True when read back from ``done`` rather than run); a fresh result is written to ``done``."""
    from mbs.fingerprint import experiment_id
    from mbs.pipeline import run

    if done.is_file():
        earlier = json.loads(done.read_text())
        if earlier.get("experiment_id") == experiment_id(cfg):
            return earlier, True
    with contextlib.redirect_stdout(io.StringIO()):
        result = run(cfg, workdir)
    from mbs.atomic import atomic_write_all

    atomic_write_all({done: json.dumps(result)})  # a kill mid-write leaves the old file or none, never half of one
    return result, False
