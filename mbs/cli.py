"""The ``mbs`` command: ``mbs run [overrides...]`` (mbs/launch.py) and the commands that read a sweep directory, one
convention for all: ``mbs <command> <sweep dir> [--out DIR]`` (also ``mbs-<command>`` and ``python -m mbs.<command>``).
Each prints the sweep's status, what it found and the files it wrote; bad input is one line on stderr (exit 2), a
sweep with nothing to read yet exits 1."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mbs.analyze.retention import METRICS, N_RESAMPLES, analyze as analyze_sweep
from mbs.record.report import build_report
from mbs.record.results import LOW_RESOURCE_SHARE


@dataclass
class Command:
    description: str
    options: Callable[[argparse.ArgumentParser], None]  # adds the command's own options
    run: Callable[[argparse.Namespace], int]


def parser_for(name: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"mbs-{name}", description=COMMANDS[name].description)
    parser.add_argument("sweep_dir", help="a multirun directory (hydra.sweep.dir), finished or not")
    parser.add_argument("--out", help=f"where to write (default: <sweep_dir>/{name})")
    COMMANDS[name].options(parser)
    return parser


def main(name: str, argv: list[str] | None = None) -> int:
    """Parse and run one command; a ValueError (bad input) becomes one line on stderr and exit code 2."""
    parser = parser_for(name)
    args = parser.parse_args(argv)
    try:
        if not Path(args.sweep_dir).is_dir():
            raise ValueError(f"sweep directory {args.sweep_dir} does not exist")
        return COMMANDS[name].run(args)
    except ValueError as err:
        print(f"mbs-{name}: {err}", file=sys.stderr)
        return 2


def _wrote(status: str, lines: list[str], files: list[Path]) -> int:
    print(status)
    for line in lines:
        print(line)
    for path in files:
        print(f"wrote {path}")
    return 0


def _report_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--low-resource-share", type=float, default=LOW_RESOURCE_SHARE,
                        help="a language whose training share (a fraction of the model's whole distribution) is below "
                             "this is low-resource (default %(default)s = 1%%)")


def _report(args: argparse.Namespace) -> int:
    report = build_report(args.sweep_dir, args.out, args.low_resource_share)
    if not report.files:
        print(report.status)
        print("mbs-report: no finished job yet, nothing to report", file=sys.stderr)
        return 1
    return _wrote(report.status, [], report.files)


def _analyze_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default %(default)s)")
    parser.add_argument("--resamples", type=int, default=N_RESAMPLES, help="bootstrap resamples (default %(default)s)")
    parser.add_argument("--metric", choices=list(METRICS), default="log_ratio",
                        help="retention as −log(compressed ppl / dense ppl), nats per token (log_ratio), or as "
                             "−(compressed − dense bits per byte) (bpb; results that record bits per byte) "
                             "(default %(default)s)")


def _analyze(args: argparse.Namespace) -> int:
    if args.resamples < 100:
        raise ValueError(f"--resamples={args.resamples}: use at least 100")
    result = analyze_sweep(args.sweep_dir, args.out, args.seed, args.resamples, metric=args.metric)
    return _wrote(result.status, [result.sentence], result.files)


COMMANDS = {
    "report": Command("Tables and plots of a sweep: per-language perplexity ratios by condition "
                      "(mbs/record/report.py).", _report_options, _report),
    "analyze": Command("What predicts retention within a compression setting, over a sweep's jobs and languages "
                       "(training share, similarity to the calibration mixture; mbs/analyze/retention.py).",
                       _analyze_options, _analyze),
}


def report(argv: list[str] | None = None) -> int:
    return main("report", argv)


def analyze(argv: list[str] | None = None) -> int:
    return main("analyze", argv)


def entry() -> int:
    """``mbs <command> ...`` (the console command) and ``python -m mbs <command> ...``: ``run [overrides...]`` is a
    run or sweep (mbs/launch.py, as ``python run.py``); the others read a sweep directory."""
    names = ", ".join(["run", *COMMANDS])
    if len(sys.argv) >= 2 and sys.argv[1] == "run":
        from mbs.launch import command

        return command(sys.argv[2:])
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: mbs {{{names}}} ...: run [overrides...] (mbs run --help), report|analyze <sweep dir> [options]",
              file=sys.stderr)
        return 2
    return main(sys.argv[1], sys.argv[2:])
