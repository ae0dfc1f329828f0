"""The Hydra command line, shared by ``mbs run [overrides...]`` (the installed command) and ``python run.py ...`` (a
checkout): the one-line check of group options before Hydra starts, the task each job runs, the ``--help`` text
(conf/hydra/help/mbs.yaml, whose group lines come from :func:`groups_help`), and ``mbs.run()``, the same run from
Python."""
from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from mbs.config import CONFIG_SEARCH_PATH, config_dir, config_error_line, register

register()

# One line per group in --help, in this order; a group folder not named here is listed after them without a
# description, and nested folders (model/distribution) are parts of options, not choices, so they are left out.
GROUPS = {
    "model": "the model to compress (tiny-*: random-weight test models, offline)",
    "data": "calibration corpus, and evaluation corpus unless eval.corpus is set",
    "sampler": "how many calibration segments each language gets",
    "compressor": "the method: pruning (sparsity, n:m) or quantization (bits, groupsize)",
    "eval": "evaluation languages and corpus",
    "zeroshot": "zero-shot tasks (lm-evaluation-harness) on dense and compressed model",
    "logger": "where results are logged besides the run directory",
    "sweep": "named sweeps: --multirun +sweep=NAME (sweeps/*.yaml)",
    "hydra/launcher": "where --multirun jobs run (slurm: pip install 'mbs[slurm]')",
}


def groups_help() -> str:
    """The group lines of ``--help``: each group, what it chooses, its current option and every option."""
    from hydra.core.global_hydra import GlobalHydra

    if not GlobalHydra.instance().is_initialized():
        return "  (the groups are listed by --help)"
    loader = GlobalHydra.instance().config_loader()
    chosen = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    found = [g for g in loader.list_groups("") if g != "hydra" and "/" not in g]
    names = [g for g in GROUPS if g in found or "/" in g] + sorted(g for g in found if g not in GROUPS)
    width = max(len(n) for n in names) + 2
    lines = []
    for name in names:
        current = chosen.get(name) or ("basic" if name == "hydra/launcher" else "none")
        text = f"{name.ljust(width)}{GROUPS.get(name, '')} [{current}]: {', '.join(loader.get_group_options(name))}"
        lines.append(textwrap.fill(text, width=118, initial_indent="  ",
                                   subsequent_indent=" " * (width + 4), break_on_hyphens=False))
    return "\n".join(lines)


OmegaConf.register_new_resolver("mbs_groups_help", groups_help, replace=True)


