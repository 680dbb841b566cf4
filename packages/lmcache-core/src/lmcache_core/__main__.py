"""``python -m lmcache_core`` is the ``lmcache`` command."""

import sys

from lmcache_core.cli import main

sys.exit(main())
