"""The RoPE shift on torch tensors, with the model's own frequencies.

The maths and its numpy reference are in :mod:`lmcache_core.blend.rope`.
Here the angles come from the model's rotary embedding module (its
frequencies, with angles computed in float64 so that a long shift is as exact
as a short one), so any scaling that stays a pure rotation linear in the
position (Llama 3's, linear) is handled as the model does it. A scaling that
is not (YaRN's magnitude factor, multimodal or chunked RoPE) is refused at
start: :func:`check_pure_rotation`.
"""

from __future__ import annotations

from typing import Any

import torch
from lmcache_core.errors import ConfigError

#: Rotary classes whose angles depend on more than the position.
_REFUSED = ("MRotary", "DualChunk", "Yarn", "YaRN", "Phi3LongRoPE", "DynamicNTKAlpha")


def _model_cos_sin(rotary_emb: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin as the model computes them (float32, ``[max_position, rotary_dim/2]``)."""
    compute = getattr(rotary_emb, "_compute_cos_sin_cache", None)
    cache = compute() if callable(compute) else rotary_emb.cos_sin_cache
    cache = cache.float().cpu()
    half = cache.shape[-1] // 2
    return cache[:, :half], cache[:, half:]


def _exact_cos_sin(rotary_emb: Any, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """cos and sin of ``position x inv_freq`` computed in float64 from the model's own
    frequencies (float32 tables): a shift by 8000 positions is then as exact as one by 8."""
    compute = getattr(rotary_emb, "_compute_inv_freq", None)
    base = getattr(rotary_emb, "base", None)
    if not callable(compute) or base is None:
        return None
    inv = compute(base).double().cpu()
    angles = torch.arange(n, dtype=torch.float64).unsqueeze(1) * inv.unsqueeze(0)
    return angles.cos().float(), angles.sin().float()


def check_pure_rotation(rotary_emb: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Refuse a rotary embedding whose shift is not one more rotation; returns the
    cos/sin tables a shift uses."""
    name = type(rotary_emb).__name__
    if any(bad in name for bad in _REFUSED) or not hasattr(rotary_emb, "is_neox_style"):
        raise _not_pure(name, "its angles depend on more than the position")
    cos, sin = _model_cos_sin(rotary_emb)
    norm = (cos * cos + sin * sin - 1).abs().max().item()
    n = cos.shape[0]
    a = torch.tensor([1, 7, n // 3, n // 4])
    b = torch.tensor([2, 100, n // 5, n // 2])
    drift = (cos[a] * cos[b] - sin[a] * sin[b] - cos[a + b]).abs().max().item()
    if norm > 1e-4 or drift > 1e-2:
        raise _not_pure(
            name,
            f"it does not rotate by an angle proportional to the position "
            f"(|cos^2+sin^2-1| up to {norm:.2g}, additivity error {drift:.2g})",
        )
    exact = _exact_cos_sin(rotary_emb, n)
    if exact is None:
        return cos.contiguous(), sin.contiguous()
    off = max((exact[0] - cos).abs().max().item(), (exact[1] - sin).abs().max().item())
    if off > 1e-2:  # the cache is not built from _compute_inv_freq alone
        raise _not_pure(name, f"its cache differs from its frequencies by {off:.2g}")
    return exact


def _not_pure(name: str, why: str) -> ConfigError:
    return ConfigError(
        [
            f"enable_blending: the model's rotary embedding ({name}) cannot move cached keys: "
            f"{why}; turn enable_blending off for this model"
        ],
        "lmcache-vllm",
    )


class RopeShift:
    """Moves keys by a number of positions: ``R(delta)`` on the first ``rotary_dim`` dims.

    :meth:`shift_` rotates in place with vLLM's own fused rotary op (the one
    the model's forward uses), fed a table of angles for shifts ``-M..M-1``
    (row ``M + delta``); :meth:`shift` is the same maths in plain torch.
    """

    def __init__(self, rotary_emb: Any) -> None:
        self.cos, self.sin = check_pure_rotation(rotary_emb)
        self.neox = bool(rotary_emb.is_neox_style)
        self.rotary_dim = int(rotary_emb.rotary_dim)
        self.head_size = int(rotary_emb.head_size)
        m = self.cos.shape[0]
        self._table = torch.cat(  # row M + d: cos(d theta), sin(d theta), d in [-M, M)
            [
                torch.cat([self.cos.flip(0)[:-1], self.cos]),
                torch.cat([-self.sin.flip(0)[:-1], self.sin]),
            ],
            dim=1,
        )
        self._table = torch.cat([self._table[:1], self._table])  # row 0: d = -M (unused)
        self._offset = m
        self._tables: dict[tuple[Any, Any], torch.Tensor] = {}
        try:
            from vllm import _custom_ops as ops

            self._op: Any = ops.rotary_embedding
        except ImportError:  # pragma: no cover - vLLM always ships it
            self._op = None

    def shift_(self, k: torch.Tensor, delta: int) -> None:
        """Move ``k`` (contiguous ``[n, heads, head_size]``) by ``delta`` positions, in place."""
        if delta == 0 or k.shape[0] == 0:
            return
        if abs(delta) >= self._offset:
            raise ValueError(f"a shift of {delta} positions is past the model's maximum")
        if self._op is None or not k.is_contiguous():
            k.copy_(self.shift(k, delta))
            return
        key = (k.dtype, k.device)
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = self._table.to(k.device, k.dtype)
        pos = torch.full((k.shape[0],), self._offset + delta, dtype=torch.int64, device=k.device)
        self._op(pos, k.view(k.shape[0], -1), None, self.head_size, table, self.neox)

    def shift(self, k: torch.Tensor, delta: int | torch.Tensor) -> torch.Tensor:
        """``k`` (``[n, heads, head_size]``) moved by ``delta`` positions (one or per token).

        Computed in float32 and returned in ``k``'s dtype. A zero shift returns
        ``k`` bit for bit (cos 1, sin 0).
        """
        n = k.shape[0]
        d = (
            torch.as_tensor(delta, dtype=torch.int64).expand(n)
            if n
            else torch.zeros(0, dtype=torch.int64)
        )
        if d.numel() and int(d.abs().max()) >= self.cos.shape[0]:
            raise ValueError(
                f"a shift of {int(d.abs().max())} positions is past the model's maximum"
            )
        idx = d.abs()
        cos = self.cos.to(k.device)[idx].unsqueeze(1)
        sin = (self.sin.to(k.device)[idx] * d.sign().to(k.device).unsqueeze(1).float()).unsqueeze(1)
        x = k.float()
        out = x.clone()
        half, rot = self.rotary_dim // 2, self.rotary_dim
        if self.neox:
            x1, x2 = x[..., :half], x[..., half:rot]
            out[..., :half] = x1 * cos - x2 * sin
            out[..., half:rot] = x2 * cos + x1 * sin
        else:
            x1, x2 = x[..., 0:rot:2], x[..., 1:rot:2]
            out[..., 0:rot:2] = x1 * cos - x2 * sin
            out[..., 1:rot:2] = x2 * cos + x1 * sin
        return out.to(k.dtype)
