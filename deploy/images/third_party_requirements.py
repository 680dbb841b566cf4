"""Print the third-party requirements of the lmcache wheels in a folder (one per line).

Used by the image builds: third-party packages come from the package index,
lmcache's own only from the wheel folder (``--no-index``), so a resolver can
never pick PyPI's unrelated ``lmcache`` or ``lmcache-vllm``.

    python3 third_party_requirements.py DIST lmcache lmcache-core[auth,redis] ...

A name's extras add the requirements those extras declare.
"""

import re
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

dist = Path(sys.argv[1])
wanted: dict[str, set[str]] = {}
for arg in sys.argv[2:]:
    name, _, extras = arg.partition("[")
    wanted[name] = {e.strip() for e in extras.rstrip("]").split(",") if e.strip()}
reqs = set()
for wheel in sorted(dist.glob("*.whl")):
    name = wheel.name.split("-")[0].replace("_", "-")
    if name not in wanted:
        continue
    with zipfile.ZipFile(wheel) as z:
        (meta,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        msg = Parser().parsestr(z.read(meta).decode())
    for req in msg.get_all("Requires-Dist") or []:
        spec, _, marker = req.partition(";")
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", marker)
        if extra and extra.group(1) not in wanted[name]:
            continue
        if not spec.strip().startswith("lmcache"):
            reqs.add(spec.strip())
print("\n".join(sorted(reqs)))
