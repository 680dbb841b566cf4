"""Tier benchmark: disk tier vs raw sequential file I/O, Redis tier vs raw pipelined redis-py.

Same as ``lmcache bench tiers``; ``--json`` prints the figures as JSON.
Starts a private redis-server unless ``--redis-url`` is given.
"""

import sys

from lmcache_core.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "tiers", *sys.argv[1:]]))
