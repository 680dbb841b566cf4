"""``lmcache.v1.multiprocess.custom_types``: the types vLLM's ``LMCacheMPConnector``
imports, with upstream's fields.

``RequestAllocationRecord`` is what vLLM's connector reports after each step
(the blocks it gave each request); lmcache's server does not need it (vLLM's
own KV events carry block contents), so the adapter accepts and drops it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestAllocationRecord:
    """The blocks vLLM allocated to a request in one step, and their tokens."""

    req_id: str
    new_block_ids: list[int] = field(default_factory=list)
    new_token_ids: list[int] = field(default_factory=list)


#: Upstream's older name for the same record (vLLM imports either).
BlockAllocationRecord = RequestAllocationRecord

#: Upstream's KV cache handle list (one entry per layer).
KVCache = list[Any]
