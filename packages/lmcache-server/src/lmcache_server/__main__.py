"""``python -m lmcache_server``: the same as ``lmcache server``."""

import sys

from lmcache_server.cli import main

sys.exit(main())
