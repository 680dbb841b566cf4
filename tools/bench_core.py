"""Core benchmark: CPU tier store/retrieve vs memcpy, and 128K-token lookup cost.

Same as ``lmcache bench core``; prints JSON with ``--json``.
"""

import sys

from lmcache_core.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "core", *sys.argv[1:]]))
