"""`python -m mbs.analyze <sweep dir>` (or `mbs-analyze`): what predicts retention within a compression setting,
over a sweep's jobs and languages (training share, similarity to the calibration mixture); see
mbs/analyze/retention.py."""
from __future__ import annotations

import argparse
import sys

from mbs.analyze.retention import METRICS, N_RESAMPLES, analyze


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mbs-analyze", description=__doc__)
    parser.add_argument("sweep_dir", help="a multirun directory (hydra.sweep.dir), finished or not")
    parser.add_argument("--out", help="where to write the analysis (default: <sweep_dir>/analysis)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default %(default)s)")
    parser.add_argument("--resamples", type=int, default=N_RESAMPLES,
                        help="bootstrap resamples (default %(default)s)")
    parser.add_argument("--metric", choices=list(METRICS), default="log_ratio",
                        help="retention as −log(compressed ppl / dense ppl), nats per token (log_ratio), or as "
                             "−(compressed − dense bits per byte) (bpb; results that record bits per byte) "
                             "(default %(default)s)")
    args = parser.parse_args(argv)
    if args.resamples < 100:
        parser.error(f"--resamples={args.resamples}: use at least 100")
    try:
        result = analyze(args.sweep_dir, args.out, args.seed, args.resamples, metric=args.metric)
    except ValueError as err:
        print(f"mbs-analyze: {err}", file=sys.stderr)
        return 2
    print(result.status)
    print(result.sentence)
    for path in result.files:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
