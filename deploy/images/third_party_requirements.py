"""Print the third-party requirements of the lmcache wheels in a folder (one per line).

Used by the image builds: third-party packages come from the package index,
lmcache's own only from the wheel folder (``--no-index``), so a resolver can
never pick PyPI's unrelated ``lmcache`` or ``lmcache-vllm``.

    python3 third_party_requirements.py DIST lmcache lmcache-core ...
"""

import sys
import zipfile
from email.parser import Parser
from pathlib import Path

dist, wanted = Path(sys.argv[1]), set(sys.argv[2:])
reqs = set()
for wheel in sorted(dist.glob("*.whl")):
    name = wheel.name.split("-")[0].replace("_", "-")
    if name not in wanted:
        continue
    with zipfile.ZipFile(wheel) as z:
        (meta,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        msg = Parser().parsestr(z.read(meta).decode())
    for req in msg.get_all("Requires-Dist") or []:
        if not req.startswith("lmcache") and "extra ==" not in req:
            reqs.add(req)
print("\n".join(sorted(reqs)))
