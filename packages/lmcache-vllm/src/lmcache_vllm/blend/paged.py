"""Token-level reads and writes of vLLM's paged KV, in plain ``[tokens, heads, head_size]``.

A blend pass reads K/V of arbitrary tokens (the context the engine already
holds, a segment to store) and writes K/V of arbitrary tokens (the blended
range). Prefix chunks move whole blocks as opaque bytes; here each token's K
and V must be seen as numbers.

Writes go through the attention backend's own ``do_kv_cache_update`` (the
op vLLM's forward uses to write new tokens), so the packing is always the
backend's. Reads need the inverse, and vLLM's CPU backend packs blocks per
ISA (K transposed for the vector ISAs, tiles for AMX). Rather than hard-code
any packing, :class:`PagedKV` *probes* it once at start: it writes tokens
whose values encode their (plane, token, head, dim) through the backend's
op into a scratch block and reads where each landed, giving a gather index.
The probe checks the map is a bijection, so a packing it cannot invert
(quantized fp8 blocks, say) refuses blending at start rather than reading
wrong KV. The flash layouts (GPU) are plain and need no probe.
"""

from __future__ import annotations

from typing import Any

import torch
from lmcache_core.errors import LayoutError
from lmcache_core.layout import KVLayout, LayoutKind

#: Digits of the probe's codes: small integers, exact in every float KV dtype.
_BASE = 64


