"""The vLLM servers the serving benchmarks compare, and a start that says why one failed.

``tools/bench_load.py`` and ``tools/bench_vllm_serve_ab.py`` measure the same
configurations (:func:`server_configs`): vLLM alone; vLLM with lmcache's DRAM
tier; the same with whole chunks only; lmcache with a small DRAM tier over
local disk; vLLM's own ``SimpleCPUOffloadConnector`` with the same DRAM.
:func:`start` enters a :func:`~lmcache_vllm.testing.server.vllm_server` and
returns the root cause from the server's log instead of raising, so one
configuration that cannot start (vLLM's offloading on its CPU backend) is
reported while the others still run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lmcache_core.sizes import parse_size


def start_failure(message: str) -> str:
    """The line of a server's log that says why it did not start: the root cause, the
    first ``XxxError: ...`` that is not vLLM's generic "see root cause above"."""
    lines = [ln.split("] ", 1)[-1].strip() for ln in message.splitlines() if ln.strip()]
    causes = [ln for ln in lines if re.match(r"\w+(Error|Exception): ", ln)]
    causes = [ln for ln in causes if "root cause" not in ln] or causes
    return (causes or lines or ["unknown"])[0][:300]


def server_configs(
    dram: str, small_dram: str | None = None, disk_dir: Path | None = None
) -> dict[str, tuple[str | None, dict, str, dict]]:
    """The servers these benchmarks compare: name -> (lmcache role or None, environment,
    connector, kv_connector_extra_config)."""
    configs: dict[str, tuple[str | None, dict, str, dict]] = {
        "vllm": (None, {}, "LMCacheKVConnector", {}),
        "lmcache": ("kv_both", {"LMCACHE_MAX_LOCAL_CPU_SIZE": dram}, "LMCacheKVConnector", {}),
        # The same without hits inside a chunk: whole chunks only, as upstream LMCache loads.
        "lmcache-chunks": (
            "kv_both",
            {"LMCACHE_MAX_LOCAL_CPU_SIZE": dram, "LMCACHE_MAX_CHUNK_ALIASES": "0"},
            "LMCacheKVConnector",
            {},
        ),
        # vLLM's own CPU offloading, with the same DRAM (a user's alternative to lmcache).
        "vllm-offload": (
            "kv_both", {}, "SimpleCPUOffloadConnector", {"cpu_bytes_to_use": parse_size(dram)}
        ),
    }  # fmt: skip
    if small_dram and disk_dir is not None:
        configs["lmcache-disk"] = (
            "kv_both",
            {
                "LMCACHE_MAX_LOCAL_CPU_SIZE": small_dram,
                "LMCACHE_LOCAL_DISK": str(disk_dir),
                "LMCACHE_MAX_LOCAL_DISK_SIZE": "20GiB",
            },
            "LMCacheKVConnector",
            {},
        )
    return configs


def start(server: Any, log: Path) -> tuple[int | None, str | None]:
    """Enter a ``vllm_server`` context: (port, None), or (None, why it did not start)."""
    try:
        return server.__enter__(), None
    except (RuntimeError, TimeoutError) as e:  # vllm-offload on vLLM's CPU backend
        return None, start_failure(log.read_text() if log.exists() else str(e))
