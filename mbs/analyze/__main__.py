"""`python -m mbs.analyze <sweep dir>`: the retention analysis (mbs/cli.py)."""
import sys

from mbs.cli import analyze

sys.exit(analyze())