def slot_mapping(block_ids: list[int], block_size: int, start: int, end: int) -> torch.Tensor:
    """vLLM's slot of each token ``[start, end)`` of a request with these blocks."""
    pos = torch.arange(start, end, dtype=torch.int64)
    table = torch.tensor(block_ids, dtype=torch.int64)
    if end > len(block_ids) * block_size:
        raise LayoutError(
            f"tokens up to {end} need more than the request's {len(block_ids)} blocks"
        )
    return table[pos // block_size] * block_size + pos % block_size


class PagedKV:
    """Per-layer token reads and writes of one worker's KV tensors."""

    def __init__(
        self, layout: KVLayout, layers: list[torch.Tensor], attn_layers: list[Any]
    ) -> None:
        if layout.kind is LayoutKind.MLA or layout.kind is LayoutKind.SGLANG_TOKEN:
            raise LayoutError(
                f"blending needs separate K and V per head; layout {layout.kind.value}"
            )
        self.layout = layout
        self.layers = layers
        self.attn = attn_layers
        self.bs = layout.block_size
        self.heads, self.dim = layout.num_kv_heads, layout.head_size
        self._gather: torch.Tensor | None = None
        #: Per plane (storage offset, token, head and dim strides) inside a block, when
        #: the packing is a plain strided layout (a transpose, say): reads are then one
        #: strided copy instead of an index gather.
        self._strided: list[tuple[int, int, int, int]] | None = None
        if layout.kind is LayoutKind.VLLM_CPU:
            self._gather = self._probe()
            self._strided = _as_strides(self._gather)

    # ------------------------------------------------------------------ writes

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """K/V (``[n, heads, head_size]``) of the tokens at ``slots`` into layer ``layer``."""
        attn = self.attn[layer]
        kv = self.layers[layer]
        attn.impl.do_kv_cache_update(
            attn, k.to(kv.dtype).contiguous(), v.to(kv.dtype).contiguous(), kv, slots.to(kv.device)
        )

    # ------------------------------------------------------------------ reads

    def read(
        self, layer: int, block_ids: list[int], start: int, end: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of tokens ``[start, end)`` of a request with ``block_ids``: ``[n, heads, dim]``.

        Copies, never views of vLLM's memory: a caller may change them in place.
        """
        bs = self.bs
        first, last = start // bs, -(-end // bs)
        ids = torch.tensor(
            block_ids[first:last], dtype=torch.int64, device=self.layers[layer].device
        )
        kv = self.layers[layer]
        kind = self.layout.kind
        lo = start - first * bs
        if kind is LayoutKind.VLLM_CPU and self._strided is not None:
            flat = kv.view(kv.shape[0], -1).index_select(0, ids)  # [blocks, block elements]
            n_blk, per = flat.shape
            planes = []
            for base, st, sh, sd in self._strided:
                view = flat.as_strided(
                    (n_blk, bs, self.heads, self.dim),
                    (per, st, sh, sd),
                    flat.storage_offset() + base,
                )
                planes.append(view.reshape(-1, self.heads, self.dim)[lo : lo + end - start])
            return planes[0], planes[1]
        if kind is LayoutKind.VLLM_CPU:
            assert self._gather is not None
            flat = kv.view(kv.shape[0], -1).index_select(0, ids)
            both = flat[:, self._gather.to(flat.device)]  # [blocks, 2, bs, heads, dim]
            both = both.transpose(0, 1)
        elif kind is LayoutKind.VLLM_BHNC:  # [blocks, heads, bs, K|V], strided
            sel = kv.index_select(0, ids).transpose(1, 2)  # [blocks, bs, heads, 2*dim]
            both = torch.stack((sel[..., : self.dim], sel[..., self.dim :]))
        elif kind is LayoutKind.VLLM_FLASH:
            both = kv.index_select(1, ids)  # [2, blocks, bs, heads, dim]
        else:  # VLLM_FLASH_BLOCKS_FIRST
            both = kv.index_select(0, ids).transpose(0, 1)
        both = both.reshape(2, -1, self.heads, self.dim)
        return both[0, lo : lo + end - start], both[1, lo : lo + end - start]

    def read_into(
        self,
        layer: int,
        block_ids: list[int],
        start: int,
        k_out: torch.Tensor,
        v_out: torch.Tensor,
    ) -> None:
        """K and V of tokens ``[start, start + len(k_out))`` into ``k_out``/``v_out``
        (``[n, heads, dim]``): straight from each block where the packing is strided,
        one copy per block and plane."""
        n = k_out.shape[0]
        if self._strided is None:
            k, v = self.read(layer, block_ids, start, start + n)
            k_out.copy_(k)
            v_out.copy_(v)
            return
        kv = self.layers[layer]
        per = kv[0].numel()
        bs, h, d = self.bs, self.heads, self.dim
        pos = start
        while pos < start + n:
            block, lo = divmod(pos, bs)
            hi = min(bs, lo + start + n - pos)
            a, b = pos - start, pos - start + hi - lo
            offset = kv.storage_offset() + block_ids[block] * per
            for (base, st, sh, sd), out in zip(self._strided, (k_out, v_out)):
                view = kv.as_strided((bs, h, d), (st, sh, sd), offset + base)
                out[a:b].copy_(view[lo:hi])
            pos += hi - lo

    # ------------------------------------------------------------------ the probe

    def _probe(self) -> torch.Tensor:
        """Where each (plane, token, head, dim) of a block lands (``[2, bs, heads, dim]``)."""
        bs, h, d = self.bs, self.heads, self.dim
        real = self.layers[0]
        scratch = torch.empty((2, *real.shape[1:]), dtype=real.dtype, device=real.device)
        slots = torch.arange(bs, 2 * bs, dtype=torch.int64, device=real.device)  # block 1
        grid = torch.meshgrid(torch.arange(bs), torch.arange(h), torch.arange(d), indexing="ij")

        def landed(k_val: torch.Tensor, v_val: torch.Tensor) -> torch.Tensor:
            scratch.fill_(-1)
            self.write_to(scratch, slots, k_val.float(), v_val.float())
            got = scratch[1].reshape(-1).float().cpu()
            if bool((got < 0).any()) or bool((got != got.round()).any()):
                raise LayoutError(
                    "vLLM's KV block packing could not be probed (a value did not come back "
                    "intact: a quantized KV cache?); blending needs a float KV cache"
                )
            return got.to(torch.int64)

        plane = landed(torch.zeros(bs, h, d), torch.ones(bs, h, d))  # 0 = K, 1 = V
        fields = []
        for index, size in zip(grid, (bs, h, d)):
            value, weight = torch.zeros_like(plane), 1
            while weight < size:
                digit = (index // weight) % _BASE
                value += landed(digit, digit) * weight
                weight *= _BASE
            fields.append(value)
        t, hh, dd = fields
        flat = ((plane * bs + t) * h + hh) * d + dd
        n = 2 * bs * h * d
        if (
            flat.numel() != n
            or bool((t >= bs).any() | (hh >= h).any() | (dd >= d).any())
            or torch.unique(flat).numel() != n
        ):
            raise LayoutError(
                "vLLM's KV block packing is not a plain permutation of K and V; blending "
                "cannot read it back"
            )
        where = torch.empty(n, dtype=torch.int64)
        where[flat] = torch.arange(n)
        return where.view(2, bs, h, d)

    def write_to(
        self, kv: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        attn = self.attn[0]
        attn.impl.do_kv_cache_update(
            attn, k.to(kv.dtype).contiguous(), v.to(kv.dtype).contiguous(), kv, slots
        )


def _as_strides(where: torch.Tensor) -> list[tuple[int, int, int, int]] | None:
    """``where`` (``[2, bs, heads, dim]`` positions in a block) as one strided view per
    plane, or None if a plane is not strided."""
    out = []
    for plane in where:
        base = int(plane[0, 0, 0])
        strides = []
        for axis in range(3):
            index = [0, 0, 0]
            if plane.shape[axis] > 1:
                index[axis] = 1
                strides.append(int(plane[tuple(index)]) - base)
            else:
                strides.append(0)
        st, sh, sd = strides
        t = torch.arange(plane.shape[0]).view(-1, 1, 1)
        h = torch.arange(plane.shape[1]).view(1, -1, 1)
        d = torch.arange(plane.shape[2]).view(1, 1, -1)
        if min(base, st, sh, sd) < 0 or not torch.equal(plane, base + t * st + h * sh + d * sd):
            return None
        out.append((base, st, sh, sd))
    return out
