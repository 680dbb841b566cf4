"""Write a synthetic multi-document QA set for non-prefix KV reuse (blending) as JSON.

The command line of :func:`lmcache_vllm.testing.qa_sets.make_items` (see its
module for what an item holds):

    python tools/make_blend_qa.py --out /tmp/qa.json --items 50
    python tools/make_blend_qa.py --out /tmp/long.json --items 4 --docs 4 4 --doc-tokens 1000
    python tools/make_blend_qa.py --out /tmp/shared.json --items 20 --set shared

``--set`` names one of the sets in ``qa_sets.SETS`` (facts, linked, and the
hard sets shared, bios, records) at the sizes the benchmarks measure.

``--doc-tokens`` pads each document with neutral sentences to about that
many tokens (counted as words x 1.3).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmcache_vllm.testing.qa_sets import SETS, make_items, make_set


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--items", type=int, default=50)
    ap.add_argument("--docs", type=int, nargs=2, default=(4, 6), metavar=("MIN", "MAX"))
    ap.add_argument("--doc-tokens", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", choices=sorted(SETS), help="a named set (ignores the sizes)")
    a = ap.parse_args()
    if a.set:
        items = make_set(a.set, a.items, seed=a.seed)
    else:
        items = make_items(a.items, docs=tuple(a.docs), doc_tokens=a.doc_tokens, seed=a.seed)
    Path(a.out).write_text(json.dumps(items, indent=1))
    print(a.out)


if __name__ == "__main__":
    main()
