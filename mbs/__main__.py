"""`python -m mbs <command> ...`: run [overrides...], report|analyze <sweep dir> (mbs/cli.py), as the `mbs` command."""
import sys

from mbs.cli import entry

sys.exit(entry())
