"""`python -m mbs.report <multirun dir>` (or `mbs-report`): tables and plots of a sweep; see mbs/record/report.py."""
from __future__ import annotations

import argparse
import sys

from mbs.record.report import build_report
from mbs.record.results import LOW_RESOURCE_SHARE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mbs-report", description=__doc__)
    parser.add_argument("sweep_dir", help="a multirun directory (hydra.sweep.dir), finished or not")
    parser.add_argument("--out", help="where to write the report (default: <sweep_dir>/report)")
    parser.add_argument("--low-resource-share", type=float, default=LOW_RESOURCE_SHARE,
                        help="a language whose training share (a fraction of the model's whole distribution) is below "
                             "this is low-resource (default %(default)s = 1%%)")
    args = parser.parse_args(argv)
    report = build_report(args.sweep_dir, args.out, args.low_resource_share)
    print(report.status)
    if not report.files:
        print("mbs-report: no finished job yet, nothing to report", file=sys.stderr)
        return 1
    for path in report.files:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
