"""Rotary position embedding (RoPE) and its exact shift: the reference maths.

RoPE rotates each pair of a key's dimensions by an angle ``p * theta_i``
proportional to the token's position ``p``. Rotations compose by adding
angles, so KV stored at positions ``p_old`` is moved to ``p_new`` by one more
rotation: ``R(p_new) R(p_old)^-1 = R(p_new - p_old)``. V carries no position
and is left as it is. lmcache stores a segment's K rotated back to the
segment's own positions (its first token at 0), so a chunk's bytes do not
depend on where the segment stood, and rotates by the segment's new start on
load.

Two pairings are in use: *neox* (dimension ``i`` pairs with ``i + d/2``:
Llama, Mistral, Qwen) and *GPT-J* (dimension ``2i`` pairs with ``2i + 1``).
Only the first ``rotary_dim`` dimensions rotate (partial rotary).

This is numpy, engine-free and slow on purpose: the adapters' fast paths
are tested against it.
"""

from __future__ import annotations

import numpy as np


def inv_freq(rotary_dim: int, base: float = 10000.0) -> np.ndarray:
    """``theta_i = base^(-2i/rotary_dim)`` for each rotated pair, float64."""
    return 1.0 / (base ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim))


def cos_sin(positions: np.ndarray, freqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of ``positions x freqs``: ``[n, rotary_dim / 2]`` each, float64."""
    angles = np.asarray(positions, dtype=np.float64)[:, None] * freqs[None, :]
    return np.cos(angles), np.sin(angles)


def rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, *, neox: bool = True) -> np.ndarray:
    """Rotate ``x`` (``[n, heads, head_size]``) by per-token angles (``[n, rotary_dim/2]``).

    Dimensions past ``rotary_dim = 2 * cos.shape[1]`` are copied unchanged.
    """
    x = np.asarray(x)
    half = cos.shape[1]
    rot = 2 * half
    out = x.astype(np.float64, copy=True)
    c, s = cos[:, None, :], sin[:, None, :]
    if neox:
        x1, x2 = out[..., :half].copy(), out[..., half:rot].copy()
        out[..., :half] = x1 * c - x2 * s
        out[..., half:rot] = x2 * c + x1 * s
    else:
        x1, x2 = out[..., 0:rot:2].copy(), out[..., 1:rot:2].copy()
        out[..., 0:rot:2] = x1 * c - x2 * s
        out[..., 1:rot:2] = x2 * c + x1 * s
    return out


def apply_rope(
    x: np.ndarray, positions: np.ndarray, freqs: np.ndarray, *, neox: bool = True
) -> np.ndarray:
    """``x`` rotated to ``positions`` (what a model does to its keys and queries)."""
    c, s = cos_sin(positions, freqs)
    return rotate(x, c, s, neox=neox)


def shift(
    x: np.ndarray, delta: np.ndarray | int, freqs: np.ndarray, *, neox: bool = True
) -> np.ndarray:
    """Keys at positions ``p`` moved to ``p + delta`` (``delta`` per token or one for all)."""
    n = np.asarray(x).shape[0]
    d = np.broadcast_to(np.asarray(delta, dtype=np.float64), (n,))
    return apply_rope(x, d, freqs, neox=neox)
