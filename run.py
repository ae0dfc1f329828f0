"""MBS entry point: `python run.py model=bloom-3b sampler=mbs compressor=wanda` (see README.md).
Sweeps: `python run.py --multirun +sweep=demo` (sweeps/*.yaml); each job resumes, fails alone, see mbs/sweep.py."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra._internal.utils import run_and_report
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mbs.config import config_error_line, register

register()
log = logging.getLogger("mbs")
CONF = Path(__file__).resolve().parent / "conf"


def check_choices(args: list[str]) -> None:
    """A one-line error for an unknown group option (``model=nope``) instead of Hydra's multi-line one."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

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
        group = CONF / override.key_or_group
        if override.is_add() or override.is_delete() or not group.is_dir() or override.key_or_group.startswith("hydra"):
            continue
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
        known = sorted(p.stem for p in group.glob("*.yaml"))
        for value in values:
            if str(value) not in known:
                print(f"mbs: error: unknown {override.key_or_group} {value!r}; available: {', '.join(known)}",
                      file=sys.stderr)
                sys.exit(2)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from mbs.pipeline import PushFailed, ResultsNotWritten, UserError, run

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
        except (ResultsNotWritten, PushFailed) as err:  # e.g. a full disk, no network: the table was printed
            print(f"mbs: error: {err}", file=sys.stderr)
            sys.exit(1)
    if results is None or results.get("dry_run"):
        return None
    if (Path(hc.runtime.output_dir) / "results.json").exists():  # not for a skipped job: it says where its results are
        print(f"mbs: results in {hc.runtime.output_dir} (results.json, results.csv, results.md)", flush=True)
    return results["summary"]["mean_log_ratio"]  # the table was printed by the run (or the skip notice)


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



def main_one_line_errors() -> None:
    """``main()`` with Hydra's multi-line composition errors (an unknown key, a value of the wrong type) as one line
    naming the key, the value and what is allowed. HYDRA_FULL_ERROR=1 keeps Hydra's own report."""
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



if __name__ == "__main__":
    check_choices(sys.argv[1:])
    check_output(sys.argv[1:])
    main_one_line_errors()
