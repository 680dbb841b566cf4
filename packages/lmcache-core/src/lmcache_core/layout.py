"""KV layout descriptors: how an engine keeps KV in memory, and the chunk format.

A :class:`KVLayout` is a plain, torch-free value that the engine adapter fills
in and that every transfer implementation (lmcache-cuda's kernels, the numpy
reference) understands. It also decides a chunk's *format*, which goes into
every key's namespace so that incompatible bytes can never be mixed.

Chunk format ``neutral-v1`` (every layout but ``vllm_cpu``)::

    for layer in range(num_layers):
        for plane in range(kv_planes):          # K then V; one plane for MLA
            tokens x num_kv_heads x head_size elements, row-major, in ``dtype``

It does not depend on the engine's block size or block order, so a chunk
written through one engine can be read through another for the same model.

Chunk format ``vllm_cpu-v1`` (vLLM's CPU backend): the engine packs each block
for the CPU's matrix units, so only whole blocks can be copied, as opaque
bytes::

    for layer in range(num_layers):
        for block in chunk's blocks:            # block_size tokens each
            the block's raw bytes (num_kv_heads x block_size x 2*head_size)

It is tied to the engine's block size, which the fingerprint records.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from lmcache_core.errors import LayoutError

#: Element size in bytes of the dtypes engines use for KV. fp8 variants are
#: moved as bytes.
DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "uint8": 1,
    "int8": 1,
}


class LayoutKind(str, Enum):
    """Per-layer memory layouts of the engines lmcache supports."""

    #: vLLM CUDA flash-attention: ``[2, num_blocks, block_size, heads, head_size]``.
    VLLM_FLASH = "vllm_flash"
    #: vLLM variant with blocks first: ``[num_blocks, 2, block_size, heads, head_size]``.
    VLLM_FLASH_BLOCKS_FIRST = "vllm_flash_blocks_first"
    #: vLLM CPU: ``[num_blocks, heads, block_size, 2*head_size]``, blocks opaque.
    VLLM_CPU = "vllm_cpu"
    #: vLLM's per-layer view since its KV cache layouts (``VLLM_KV_CACHE_LAYOUT``):
    #: ``[num_blocks, heads, block_size, 2*head_size]``, each token's K then V in the
    #: last dimension, with the strides of the layout in use (NHD or HND inside a
    #: block, layers or blocks outermost), so usually not contiguous. Only the
    #: last dimension must be dense.
    VLLM_BHNC = "vllm_bhnc"
    #: Multi-head latent attention: ``[num_blocks, block_size, head_size]``.
    MLA = "mla"
    #: SGLang: K and V buffers ``[slots, heads, head_size]`` per layer, paged by page size.
    SGLANG_TOKEN = "sglang_token"


@dataclass(frozen=True)
class KVLayout:
    """What an engine's KV cache looks like, per layer."""

    kind: LayoutKind
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_size: int
    block_size: int

    def __post_init__(self) -> None:
        problems = []
        try:
            object.__setattr__(self, "kind", LayoutKind(self.kind))
        except ValueError:
            problems.append(
                f"kind={self.kind!r} is not one of {', '.join(k.value for k in LayoutKind)}"
            )
        if self.dtype not in DTYPE_SIZES:
            problems.append(f"dtype={self.dtype!r} is not one of {', '.join(DTYPE_SIZES)}")
        for name in ("num_layers", "num_kv_heads", "head_size", "block_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                problems.append(f"{name}={v!r} must be a positive integer")
        if self.kind is LayoutKind.MLA and self.num_kv_heads != 1:
            problems.append(f"an mla layout has one latent head; num_kv_heads={self.num_kv_heads}")
        if problems:
            raise LayoutError("invalid KV layout: " + "; ".join(problems))

    @property
    def kv_planes(self) -> int:
        """2 (K and V) for most layouts, 1 for MLA's joint latent."""
        return 1 if self.kind is LayoutKind.MLA else 2

    @property
    def element_size(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def engine_neutral(self) -> bool:
        return self.kind is not LayoutKind.VLLM_CPU

    @property
    def chunk_format(self) -> str:
        return "neutral-v1" if self.engine_neutral else "vllm_cpu-v1"

    @property
    def bytes_per_token_per_layer(self) -> int:
        return self.kv_planes * self.num_kv_heads * self.head_size * self.element_size

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * self.bytes_per_token_per_layer

    def chunk_bytes(self, num_tokens: int) -> int:
        """Size of a chunk of ``num_tokens`` tokens in this layout's chunk format."""
        return num_tokens * self.bytes_per_token

    def check_chunk_size(self, chunk_size: int) -> None:
        """Chunks must cover whole engine blocks where blocks are opaque."""
        if not self.engine_neutral and chunk_size % self.block_size:
            raise LayoutError(
                f"chunk_size={chunk_size} is not a multiple of the engine's block size "
                f"{self.block_size}; set chunk_size to a multiple of {self.block_size} "
                f"(e.g. {max(1, round(chunk_size / self.block_size)) * self.block_size})"
            )

    def fingerprint(self) -> dict[str, Any]:
        """What makes two caches' chunk bytes interchangeable (goes into key namespaces)."""
        fp: dict[str, Any] = {
            "chunk_format": self.chunk_format,
            "dtype": self.dtype,
            "num_layers": self.num_layers,
            "kv_planes": self.kv_planes,
            "num_kv_heads": self.num_kv_heads,
            "head_size": self.head_size,
        }
        if not self.engine_neutral:
            fp["block_size"] = self.block_size
        return fp
