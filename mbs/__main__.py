"""`python -m mbs <command> <sweep dir>`: report, analyze (mbs/cli.py)."""
import sys

from mbs.cli import entry

sys.exit(entry())
