"""`python -m mbs.report <sweep dir>`: the sweep report (mbs/cli.py)."""
import sys

from mbs.cli import report

if __name__ == "__main__":
    sys.exit(report())
