"""Names of torch dtypes as lmcache layouts spell them (``KVLayout.dtype``), for adapters."""

from __future__ import annotations

import torch

TORCH_DTYPES: dict[torch.dtype, str] = {
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float32: "float32",
    torch.uint8: "uint8",
    torch.int8: "int8",
}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        TORCH_DTYPES[getattr(torch, _name)] = _name