def check_choices(args: list[str], conf: Path | None = None) -> None:
    """A one-line error for an unknown group option (``model=nope``) instead of Hydra's multi-line one."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    conf = conf or config_dir()
    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if not a.startswith("-")])
    except Exception:  # let Hydra report syntax errors itself
        return
    for override in overrides:
        if override.key_or_group == "hydra/launcher" and str(override.value()) != "basic":
            from mbs.extras import require

            try:
                require("hydra_plugins.hydra_submitit_launcher", "slurm", f"hydra/launcher={override.value()}")
            except ValueError as err:
                print(f"mbs: error: {err}", file=sys.stderr)
                sys.exit(2)
        group = conf / override.key_or_group
        if override.is_add() or override.is_delete() or not group.is_dir() or override.key_or_group.startswith("hydra"):
            continue
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
        known = sorted(p.stem for p in group.glob("*.yaml"))
        for value in values:
            if str(value) not in known:
                print(f"mbs: error: unknown {override.key_or_group} {value!r}; available: {', '.join(known)}",
                      file=sys.stderr)
                sys.exit(2)


def check_output(args: list[str]) -> None:
    """The run (or sweep) directory can be made and written, said in one line before Hydra tries (Hydra's own error
    is a traceback): hydra.run.dir / hydra.sweep.dir as given, up to its first ${...}, or the configured default."""
    from mbs.paths import check_creatable

    if {"-h", "--help", "--hydra-help", "--info", "-i", "--cfg", "-c", "--resolve"} & set(args):
        return  # Hydra prints and exits without making a directory
    key = "hydra.sweep.dir" if {"-m", "--multirun"} & set(args) else "hydra.run.dir"
    given = [a.split("=", 1)[1] for a in args if "=" in a and a.split("=", 1)[0].lstrip("+~") == key]
    value = given[-1] if given else ("multirun/" if key == "hydra.sweep.dir" else "outputs/")  # conf/config.yaml
    static, interpolated = value.split("${")[0], "${" in value
    directory = Path(static) if static.endswith("/") or not interpolated else Path(static).parent
    try:
        check_creatable(directory, key)
    except ValueError as err:
        print(f"mbs: error: {err}", file=sys.stderr)
        sys.exit(2)


def one_line_errors(main: Callable[[], Any]) -> None:
    """``main()`` (a @hydra.main function) with Hydra's multi-line composition errors (an unknown key, a value of the
    wrong type) as one line naming the key, the value and what is allowed. HYDRA_FULL_ERROR=1 keeps Hydra's own
    report."""
    from hydra._internal.utils import run_and_report

    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing, so the error can be rewritten here
    try:
        main()
    except Exception as err:  # noqa: BLE001 - anything not about a config value is reported as Hydra reports it
        line = config_error_line(err)
        if line is None:
            del os.environ["HYDRA_FULL_ERROR"]
            failed = err
            run_and_report(lambda: _raise(failed))
        print(f"mbs: error: {line}", file=sys.stderr)
        sys.exit(2)


def _raise(err: BaseException) -> None:
    raise err


def task(cfg: DictConfig) -> float | None:
    """One job: a run (bad input is one line and exit code 2), or in a multirun a job that resumes and fails alone
    (mbs/sweep.py). Returns the mean log ratio (what a Hydra sweeper would optimise)."""
    from mbs.pipeline import ResultsNotWritten, UserError, run

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
        except ResultsNotWritten as err:  # e.g. a full disk: the table was printed and logged already
            print(f"mbs: error: {err}", file=sys.stderr)
            sys.exit(1)
    if results is None or results.get("dry_run"):
        return None
    if (Path(hc.runtime.output_dir) / "results.json").exists():  # not for a skipped job: it says where its results are
        print(f"mbs: results in {hc.runtime.output_dir} (results.json, results.csv, results.md)", flush=True)
    return results["summary"]["mean_log_ratio"]  # the table was printed by the run (or the skip notice)


def command(argv: list[str]) -> int:
    """``mbs run [overrides...]``: what ``python run.py`` does, with the installed configs (pkg://mbs.conf)."""
    check_choices(argv)
    check_output(argv)
    sys.argv = [f"{Path(sys.argv[0]).name} run", *argv]  # Hydra parses sys.argv
    one_line_errors(hydra.main(version_base="1.3", config_path=CONFIG_SEARCH_PATH, config_name="config")(task))
    return 0


def run(*overrides: str, output_dir: str | Path | None = None) -> dict[str, Any]:
    """One run as ``mbs run <overrides>`` does it, in this process: the same configs and defaults (the default run is
    Gemma 3 270M, UDHR, MBS calibration, Wanda 50%), the same checks and result files. Returns results.json's content
    (``mbs.record.results.RunResult.from_json`` reads it back; with ``dry_run=true``: ``{"dry_run": plan}``).
    ``output_dir``: where results.json/csv/md go (default: the command's, outputs/<date>/<time>_<model>_<compressor>_
    <sampler> under the working directory). Bad input raises ValueError naming the value, before the model loads.
    Unlike the command it writes no ``.hydra/`` folder and leaves logging to the caller (INFO lines go to the
    ``mbs`` loggers), and ``--multirun`` is the command's alone."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from mbs.api import compose
    from mbs.pipeline import run as run_pipeline

    cfg = compose(*overrides, return_hydra_config=True)
    if output_dir is None:
        output_dir = cfg.hydra.run.dir
    previous = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(cfg)  # the run's name and results.json read the chosen options from it
    try:
        with open_dict(cfg):
            del cfg["hydra"]  # as Hydra hands the config to the command's task
        return run_pipeline(cfg, output_dir)
    finally:
        HydraConfig.instance().cfg = previous
